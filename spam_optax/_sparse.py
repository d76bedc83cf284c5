"""Sparse momentum (SPEC §2): run an inner transform on a keyed random subset of each leaf.

How the subset is drawn (no full-size mask or index array is ever stored):

* A selected leaf of ``n`` entries keeps ``n_sel = max(1, round(d n))`` of them. Its flat indices
  are cut into ``n_sel`` consecutive strata (with ``q, r = divmod(n, n_sel)``: ``r`` strata of
  ``q + 1`` entries, then ``n_sel - r`` of ``q``) and one entry is drawn uniformly inside each.
  When ``r > 0`` the strata start at a random ``shift`` (cyclically), so that every entry, not just
  on average, has the same probability ``n_sel / n``; with equal strata no shift is needed.
* Two 32-bit seeds (the draw seed and ``shift``) come from
  ``jax.random.fold_in(fold_in(key, leaf_index), reset_index)``; the draw inside stratum ``i`` is a
  counter-based hash (murmur3's 32-bit finaliser) of ``i`` and the seed. So the subset is a pure
  function of (key, leaf, reset index): identical on every device and host and after a restore,
  different for different keys, re-drawn at every reset, and never stored.
* The draw is stratified, not independent as in the authors' code: exactly one entry per stratum, so
  every region of the tensor gets its share, and the size is exact (``n_sel``) at every re-draw.
* Nothing is scattered. The subset's gradients are gathered at indices that are sorted (up to one
  wrap-around when shifted), and the full-size update is rebuilt entry by entry (which stratum is
  this entry in, is it the chosen one), which XLA fuses into the parameter update: the sparse step
  reads the full parameters once and the moments only for the subset.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spam_optax import _schedules, _validate


class SparseMaskState(NamedTuple):
  """State of `sparse_mask`: update count, the PRNG key the subsets derive from, inner state."""

  count: chex.Array  # int32
  key: chex.PRNGKey  # typed key, jax.random.key(...)
  inner_state: optax.OptState


def subset_size(n: int, density: float) -> int:
  """The number of entries of an n-entry leaf that carry state at density d."""
  return max(1, int(round(density * n)))


def _hash32(x: jax.Array, seed: jax.Array) -> jax.Array:
  """murmur3 fmix32 of (x * golden ratio + seed): a cheap, well-mixed counter-based hash."""
  h = x.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + seed
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _unit(bits: jax.Array) -> jax.Array:
  """uint32 -> float32 uniform in [0, 1) from the top 24 bits."""
  return (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


class Strata(NamedTuple):
  """The subset of one n-entry leaf for one reset index: static sizes and two traced seeds."""

  n: int
  n_sel: int
  seed: jax.Array  # uint32, seeds the draw inside each stratum
  shift: jax.Array  # int32 in [0, n), rotates the strata over the flat indices

  @classmethod
  def draw(cls, key: jax.Array, n: int, n_sel: int) -> "Strata":
    if n >= 1 << 30:
      raise ValueError(f"sparse leaves must have fewer than 2**30 entries, got {n}")
    seed, shift_bits = jax.random.bits(key, (2,), jnp.uint32)
    return cls(n, n_sel, seed, (shift_bits % jnp.uint32(n)).astype(jnp.int32))

  def offsets(self, i: jax.Array) -> jax.Array:
    """The position of stratum i's chosen entry inside the stratum."""
    q, r = divmod(self.n, self.n_sel)  # the first r strata hold q + 1 entries
    size = q + (i < r).astype(jnp.int32)
    offset = jnp.floor(_unit(_hash32(i, self.seed)) * size.astype(jnp.float32)).astype(jnp.int32)
    return jnp.minimum(offset, size - 1)

  def indices(self) -> jax.Array:
    """The n_sel flat indices of the subset, in stratum order (sorted up to one wrap-around)."""
    q, r = divmod(self.n, self.n_sel)
    i = jnp.arange(self.n_sel, dtype=jnp.int32)
    shifted = i * q + jnp.minimum(i, r) + self.offsets(i)
    if not r:
      return shifted
    return jnp.where(shifted >= self.shift, shifted - self.shift, shifted - self.shift + self.n)

  def expand(self, compact: jax.Array, shape) -> jax.Array:
    """The full-size array holding `compact` on the subset and exactly 0 elsewhere.

    Written entry by entry (no scatter) so that XLA fuses it into the parameter update.
    """
    q, r = divmod(self.n, self.n_sel)
    zero = jnp.zeros([], compact.dtype)
    if not r and q & (q - 1) == 0:
      # Equal strata of a power-of-two size: view the leaf as (n_sel, q); the index arithmetic
      # of that reshape is shifts and masks, the cheapest form on every backend.
      col = jax.lax.broadcasted_iota(jnp.int32, (self.n_sel, q), 1)
      offsets = self.offsets(jnp.arange(self.n_sel, dtype=jnp.int32))
      return jnp.where(col == offsets[:, None], compact[:, None], zero).reshape(shape)
    j = jnp.arange(self.n, dtype=jnp.int32).reshape(shape)
    if r:
      j = j + self.shift  # shifted coordinate of each entry
      j = jnp.where(j >= self.n, j - self.n, j)
    big = r * (q + 1)  # the first r strata hold q + 1 entries
    i = _floordiv(j, q) if not r else jnp.where(j < big, _floordiv(j, q + 1), r + _floordiv(j - big, q))
    start = i * q + jnp.minimum(i, r)
    chosen = j - start == self.offsets(i)
    return jnp.where(chosen, compact.at[i].get(mode="promise_in_bounds"), zero)


def _floordiv(j: jax.Array, q: int) -> jax.Array:
  """floor(j / q) for int32 j in (-2**30, 2**30) with vectorisable float32 ops.

  XLA lowers integer division by a constant to 64-bit multiply-high, which does not vectorise on
  CPUs. The first float estimate is off by at most a few strata for j >= 2**24; the second step,
  on a small remainder, is exact.
  """
  inv = 1.0 / q
  i = jnp.floor((j.astype(jnp.float32) + 0.5) * inv).astype(jnp.int32)
  return i + jnp.floor(((j - i * q).astype(jnp.float32) + 0.5) * inv).astype(jnp.int32)


def _resolve_selection(leaves, params):
  if leaves is None:
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  if callable(leaves):
    return leaves(params)
  return leaves


def sparse_mask(
    inner: optax.GradientTransformation,
    density: float,
    *,
    reset_interval: int = 500,
    key: chex.PRNGKey,
    leaves: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs `inner` on a random subset of each selected leaf; the other entries get zero update.

  For each selected leaf a subset of about ``d`` of its entries is drawn from `key` and the reset
  index ``r = k // ΔT``, so it is re-drawn at every update with ``k % ΔT == 0``. `inner` sees, for a
  selected leaf, the flat vector of the subset's gradients (and parameters); unselected leaves reach
  it whole. Its state therefore exists only for the selected entries: at density d the optimizer
  state is about ``d`` x the dense state, plus a key and a count. No mask is stored; the subset is
  regenerated from the key at every update (see the module docstring for how it is drawn).

  `inner` should zero its moments on the same schedule (`scale_by_adam_with_reset` with the same
  ``reset_interval``, as `spam` does): `sparse_mask` does not touch `inner`'s state, so moments
  kept across a re-draw would belong to other entries.

  Example:
    >>> import jax, optax, spam_optax as spam
    >>> tx = optax.chain(
    ...     spam.sparse_mask(spam.scale_by_adam_with_reset(reset_interval=500), 0.25,
    ...                      reset_interval=500, key=jax.random.key(0)),
    ...     optax.scale_by_learning_rate(1e-3))

  Args:
    inner: the transform to run on the subsets.
    density: d in (0, 1], the fraction of each selected leaf that is updated.
    reset_interval: ΔT; the subset is re-drawn at every update k with k % ΔT == 0.
    key: a `jax.random.key`; the subsets are a pure function of it.
    leaves: which leaves are sparse: a pytree of bools matching the parameters, or a callable
      ``params -> pytree of bools`` (as in `optax.masked`). Default: every leaf with ndim >= 2.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SparseMaskState`.

  References:
    Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training, ICLR 2025.
  """
  _validate.check("density", density, lambda d: 0.0 < d <= 1.0, "in (0, 1]")
  if _validate.concrete(density) is None:
    raise ValueError(f"density must be a Python float in (0, 1] (it fixes state shapes), got {density!r}")
  _validate.check_int("reset_interval", reset_interval, 1)
  if key is None:
    raise ValueError("key must be a jax.random.key when density < 1 (the subsets derive from it)")
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # accept a raw uint32 key, store a typed one
  inner = optax.with_extra_args_support(inner)

  def subsets(tree, key, r):
    """Per leaf of `tree`: None (dense) or its `Strata` for reset index r."""
    selection, treedef = jax.tree.flatten(_resolve_selection(leaves, tree))
    strata = []
    for i, (sel, x) in enumerate(zip(selection, treedef.flatten_up_to(tree))):
      n = int(np.size(x))
      leaf_key = jax.random.fold_in(jax.random.fold_in(key, i), r)
      strata.append(Strata.draw(leaf_key, n, subset_size(n, density)) if sel and n else None)
    return treedef, strata

  def take(treedef, strata, tree):
    return treedef.unflatten([
        x if st is None else jnp.ravel(x)[st.indices()]
        for x, st in zip(treedef.flatten_up_to(tree), strata)
    ])

  def init_fn(params):
    treedef, strata = subsets(params, key, 0)
    inner_state = inner.init(take(treedef, strata, params))
    return SparseMaskState(count=jnp.zeros([], jnp.int32), key=key, inner_state=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    k = _schedules.update_index(state.count)
    treedef, strata = subsets(updates, state.key, _schedules.reset_index(k, reset_interval))
    params = None if params is None else take(treedef, strata, params)
    inner_updates, inner_state = inner.update(
        take(treedef, strata, updates), state.inner_state, params, **extra_args
    )
    # Entries outside the subset get exactly zero update (no SGD step, no weight decay).
    full = [
        u if st is None else st.expand(u, g.shape)
        for g, u, st in zip(treedef.flatten_up_to(updates), treedef.flatten_up_to(inner_updates), strata)
    ]
    new_state = SparseMaskState(optax.safe_increment(state.count), state.key, inner_state)
    return treedef.unflatten(full), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
