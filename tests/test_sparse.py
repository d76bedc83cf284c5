"""Sparse momentum: layout, subset size, keyed draws, re-draws at resets, zero update off the subset,
memory, and an HLO check that the subsets are selected without gathers or scatters."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import spam_optax as spam
from spam_optax._sparse import Strata, row_size, stratified_axis


def selected(updates):
  return {n: np.asarray(u) != 0 for n, u in updates.items()}


def sparse_run(key, steps, density=0.25, interval=5, shape=(40, 25)):
  """Masks of nonzero updates after each update, with all-ones gradients."""
  p = {"w": jnp.ones(shape), "b": jnp.ones(shape[-1])}
  tx = spam.spam(1e-2, density=density, key=key, reset_interval=interval, warmup_steps=2, clip_delay=2)
  state, masks = tx.init(p), []
  update = jax.jit(tx.update)
  for _ in range(steps):
    u, state = update(jax.tree.map(jnp.ones_like, p), state, p)
    masks.append(selected(u))
  return masks, state


def test_fraction_zero_update_and_dense_leaves():
  masks, _ = sparse_run(jax.random.key(0), 3)
  for m in masks:
    assert (m["w"].sum(0) == 10).all()  # exactly round(0.25 * 40) entries of every column move
    assert m["b"].all()  # 1-D leaves stay dense by default
  assert (masks[0]["w"] == masks[2]["w"]).all()  # same subset within an interval


def test_redrawn_exactly_at_resets():
  masks, _ = sparse_run(jax.random.key(0), 11, interval=5)
  w = [m["w"] for m in masks]  # w[k - 1] is update k
  for k in range(1, 12):
    same_as_previous = k > 1 and (w[k - 1] == w[k - 2]).all()
    assert same_as_previous == (k > 1 and k % 5 != 0), k


def test_same_key_same_subset_different_key_different():
  a, _ = sparse_run(jax.random.key(1), 1)
  b, _ = sparse_run(jax.random.key(1), 1)
  c, _ = sparse_run(jax.random.key(2), 1)
  assert (a[0]["w"] == b[0]["w"]).all()
  assert not (a[0]["w"] == c[0]["w"]).all()


@pytest.mark.parametrize("length, density", [(12, 0.25), (10, 0.3), (7, 0.5), (9, 0.9), (512, 0.1),
                                             (1376, 0.1)])
def test_every_entry_equally_likely(length, density):
  """Every entry has probability k / n, also when the strata differ in size (tail): along a vector,
  and along the rows of a matrix (every column drawn alike)."""
  k = row_size(length, density)
  n = 6000
  for shape in ((length,), (length, 3)):
    compact = (k,) + shape[1:]
    draw = jax.jit(jax.vmap(lambda key: Strata.draw(key, shape, k).expand(jnp.ones(compact))))
    chosen = np.asarray(draw(jax.random.split(jax.random.key(0), n))) != 0
    assert (chosen.sum(1) == k).all()
    p = k / length
    np.testing.assert_allclose(chosen.mean(0), p, atol=4.5 * np.sqrt(p * (1 - p) / n))


@settings(max_examples=10, deadline=None)  # each shape compiles anew
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), density=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**30))
def test_gather_and_expand_agree(shape, density, seed):
  """expand puts the compact values on exactly k entries of every line along the stratified axis
  (the rows of a matrix, a vector's only axis); gather reads them back."""
  shape = tuple(shape)
  axis = stratified_axis(shape)
  k = row_size(shape[axis], density)
  s = Strata.draw(jax.random.key(seed), shape, k)
  compact = jnp.arange(1.0, np.prod(s.compact_shape) + 1).reshape(s.compact_shape)
  full = np.asarray(s.expand(compact))
  assert full.shape == shape and s.compact_shape == shape[:axis] + (k,) + shape[axis + 1:]
  assert (np.count_nonzero(np.moveaxis(full, axis, -1).reshape(-1, shape[axis]), axis=1) == k).all()
  np.testing.assert_array_equal(np.asarray(s.gather(jnp.asarray(full))), np.asarray(compact))


def test_compact_state_keeps_the_leaf_rank_and_its_other_dimensions():
  params = {"kernel": jnp.ones((8, 16)), "conv": jnp.ones((3, 4, 10)), "narrow": jnp.ones((50, 2)),
            "short": jnp.ones((1, 40)), "vec": jnp.ones(10), "scalar": jnp.ones(())}
  tx = spam.spam(1e-3, density=0.25, key=jax.random.key(0), sparse_leaves=lambda p: jax.tree.map(
      lambda _: True, p))  # every leaf selected, even the vector and the scalar
  mu = tx.init(params)[0].inner_state[0].mu
  assert {n: x.shape for n, x in mu.items()} == {
      "kernel": (2, 16), "conv": (3, 1, 10), "narrow": (12, 2), "short": (1, 40), "vec": (2,),
      "scalar": ()}
  u, _ = tx.update(params, tx.init(params), params)
  assert np.count_nonzero(u["short"]) == 40  # d n < 1/2: one entry per column
  assert np.count_nonzero(u["scalar"]) == 1  # scalars stay dense


def test_row_multiple_rounds_k_to_a_multiple_where_it_divides_the_row():
  assert [row_size(512, 0.1, m) for m in (1, 8, 3)] == [51, 48, 51]  # 3 does not divide 512
  assert row_size(16, 0.01, 8) == 8  # at least one multiple
  tx = spam.spam(1e-3, density=0.1, key=jax.random.key(0), sparse_row_multiple=8)
  mu = tx.init({"w": jnp.ones((512, 4))})[0].inner_state[0].mu
  assert mu["w"].shape == (48, 4)
  with pytest.raises(ValueError, match="row_multiple"):
    spam.sparse_mask(spam.scale_by_adam_with_reset(), 0.5, key=jax.random.key(0), row_multiple=0)


@pytest.mark.parametrize("density", [0.25, 0.1])
def test_compiled_sparse_update_has_no_gather_or_scatter(density):
  """The subset is selected with iota == offset selects: XLA's SPMD partitioner can keep that local
  to each shard, where a gather or scatter with computed indices makes it move whole leaves."""
  p = {"q": jnp.ones((64, 64)), "up": jnp.ones((64, 172)), "norm": jnp.ones(64)}
  tx = spam.spam(1e-3, density=density, key=jax.random.key(0))

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), p).compile().as_text()
  assert " gather(" not in hlo and " scatter(" not in hlo


@pytest.mark.parametrize("density", [0.25, 0.1])
def test_compiled_sparse_update_hashes_once_per_stratum(density):
  """The draw's hashes run in one compact-sized fusion that stores the offsets as bytes, not inside
  the full-size expansion or the gathers (where XLA:CPU fuses them by default and recomputes them
  for every entry: 2-4x slower). murmur3's 0x85EBCA6B = 2246822507 marks the hash."""
  p = {"q": jnp.ones((64, 64)), "up": jnp.ones((64, 172))}
  tx = spam.spam(1e-3, density=density, key=jax.random.key(0))

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), p).compile().as_text()
  computations = re.findall(r"^(%\S+ \([^\n]*\) -> \S+) \{\n(.*?)^\}", hlo, re.M | re.S)
  hashing = [header for header, body in computations if "2246822507" in body]
  assert hashing
  for header in hashing:  # "%fused_computation.3 (param_0: u32[3], ...) -> u8[64,16]"
    assert header.rsplit("-> ", 1)[1].startswith("u8["), header


def test_subset_trajectory_equals_dense_spam_on_those_entries():
  """Within an interval, sparse SPAM on the subset is dense SPAM on the subset's entries."""
  key = jax.random.key(3)
  p = {"w": jnp.linspace(-1, 1, 200).reshape(10, 20)}
  grads = [{"w": jnp.sin(p["w"] * (k + 1)) * (50.0 if k == 6 else 1.0)} for k in range(9)]
  kw = dict(reset_interval=10, warmup_steps=3, clip_delay=2, threshold=5.0)
  sparse, dense = spam.spam(1e-2, density=0.3, key=key, **kw), spam.spam(1e-2, **kw)
  s_state, d_state = sparse.init(p), dense.init(p)
  for g in grads:
    su, s_state = sparse.update(g, s_state, p)
    du, d_state = dense.update(g, d_state, p)
    on = np.asarray(su["w"]) != 0
    assert on.sum() == 60
    np.testing.assert_allclose(np.asarray(su["w"])[on], np.asarray(du["w"])[on], rtol=1e-6)


def test_state_is_about_density_times_adam():
  shapes = {"embed": (300, 64), "q": (64, 64), "norm": (64,)}
  p = {n: jnp.ones(s) for n, s in shapes.items()}
  adam_bytes = sum(x.nbytes for x in jax.tree.leaves(optax.adam(1e-3).init(p)))
  for d in (0.25, 0.1):
    state = spam.spam(1e-3, density=d, key=jax.random.key(0)).init(p)
    arrays = [x for x in jax.tree.leaves(state) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    n_leaves = len(shapes)
    # moments of the sparse leaves at density d, the dense norm's moments, scalars and the key
    assert sum(x.nbytes for x in arrays) <= d * adam_bytes + 2 * 4 * 64 + 16 * n_leaves
    big = max(int(np.prod(s)) for s in shapes.values())
    assert all(x.size < d * big + 1 for x in arrays if x.ndim)  # nothing full-size is stored


def test_jit_under_donation_and_restart_from_state_copy():
  """The subset is a pure function of the state: a copied state gives the same next update."""
  masks, state = sparse_run(jax.random.key(5), 3)  # the next update, k = 4, keeps the subset
  p = {"w": jnp.ones((40, 25)), "b": jnp.ones(25)}
  tx = spam.spam(1e-2, density=0.25, key=jax.random.key(99), reset_interval=5, warmup_steps=2,
                 clip_delay=2)  # a different construction key: the state's key wins
  restored = jax.tree.map(lambda x: x, state)
  u1, _ = tx.update(jax.tree.map(jnp.ones_like, p), restored, p)
  u2, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, p), state, p)
  chex.assert_trees_all_close(u1, u2)
  assert (selected(u1)["w"] == masks[-1]["w"]).all()


def test_bad_sparse_arguments():
  inner = spam.scale_by_adam_with_reset()
  with pytest.raises(ValueError, match="density"):
    spam.sparse_mask(inner, 0.0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="key"):
    spam.sparse_mask(inner, 0.5, key=None)
