"""SPAM's behaviour against the SPEC: reference trajectory, the chain, the calendar, the clip."""

from __future__ import annotations


import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import spam_optax as spam
from spam_optax._spike_clip import clip_spikes
from tests.spam_reference import spam_trajectory

DT, N, CD = 10, 4, 3  # small reset interval, warmup and clip delay so 45 updates cross 4 resets
SPIKES = {7: 1e3, 14: -5e4, 23: 1e4, 31: 3e3, 42: -1e5}  # update k -> gradient multiplier


def grad_fn(p, k):
  """A quadratic's gradient with occasional huge spikes (so clipping and resets both matter)."""
  xp = jnp if isinstance(p["w"], jax.Array) else np
  g = {"w": 2.0 * (p["w"] - 0.5), "b": p["b"] * xp.asarray([1.0, -3.0, 0.5])}
  if k in SPIKES:
    g = {n: x * SPIKES[k] for n, x in g.items()}
  return g


P0 = {"w": np.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": np.asarray([0.3, -0.2, 0.1])}


def run(tx, steps, p0=P0, dtype=jnp.float64):
  p = {n: jnp.asarray(x, dtype) for n, x in p0.items()}
  state = tx.init(p)
  update = jax.jit(tx.update)
  out = []
  for k in range(1, steps + 1):
    u, state = update(grad_fn(p, k), state, p)
    p = optax.apply_updates(p, u)
    out.append(p)
  return out


@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("schedule", [False, True])
def test_matches_float64_reference_across_resets(restart, schedule):
  lr = optax.cosine_decay_schedule(1e-2, 45, alpha=0.1) if schedule else 1e-2
  kwargs = dict(threshold=50.0, reset_interval=DT, warmup_steps=N, clip_delay=CD, weight_decay=0.01,
                restart_bias_correction=restart)
  with jax.enable_x64(True):
    got = run(spam.spam(lr, **kwargs), 45)
    want = spam_trajectory(P0, grad_fn, 45, lr=lr, **kwargs)
    for k, (g, w) in enumerate(zip(got, want), start=1):
      for n in w:
        np.testing.assert_allclose(np.asarray(g[n]), w[n], rtol=1e-9, atol=1e-12, err_msg=f"update {k}, {n}")


def test_reference_is_sensitive_to_each_quirk():
  """The reference test above can fail: each SPEC quirk changes the trajectory."""
  kwargs = dict(lr=1e-2, threshold=50.0, reset_interval=DT, warmup_steps=N, clip_delay=CD)
  base = spam_trajectory(P0, grad_fn, 45, **kwargs)[-1]["w"]
  for other in [dict(restart_bias_correction=True), dict(clip_delay=1), dict(threshold=0.0),
                dict(warmup_steps=1)]:
    changed = spam_trajectory(P0, grad_fn, 45, **{**kwargs, **other})[-1]["w"]
    assert not np.allclose(changed, base, rtol=1e-6), other


def test_alias_equals_documented_chain():
  theta, lr = 50.0, 1e-2
  chain = optax.chain(
      spam.spike_clip(theta, b2=0.999, reset_interval=DT, clip_delay=CD),
      spam.scale_by_adam_with_reset(0.9, 0.999, 1e-6, reset_interval=DT),
      optax.scale_by_schedule(spam.reset_warmup_schedule(DT, N)),
      optax.scale_by_learning_rate(lr),
  )
  alias = spam.spam(lr, threshold=theta, reset_interval=DT, warmup_steps=N, clip_delay=CD)
  for got, want in zip(run(alias, 45, dtype=jnp.float32), run(chain, 45, dtype=jnp.float32)):
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


def test_alias_state_holds_one_m_and_one_v():
  p = {n: jnp.asarray(x, jnp.float32) for n, x in P0.items()}
  state = spam.spam(1e-3).init(p)
  n_params = sum(x.size for x in jax.tree.leaves(p))
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
  assert n_state == 2 * n_params


def test_warmup_values_for_n4():
  warm = spam.reset_warmup_schedule(reset_interval=10, warmup_steps=4)
  got = [float(warm(c)) for c in range(9, 15)]  # updates k = 10 (a reset) ... 15
  np.testing.assert_allclose(got, [0.01, 0.1045, 0.352, 0.658, 1.0, 1.0], atol=6e-4)
  assert [float(warm(c)) for c in range(0, 9)] == [1.0] * 9  # no warmup before the first reset


def test_worked_clipping_example():
  v = jnp.float32(1 - 0.999**30)
  np.testing.assert_allclose(float(v), 0.02957, rtol=1e-3)
  clipped = clip_spikes(jnp.float32(1000.0), v, 5000.0)
  np.testing.assert_allclose(float(clipped), 12.159, rtol=1e-4)
  assert float(clip_spikes(jnp.float32(-1000.0), v, 5000.0)) == -float(clipped)
  assert float(clip_spikes(jnp.float32(10.0), v, 5000.0)) == 10.0
  assert float(clip_spikes(jnp.float32(1000.0), v, 0.0)) == 1000.0  # θ = 0 disables
  assert float(clip_spikes(jnp.float32(1000.0), v, 5000.0, nullify=True)) == 0.0
  assert float(clip_spikes(jnp.float32(10.0), v, 5000.0, nullify=True)) == 10.0


@settings(max_examples=60, deadline=None)
@given(
    g=hnp.arrays(np.float32, st.integers(1, 20), elements=st.floats(-1e6, 1e6, width=32)),
    v=hnp.arrays(np.float32, st.integers(1, 20), elements=st.floats(0, 10, width=32)),
    theta=st.floats(1.0, 1e4),
)
def test_clip_bounded_and_sign_preserving(g, v, theta):
  v = np.resize(v, g.shape)
  # keep g², v and θ v out of float32's subnormals, which XLA on CPU flushes to zero
  g = np.where(np.abs(g) < 1e-10, np.float32(0), g)
  v = np.where(v < 1e-30, np.float32(0), v)
  out = np.asarray(clip_spikes(jnp.asarray(g), jnp.asarray(v), np.float32(theta)))
  bound = np.sqrt(np.float32(theta) * v)
  spiked = g.astype(np.float64) ** 2 > theta * v.astype(np.float64) * (1 + 1e-5)
  assert np.all(np.abs(out[spiked]) <= bound[spiked] * (1 + 1e-6))  # never beyond sqrt(θ v)
  assert np.all(np.abs(out) <= np.abs(g))
  assert np.all((np.sign(out) == np.sign(g)) | ((out == 0) & (bound == 0)))  # sign kept
  kept = g.astype(np.float64) ** 2 <= theta * v.astype(np.float64) * (1 - 1e-5)
  np.testing.assert_array_equal(out[kept], g[kept])


def _clip_events(interval, delay, steps):
  """Updates k at which spike_clip actually clipped a 1e6 spike injected at every update."""
  tx = spam.spike_clip(10.0, reset_interval=interval, clip_delay=delay)
  p = {"x": jnp.ones(3)}
  state, clipped_at = tx.init(p), []
  for k in range(1, steps + 1):
    g = {"x": jnp.full(3, 1e6 if k % 2 == 0 else 1.0)}
    out, state = tx.update(g, state)
    if float(out["x"][0]) != float(g["x"][0]):
      clipped_at.append(k)
  return clipped_at


@settings(max_examples=8, deadline=None)
@given(interval=st.integers(4, 9), delay=st.integers(1, 3))
def test_no_clipping_inside_delay_windows(interval, delay):
  events = _clip_events(interval, delay, 3 * interval)
  assert all(k >= delay and k % interval >= delay for k in events)
  # and every spiked (even) update outside the windows is clipped
  spiked_outside = {k for k in range(2, 3 * interval + 1, 2) if k >= delay and k % interval >= delay}
  assert spiked_outside <= set(events)


def test_resets_exactly_at_multiples_of_interval():
  tx = spam.scale_by_adam_with_reset(reset_interval=4)
  p = jnp.ones(2)
  state, m_norms = tx.init(p), []
  for _ in range(1, 13):
    _, state = tx.update(jnp.ones(2), state)
    m_norms.append(float(state.mu[0]))
  # m after update k: (1 - 0.9^j) where j counts updates since the last reset, inclusive
  j = [k % 4 + 1 if k >= 4 else k for k in range(1, 13)]
  np.testing.assert_allclose(m_norms, [1 - 0.9**i for i in j], rtol=1e-6)
  assert int(state.count) == 12 and state.count.dtype == jnp.int32


def test_reset_clears_nan_and_apply_if_finite_skips_the_step():
  p = {"w": jnp.ones(3)}
  tx = spam.spam(1e-2, reset_interval=5, warmup_steps=2, clip_delay=2)
  state = tx.init(p)
  nan_g = {"w": jnp.array([jnp.nan, 1.0, 1.0])}
  _, state = tx.update(nan_g, state, p)  # k = 1: NaN enters m and v
  assert np.isnan(np.asarray(state[0][0].mu["w"][0]))
  for _ in range(4):  # k = 2..5; k = 5 is a reset
    u, state = tx.update({"w": jnp.ones(3)}, state, p)
  assert np.all(np.isfinite(np.asarray(u["w"]))) and np.all(np.isfinite(np.asarray(state[0][0].mu["w"])))

  safe = optax.apply_if_finite(spam.spam(1e-2), max_consecutive_errors=3)
  state = safe.init(p)
  _, state = safe.update({"w": jnp.ones(3)}, state, p)
  before = state.inner_state
  for bad in (nan_g, {"w": jnp.array([jnp.inf, 1.0, 1.0])}):
    u, state = safe.update(bad, state, p)
    chex.assert_trees_all_equal(state.inner_state, before)
    chex.assert_trees_all_equal(u, {"w": jnp.zeros(3)})
  assert int(state.notfinite_count) == 2


def test_inf_gradient_is_clipped_once_clipping_is_active():
  p = {"w": jnp.ones(2)}
  tx = spam.spam(1e-2, reset_interval=50, warmup_steps=2, clip_delay=3)
  state = tx.init(p)
  for _ in range(3):
    _, state = tx.update({"w": jnp.ones(2)}, state, p)
  u, state = tx.update({"w": jnp.array([jnp.inf, 1.0])}, state, p)  # k = 4
  assert np.all(np.isfinite(np.asarray(u["w"]))) and np.all(np.isfinite(np.asarray(state[0][0].nu["w"])))


@pytest.mark.parametrize("factory, kwargs, name", [
    (spam.spam, dict(density=0.0, key=jax.random.key(0)), "density"),
    (spam.spam, dict(density=1.5), "density"),
    (spam.spam, dict(threshold=-1.0), "threshold"),
    (spam.spam, dict(reset_interval=0), "reset_interval"),
    (spam.spam, dict(reset_interval=100, warmup_steps=100), "warmup_steps"),
    (spam.spam, dict(b1=1.0), "b1"),
    (spam.spam, dict(b2=-0.1), "b2"),
    (spam.spam, dict(density=0.5), "key"),
    (spam.spam, dict(learning_rate=-1.0), "learning_rate"),
    (spam.spike_clip, dict(threshold=-5.0), "threshold"),
    (spam.reset_warmup_schedule, dict(reset_interval=10, warmup_steps=10), "warmup_steps"),
])
def test_bad_hyperparameters_raise_naming_the_argument(factory, kwargs, name):
  with pytest.raises(ValueError, match=name):
    factory(**kwargs)
