"""bf16 optimizer state that still decays: stochastic rounding of SPAM's and Stable-SPAM's moments."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spam_optax as spam
from _jit_steps import jitted_steps
from spam_optax import _rounding

N = 10_000  # entries
NO_RESET = dict(threshold=0.0, reset_interval=10**6, warmup_steps=1)
BF16 = dict(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)


def _adam_state(state):
  """The moment-holding state inside a spam / stable_spam chain."""
  cls = (spam.ScaleByAdamWithResetState, spam.ScaleBySpamAdamState, spam.ScaleByStableSpamAdamState)
  found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]
  return found[0]


def mean_v_trajectory(tx):
  """Gradient 1 for 2,000 updates, then 0 for 3,000; the mean of v after every update."""
  p = {"w": jnp.zeros(N)}
  grads = jnp.concatenate([jnp.ones(2000), jnp.zeros(3000)])

  def body(state, g):
    _, state = tx.update({"w": jnp.full(N, g)}, state, p)
    return state, jnp.mean(_adam_state(state).nu["w"].astype(jnp.float32))

  _, means = jax.jit(lambda s: jax.lax.scan(body, s, grads))(tx.init(p))
  return np.asarray(means)


@pytest.mark.parametrize("make", [
    lambda **kw: spam.spam(1e-3, **NO_RESET, **kw),
    lambda **kw: optax.chain(spam.scale_by_stable_spam_adam(reset_interval=0, **kw),
                             optax.scale_by_learning_rate(1e-3)),
], ids=["spam", "stable_spam_adam"])
def test_bf16_v_with_stochastic_rounding_follows_float32_and_nearest_sticks(make):
  f32 = mean_v_trajectory(make())
  sr = mean_v_trajectory(make(**BF16))
  nearest = mean_v_trajectory(make(**BF16, rounding="nearest"))
  every = np.arange(499, 5000, 500)  # updates 500, 1000, ..., 5000
  np.testing.assert_allclose(f32[1999], 1 - 0.999**2000, rtol=1e-4)  # the peak, 0.865
  np.testing.assert_allclose(f32[-1], (1 - 0.999**2000) * 0.999**3000, rtol=1e-3)  # 0.043
  # Stochastic rounding: within 5% of float32 at every 500th update (measured: within 0.2%).
  np.testing.assert_allclose(sr[every], f32[every], rtol=0.05)
  # Nearest: v stops growing at 0.25 (0.999 v + 0.001 is within half an ulp of 0.25) and never
  # decays (0.999 * 0.25 rounds back to 0.25): the authors' pure-bf16 behaviour.
  np.testing.assert_array_equal(nearest[every], np.full(len(every), 0.25, np.float32))


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
  store = jax.jit(_rounding.store, static_argnums=(1, 2, 4, 5))
  for dtype, x in ((jnp.bfloat16, 0.2507), (jnp.float16, 0.2507), (jnp.bfloat16, -3.1e-3),
                   (jnp.float8_e4m3fn, 0.3), (jnp.float8_e5m2, -0.3)):
    xs = jnp.full((200_000,), x, jnp.float32)
    y = store(xs, dtype, "stochastic", jnp.int32(7), 3, _rounding.STREAM_NU)
    assert y.dtype == dtype
    values = np.unique(np.asarray(y, np.float64))
    assert len(values) == 2 and values[0] < x < values[1]  # the two neighbours in dtype
    ulp = values[1] - values[0]
    assert abs(float(np.mean(np.asarray(y, np.float64))) - x) < 0.01 * ulp
  exact = jnp.asarray([0.0, -0.0, 0.25, 1.5, -2.0, jnp.inf, -jnp.inf], jnp.float32)
  for dtype in (jnp.bfloat16, jnp.float16, jnp.float8_e5m2):
    got = store(exact, dtype, "stochastic", jnp.int32(1), 0, 0)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(exact))
    assert np.isnan(np.asarray(store(jnp.asarray([jnp.nan]), dtype, "stochastic", jnp.int32(1), 0,
                                     0), np.float32)).all()


def test_random_bits_differ_by_count_leaf_moment_and_position():
  base = _rounding.random_bits((64, 32), jnp.int32(5), 0)
  assert len(np.unique(np.asarray(base))) > 2000  # positions differ
  halves = lambda b: [np.asarray(_rounding.half_bits(b, s), np.float64).ravel()
                      for s in (_rounding.STREAM_MU, _rounding.STREAM_NU)]
  mu, nu = halves(base)
  assert mu.max() < 2**16 and nu.max() < 2**16
  assert abs(np.corrcoef(mu, nu)[0, 1]) < 0.1  # m and v of an entry use independent bits
  for other in (_rounding.random_bits((64, 32), jnp.int32(6), 0),
                _rounding.random_bits((64, 32), jnp.int32(5), 1)):
    assert np.mean(np.asarray(other) == np.asarray(base)) < 0.01
    for a, b in zip(halves(base), halves(other)):
      assert abs(np.corrcoef(a, b)[0, 1]) < 0.1
  # the flat position, not the shape, decides: a (64, 32) leaf and its (2048,) view agree
  flat = _rounding.random_bits((2048,), jnp.int32(5), 0)
  np.testing.assert_array_equal(np.asarray(base).ravel(), np.asarray(flat))


def _run(tx, params, steps, state=None):
  state = tx.init(params) if state is None else state
  update = jax.jit(tx.update)
  for k in range(steps):
    g = jax.tree.map(lambda x: jnp.cos(x.astype(jnp.float32) * (k + 1)).astype(x.dtype), params)
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


@pytest.mark.parametrize("make", [lambda: spam.spam(1e-2, **BF16, reset_interval=5, warmup_steps=2,
                                                     clip_delay=2),
                                  lambda: spam.stable_spam(1e-2, **BF16, reset_interval=5)],
                         ids=["spam", "stable_spam"])
def test_same_inputs_same_state_and_a_restore_continues_identically(make):
  params = {"w": jnp.linspace(-1, 1, 64).reshape(8, 8).astype(jnp.bfloat16), "b": jnp.ones(5)}
  a = _run(make(), params, 12)
  b = _run(make(), params, 12)
  chex.assert_trees_all_equal(a, b)
  # stop after 7 updates, "restore" the state through host memory, continue for 5
  p7, s7 = _run(make(), params, 7)
  restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), s7)
  tx = make()
  state, p = restored, p7
  update = jax.jit(tx.update)
  for k in range(7, 12):
    g = jax.tree.map(lambda x: jnp.cos(x.astype(jnp.float32) * (k + 1)).astype(x.dtype), p)
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
  chex.assert_trees_all_equal((p, state), a)


def test_stochastic_and_nearest_differ_only_for_narrow_state():
  params = {"w": jnp.linspace(-1, 1, 64).reshape(8, 8)}
  f32_sr = _run(spam.spam(1e-2), params, 6)
  f32_rn = _run(spam.spam(1e-2, rounding="nearest"), params, 6)
  chex.assert_trees_all_equal(f32_sr, f32_rn)
  bf_sr = _run(spam.spam(1e-2, **BF16), params, 6)
  bf_rn = _run(spam.spam(1e-2, **BF16, rounding="nearest"), params, 6)
  assert not np.array_equal(np.asarray(_adam_state(bf_sr[1]).nu["w"], np.float32),
                            np.asarray(_adam_state(bf_rn[1]).nu["w"], np.float32))


def test_float32_state_compiles_to_the_same_program_either_way():
  params = {"w": jnp.ones((16, 8)), "b": jnp.ones(8)}

  def text(tx):
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    return jax.jit(step).lower(params, tx.init(params), params).as_text(debug_info=False)

  assert text(spam.spam(1e-3)) == text(spam.spam(1e-3, rounding="nearest"))
  assert text(spam.stable_spam(1e-3)) == text(spam.stable_spam(1e-3, rounding="nearest"))


@pytest.mark.parametrize("make", [lambda: spam.spam(1e-3, **BF16, reset_interval=3, warmup_steps=1,
                                                     clip_delay=1),
                                  lambda: spam.stable_spam(1e-3, **BF16, reset_interval=3),
                                  lambda: spam.spam(1e-3, **BF16, density=0.5, key=jax.random.key(0),
                                                    reset_interval=3, warmup_steps=1, clip_delay=1)],
                         ids=["spam", "stable_spam", "spam_sparse"])
def test_jit_does_not_recompile_and_state_dtypes_do_not_drift(make):
  p = {"w": jnp.ones((8, 8), jnp.bfloat16), "b": jnp.ones(8, jnp.float32)}
  p, state, _ = jitted_steps(make(), p, 7)  # crosses resets
  moments = _adam_state(state)
  assert {x.dtype for x in jax.tree.leaves((moments.mu, moments.nu))} == {jnp.dtype(jnp.bfloat16)}
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(p))


def test_inject_hyperparams_with_bf16_state():
  p = {"w": jnp.linspace(-1, 1, 6)}
  plain = spam.spam(1e-2, **BF16, reset_interval=50, warmup_steps=10, clip_delay=5)
  # dtypes are static (a scalar type such as jnp.bfloat16 is callable and would be taken for a
  # schedule); the rounding mode, a string, is static anyway.
  inj = optax.inject_hyperparams(spam.spam, static_args=("mu_dtype", "nu_dtype"))(
      learning_rate=1e-2, **BF16, reset_interval=50, warmup_steps=10, clip_delay=5)
  s1, s2 = plain.init(p), inj.init(p)
  for k in range(5):
    g = {"w": jnp.cos(p["w"] * k)}
    u1, s1 = plain.update(g, s1, p)
    u2, s2 = jax.jit(inj.update)(g, s2, p)
    chex.assert_trees_all_close(u1, u2, rtol=1e-2, atol=1e-6)
  assert _adam_state(s2).nu["w"].dtype == jnp.bfloat16


def test_bad_rounding_is_a_clear_error():
  for factory in (spam.spam, spam.stable_spam):
    with pytest.raises(ValueError, match="rounding must be one of"):
      factory(1e-3, rounding="up")
  with pytest.raises(ValueError, match="rounding"):
    spam.scale_by_adam_with_reset(rounding="truncate")


def test_bf16_chain_of_spike_clip_and_adam_equals_the_fused_alias():
  """spike_clip's v and Adam's v draw the same bits, so the documented chain still equals spam."""
  kw = dict(reset_interval=6, clip_delay=2)
  chain = optax.chain(
      spam.spike_clip(5.0, nu_dtype=jnp.bfloat16, **kw),
      spam.scale_by_adam_with_reset(reset_interval=6, **BF16),
      optax.scale_by_schedule(spam.reset_warmup_schedule(6, 2)),
      optax.scale_by_learning_rate(1e-2))
  alias = spam.spam(1e-2, threshold=5.0, warmup_steps=2, **kw, **BF16)
  params = {"w": jnp.linspace(-1, 1, 64).reshape(8, 8), "b": jnp.ones(5)}
  pc, sc = _run(chain, params, 14)
  pa, sa = _run(alias, params, 14)
  chex.assert_trees_all_close(pc, pa, rtol=1e-6)
  chex.assert_trees_all_equal(sc[0].nu, _adam_state(sa).nu)
