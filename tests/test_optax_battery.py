"""The optax battery for spam: convergence, jit, dtypes, shapes, and composition with optax and NNX."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import spam_optax as spam
from _jit_steps import jitted_steps

SMALL = dict(reset_interval=50, warmup_steps=10, clip_delay=5)


def minimise(tx, loss, p, steps):
  state = tx.init(p)

  @jax.jit
  def step(p, state):
    g = jax.grad(loss)(p)
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state

  for _ in range(steps):
    p, state = step(p, state)
  return p


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_converges_on_a_quadratic(density):
  target = jnp.linspace(-2, 2, 16).reshape(4, 4)
  loss = lambda p: jnp.sum((p["w"] - target) ** 2) + jnp.sum(p["b"] ** 2)
  p0 = {"w": jnp.zeros((4, 4)), "b": jnp.ones(3)}
  tx = spam.spam(0.05, density=density, key=jax.random.key(0), **SMALL)
  p = minimise(tx, loss, p0, 1000)
  assert float(loss(p)) < 1e-2 * float(loss(p0))


def test_converges_on_rosenbrock():
  loss = lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2
  p = minimise(spam.spam(0.02, **SMALL), loss, jnp.array([-1.0, 1.0]), 3000)
  np.testing.assert_allclose(np.asarray(p), [1.0, 1.0], atol=0.05)


@pytest.mark.parametrize("density", [1.0, 0.25])
def test_jit_does_not_recompile_and_dtypes_do_not_drift(density):
  p = {"w": jnp.ones((8, 8), jnp.bfloat16), "b": jnp.ones(8, jnp.float32)}
  tx = spam.spam(1e-3, density=density, key=jax.random.key(0), mu_dtype=jnp.float32, reset_interval=3,
                 warmup_steps=1, clip_delay=1)
  p, state, u = jitted_steps(tx, p, 7)  # crosses two resets and two re-draws
  assert u["w"].dtype == jnp.bfloat16 and p["w"].dtype == jnp.bfloat16
  inner = state[0][0] if density == 1.0 else state[0].inner_state[0]
  assert inner.mu["w"].dtype == jnp.float32 and inner.nu["w"].dtype == jnp.bfloat16
  assert state[0].count.dtype == jnp.int32 if density < 1 else inner.count.dtype == jnp.int32
  assert np.isfinite(np.asarray(p["w"], np.float32)).all()


@settings(max_examples=15, deadline=None)
@given(
    shapes=st.lists(st.sampled_from([(), (0,), (3,), (0, 4), (2, 3), (5, 1, 2)]), min_size=1, max_size=4),
    density=st.sampled_from([1.0, 0.3]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_random_pytrees_shapes_and_dtypes(shapes, density, dtype):
  p = {f"p{i}": jnp.full(s, 0.5, dtype) for i, s in enumerate(shapes)}
  tx = spam.spam(1e-2, density=density, key=jax.random.key(1), **SMALL)
  state = tx.init(p)
  u, state = jax.jit(tx.update)(p, state, p)
  chex.assert_trees_all_equal_shapes_and_dtypes(u, p)
  for x in jax.tree.leaves(u):
    assert np.isfinite(np.asarray(x, np.float32)).all()


def test_inject_hyperparams_equivalence_and_change():
  p = {"w": jnp.linspace(-1, 1, 6)}
  grads = [{"w": jnp.cos(p["w"] * k) * (100.0 if k == 9 else 1.0)} for k in range(12)]
  plain = spam.spam(1e-2, threshold=5.0, **SMALL)
  inj = optax.inject_hyperparams(spam.spam)(learning_rate=1e-2, threshold=5.0, **SMALL)
  s1, s2 = plain.init(p), inj.init(p)
  for g in grads:
    u1, s1 = plain.update(g, s1, p)
    u2, s2 = jax.jit(inj.update)(g, s2, p)
    chex.assert_trees_all_close(u1, u2, rtol=1e-4, atol=1e-7)  # injected β, ε are float32 arrays
  s2.hyperparams["learning_rate"] = jnp.asarray(2e-2)
  u3, _ = inj.update(grads[0], s2, p)
  u1, _ = plain.update(grads[0], s1, p)
  chex.assert_trees_all_close(u3, jax.tree.map(lambda x: 2 * x, u1), rtol=1e-4, atol=1e-7)


def test_multisteps_counts_real_updates_only():
  p = {"w": jnp.ones(4)}
  tx = optax.MultiSteps(spam.spam(1e-2, reset_interval=2, warmup_steps=1, clip_delay=1), every_k_schedule=3)
  state = tx.init(p)
  for i in range(9):
    u, state = tx.update({"w": jnp.full(4, float(i + 1))}, state, p)
    if (i + 1) % 3:
      chex.assert_trees_all_equal(u, {"w": jnp.zeros(4)})
  assert int(state.inner_opt_state[0][0].count) == 3
  # the real updates are spam on the averaged gradients 2, 5, 8
  ref = spam.spam(1e-2, reset_interval=2, warmup_steps=1, clip_delay=1)
  rs = ref.init(p)
  for g in (2.0, 5.0, 8.0):
    ru, rs = ref.update({"w": jnp.full(4, g)}, rs, p)
  chex.assert_trees_all_close(u, ru, rtol=1e-6)


def test_masked_and_partition():
  p = {"w": jnp.ones((3, 3)), "frozen": jnp.ones(3)}
  g = jax.tree.map(lambda x: 0.5 * x, p)
  masked = optax.masked(spam.spam(1e-2), {"w": True, "frozen": False})
  u, _ = masked.update(g, masked.init(p), p)
  chex.assert_trees_all_equal(u["frozen"], g["frozen"])  # masked-out leaves pass through
  full, _ = spam.spam(1e-2).update(g, spam.spam(1e-2).init(p), p)
  chex.assert_trees_all_close(u["w"], full["w"])
  part = optax.partition({"a": spam.spam(1e-2), "b": optax.set_to_zero()}, {"w": "a", "frozen": "b"})
  u, _ = part.update(g, part.init(p), p)
  chex.assert_trees_all_close(u["w"], full["w"])
  chex.assert_trees_all_equal(u["frozen"], jnp.zeros(3))


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_flax_nnx_optimizer(density):
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, spam.spam(1e-2, density=density, key=jax.random.key(0), **SMALL), wrt=nnx.Param)
  x, y = jnp.ones((8, 4)), jnp.zeros((8, 3))
  loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  first = float(step(model, opt))
  for _ in range(100):
    last = float(step(model, opt))
  assert last < 0.5 * first


# The spike defences of other trainers (ZClip, MaxText-style step skipping) as chainable transforms.
COMPETITORS = {
    "zclip": lambda: optax.chain(spam.zclip(warmup_steps=2), spam.spam(1e-2, **SMALL)),
    "zclip_percentile": lambda: optax.chain(spam.zclip(warmup_steps=2, mode="percentile",
                                                       max_grad_norm=None), optax.adamw(1e-2)),
    "skip": lambda: spam.skip_step_on_spikes(spam.spam(1e-2, **SMALL), window=4, sigma=1.0),
}


@pytest.mark.parametrize("name", list(COMPETITORS))
def test_competitors_jit_once_dtypes_stable_and_converge(name):
  chex.clear_trace_counter()
  tx = COMPETITORS[name]()
  p = {"w": jnp.ones((4, 4), jnp.bfloat16), "b": jnp.ones(4, jnp.float32)}
  state = tx.init(p)
  dtypes = jax.tree.map(lambda x: x.dtype, state)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, state, k):
    g = jax.tree.map(lambda x: (x * (1 + 50.0 * (k % 5 == 4))).astype(x.dtype), p)  # spikes
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state

  for k in range(12):
    p, state = step(p, state, jnp.int32(k))
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x.dtype, state), dtypes)
  assert p["w"].dtype == jnp.bfloat16
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(p))
  assert float(jnp.abs(p["b"]).max()) < 1.0  # it moved towards 0


def test_competitors_inject_hyperparams():
  p = {"w": jnp.linspace(-1, 1, 6)}
  grads = [{"w": jnp.cos(p["w"] * k) * (30.0 if k == 7 else 1.0)} for k in range(10)]
  plain = spam.zclip(alpha=0.9, z_thresh=2.0, warmup_steps=3, max_grad_norm=None)
  inj = optax.inject_hyperparams(spam.zclip)(alpha=0.9, z_thresh=2.0, warmup_steps=3,
                                             max_grad_norm=None)
  s1, s2 = plain.init(p), inj.init(p)
  for g in grads:
    u1, s1 = plain.update(g, s1)
    u2, s2 = jax.jit(inj.update)(g, s2)
    chex.assert_trees_all_close(u1, u2, rtol=1e-5)
  s2.hyperparams["z_thresh"] = jnp.asarray(1e6)  # nothing is a spike any more
  u, _ = inj.update(grads[7], s2)
  chex.assert_trees_all_close(u, grads[7], rtol=1e-6)
  skip = optax.inject_hyperparams(spam.skip_step_on_spikes, static_args=("window", "min_history"))(
      inner=optax.sgd(1e-2), window=4, sigma=2.0)
  s = skip.init(p)
  for g in grads:
    u, s = jax.jit(skip.update)(g, s, p)
  assert int(s.inner_state.total_skipped) == 1  # the x30 step


def test_competitors_under_multisteps_count_real_updates():
  p = {"w": jnp.ones(4)}
  for inner in (optax.chain(spam.zclip(warmup_steps=2), optax.sgd(1.0)),
                spam.skip_step_on_spikes(optax.sgd(1.0), window=4)):
    tx = optax.MultiSteps(inner, every_k_schedule=3)
    state = tx.init(p)
    for i in range(9):
      _, state = tx.update({"w": jnp.full(4, float(i + 1))}, state, p)
    counts = [int(x.count) for x in jax.tree.leaves(
        state.inner_opt_state, is_leaf=lambda x: isinstance(x, (spam.ZClipState,
                                                                spam.SkipStepOnSpikesState)))
              if isinstance(x, (spam.ZClipState, spam.SkipStepOnSpikesState))]
    assert counts == [3]


DONATABLE = {
    **COMPETITORS,
    "spam": lambda: spam.spam(1e-2, **SMALL),
    "spam_sparse": lambda: spam.spam(1e-2, density=0.5, key=jax.random.key(0), count_clipped=True,
                                     **SMALL),
    "stable_spam": lambda: spam.stable_spam(1e-2, total_steps=10),
    "spike_monitor": lambda: optax.chain(spam.spike_monitor(5.0), optax.adam(1e-2)),
    "scale": lambda: spam.scale(1e-2),
}


@pytest.mark.parametrize("name", list(DONATABLE))
def test_a_state_built_outside_jit_can_be_donated(name):
  # Training loops donate the state to the jitted step; an init that puts one array in two places
  # of the state makes that fail ("Attempt to donate the same buffer twice").
  p = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
  state = DONATABLE[name]().init(p)
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)
              if isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
  assert len(pointers) == len(set(pointers))
  jax.block_until_ready(jax.jit(lambda s: s, donate_argnums=0)(state))


# optax/contrib/_common_test.py's test_optimizers_can_be_wrapped_in_inject_hyperparams, ported: the
# injected optimizer must give the same updates *and the same state structure* as the plain one.
INJECTABLE = [
    ("spam", spam.spam, dict(learning_rate=1e-2)),
    ("spam_wd", spam.spam, dict(learning_rate=1e-2, weight_decay=0.1)),
    ("spam_wd0", spam.spam, dict(learning_rate=1e-2, weight_decay=0.0)),
    ("stable_spam", spam.stable_spam, dict(learning_rate=1e-2)),
    ("stable_spam_wd", spam.stable_spam, dict(learning_rate=1e-2, weight_decay=0.1)),
    ("stable_spam_total", spam.stable_spam, dict(learning_rate=1e-2, total_steps=100)),
]


@pytest.mark.parametrize("name,factory,hparams", INJECTABLE, ids=[n for n, _, _ in INJECTABLE])
def test_optimizers_can_be_wrapped_in_inject_hyperparams(name, factory, hparams):
  import inspect
  opt = factory(**hparams)
  static_args = tuple(a for a in ("warmup_steps", "num_betas", "clip_value_fn", "ns_steps", "rank",
                                  "update_proj_gap")
                      if a in inspect.signature(factory).parameters)
  opt_inject = optax.inject_hyperparams(factory, static_args)(**hparams)
  params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]
  state = jax.jit(opt.init)(params)
  updates, new_state = jax.jit(opt.update)(grads, state, params)
  state_inject = jax.jit(opt_inject.init)(params)
  updates_inject, new_state_inject = jax.jit(opt_inject.update)(grads, state_inject, params)
  chex.assert_trees_all_close(updates_inject, updates, rtol=1e-5)
  assert jax.tree.structure(state_inject.inner_state) == jax.tree.structure(state)
  chex.assert_trees_all_close(new_state_inject.inner_state, new_state, rtol=1e-5, atol=1e-5)
