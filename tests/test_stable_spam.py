"""Stable-SPAM (SPEC §3): NumPy float64 reference, corrected mode, sharding, jit, dtypes, wrappers."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spam_optax._adaptive_clip import AdaptiveSpikeClipState, adaptive_spike_clip
from spam_optax._adaptive_norm import AdaptiveGradNormState, adaptive_grad_norm
from spam_optax._stable_spam import (
    ScaleByStableSpamAdamState,
    scale_by_stable_spam_adam,
    stable_spam,
    stable_spam_momentum_scale,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------
# NumPy float64 reference, written from SPEC §3 (the official PyTorch step, one tensor at a time).
# --------------------------------------------------------------------------------------------------


class ReferenceStableSpam:
  """Stable-SPAM as SPEC §3 describes the official code, in float64 NumPy.

  Mirrors the official step's object semantics: on a reset the *stored* moments are replaced by new
  zero arrays while the local names still point at the old ones, which this update then modifies
  in place and uses (official); with `corrected` the local names point at the new zeros.
  """

  def __init__(self, lr, *, b1=0.9, b2=0.999, eps=1e-8, gamma1=0.7, gamma2=0.9, gamma3=0.999,
               gap=1000, total_t=None, eta_min=0.5, wd=0.0, corrected=False):
    self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
    self.gamma1, self.gamma2, self.gamma3 = gamma1, gamma2, gamma3
    self.gap, self.total_t, self.eta_min, self.wd = gap, total_t, eta_min, wd
    self.corrected = corrected
    self.total_steps = 0
    self.state = {}
    self.clip_events = []  # (T, leaf index, number of clipped entries)

  def scale(self):
    if self.total_t is None:
      return 1.0
    t = self.total_steps
    return self.eta_min + (1 - self.eta_min) * (1 + math.cos(math.pi * t / (self.total_t + 1))) / 2

  def step(self, params, grads):
    self.total_steps += 1
    t = self.total_steps
    scale = self.scale()
    lr = self.lr(t - 1) if callable(self.lr) else self.lr
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
      p = np.array(p, np.float64) * (1 - lr * self.wd)  # 1. decoupled weight decay first
      g = np.array(g, np.float64)
      st = self.state.setdefault(i, dict(step=0, m=np.zeros_like(g), v=np.zeros_like(g),
                                         m_norm=0.0, v_norm=0.0, m_max=0.0))
      st["step"] += 1
      s = t if self.corrected else st["step"]  # statistics' bias-correction step
      # 2. AdaClip
      max_g = np.max(np.abs(g))
      st["m_max"] = self.gamma3 * st["m_max"] + (1 - self.gamma3) * max_g
      m_max_hat = st["m_max"] / (1 - self.gamma3 ** s)
      mask = np.abs(g) > m_max_hat
      if mask.sum() > 0:
        g[mask] = g[mask] / max_g * m_max_hat
        self.clip_events.append((t, i, int(mask.sum())))
      # 3. AdaGN
      n = np.linalg.norm(g)
      g1 = self.gamma1 * scale
      st["m_norm"] = g1 * st["m_norm"] + (1 - g1) * n
      st["v_norm"] = self.gamma2 * st["v_norm"] + (1 - self.gamma2) * n ** 2
      c = (st["m_norm"] / (1 - g1 ** s)) / (math.sqrt(st["v_norm"] / (1 - self.gamma2 ** s))
                                            + self.eps)
      if n > 0:
        g = g / n * c
      # 4. reset
      m, v = st["m"], st["v"]
      if self.gap and t % self.gap == 0:
        st["m"], st["v"] = np.zeros_like(g), np.zeros_like(g)
        st["step"] = 1
        if self.corrected:
          m, v = st["m"], st["v"]
      # 5. Adam, PyTorch style
      beta1 = self.b1 * scale
      bc1 = 1 - beta1 ** st["step"]
      bc2 = 1 - self.b2 ** st["step"]
      m *= beta1
      m += (1 - beta1) * g
      v *= self.b2
      v += (1 - self.b2) * g * g
      denom = np.sqrt(v) / math.sqrt(bc2) + self.eps
      p = p - (lr / bc1) * m / denom
      out.append(p)
    return out


def _gradient_stream(n_steps, shapes, seed=0):
  """Gradients with spikes (single entries x1e3, a whole tensor x50) and an all-zero step."""
  rng = np.random.default_rng(seed)
  stream = []
  for t in range(1, n_steps + 1):
    gs = []
    for i, shape in enumerate(shapes):
      g = rng.normal(size=shape) * (0.1 + 0.05 * i)
      if t % 5 == 3:  # entry spike
        g.flat[rng.integers(g.size)] *= 1e3
      if t % 11 == 7 and i == 0:  # whole-tensor norm spike
        g *= 50.0
      if t == 9 and i == 1:  # all-zero gradient for one leaf
        g[...] = 0.0
      gs.append(g)
    stream.append(gs)
  return stream


SHAPES = [(6, 5), (7,), (3, 2, 4)]


def _run_jax(tx, stream, params0):
  params = [jnp.asarray(p) for p in params0]
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  history = []
  for gs in stream:
    updates, state = step([jnp.asarray(g) for g in gs], state, params)
    params = optax.apply_updates(params, updates)
    history.append([np.asarray(p) for p in params])
  return history, state


def _run_ref(ref, stream, params0):
  params = [np.array(p) for p in params0]
  history = []
  for gs in stream:
    params = ref.step(params, gs)
    history.append([p.copy() for p in params])
  return history


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(gap=7),
        dict(gap=7, total_t=20, wd=0.1),  # cosine on b1/gamma1; runs past total_T + 1 (no clamp)
        dict(gap=6, gamma1=0.85, gamma2=0.99999, gamma3=0.999, wd=0.01, lr="schedule"),
        dict(gap=6, gamma3=0.6, total_t=30),  # fast max-EMA: the clip stays active after resets
    ],
    ids=["plain", "cosine-wd", "bf16-gammas-lr-schedule", "fast-clip"],
)
@pytest.mark.parametrize("corrected", [False, True], ids=["official", "corrected"])
def test_matches_float64_reference(kwargs, corrected):
  kwargs = dict(kwargs)
  n_steps = 26  # three resets and a half
  stream = _gradient_stream(n_steps, SHAPES)
  rng = np.random.default_rng(1)
  params0 = [rng.normal(size=s) for s in SHAPES]
  if kwargs.pop("lr", None) == "schedule":
    # Linear warmup then linear decay, in float64 (optax's own schedules round to float32).
    lr = lambda c: 1e-2 * jnp.minimum(1.0, (jnp.asarray(c).astype(float) + 1) / 5) * (1 - 0.02 * c)
    ref_lr = lambda c: 1e-2 * min(1.0, (c + 1) / 5) * (1 - 0.02 * c)
  else:
    lr = ref_lr = 1e-2
  ref = ReferenceStableSpam(ref_lr, corrected=corrected, **kwargs)
  expected = _run_ref(ref, stream, params0)
  with jax.enable_x64(True):
    tx = stable_spam(
        lr, gamma1=ref.gamma1, gamma2=ref.gamma2, gamma3=ref.gamma3, reset_interval=ref.gap,
        total_steps=ref.total_t, weight_decay=ref.wd, corrected_reset=corrected,
    )
    got, state = _run_jax(tx, stream, params0)
    chex.assert_trees_all_equal_dtypes(state, tx.init([jnp.asarray(p) for p in params0]))
  for t, (e, g) in enumerate(zip(expected, got), start=1):
    for leaf, (a, b) in enumerate(zip(e, g)):
      np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12, err_msg=f"update {t}, leaf {leaf}")
  # The stream must exercise what it claims: clipping happened before the first reset, and after
  # it wherever the bias correction does not switch it off (see the quirk test below).
  clip_steps = {t for t, _, _ in ref.clip_events}
  assert any(t < ref.gap for t in clip_steps)
  if corrected or ref.gamma3 < 0.9:
    assert any(t > ref.gap for t in clip_steps)


def test_reference_checks_itself_against_hand_numbers():
  """The reference's reset semantics on a scalar with constant gradient 1 (gap = 2).

  Official: T=2 uses the old moments with s=1; T=3 starts from the stored zeros with s=2.
  Corrected: T=2 is a fresh first step; T=3 continues from it with s=2.
  """
  b1, b2 = 0.9, 0.999
  m2, v2 = b1 * (1 - b1) + (1 - b1), b2 * (1 - b2) + (1 - b2)
  official = [1.0, (m2 / (1 - b1)) / (math.sqrt(v2) / math.sqrt(1 - b2)),
              ((1 - b1) / (1 - b1 ** 2)) / (math.sqrt(1 - b2) / math.sqrt(1 - b2 ** 2))]
  corrected = [1.0, 1.0, 1.0]
  for mode, want in ((False, official), (True, corrected)):
    # The Adam core alone (JAX) ...
    tx = scale_by_stable_spam_adam(b1, b2, eps=0.0, reset_interval=2, corrected_reset=mode)
    state = tx.init(jnp.zeros([]))
    got = []
    for _ in range(3):
      u, state = tx.update(jnp.ones([]), state)
      got.append(float(u))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # ... and the reference with clip and norm made inert (AdaGN maps g=1 to c=1 on a constant).
    ref = ReferenceStableSpam(1.0, eps=0.0, gap=2, corrected=mode)
    p = [np.zeros(())]
    ref_u = []
    for _ in range(3):
      new = ref.step(p, [np.ones(())])
      ref_u.append(float(p[0] - new[0]))
      p = new
    np.testing.assert_allclose(ref_u, want, rtol=1e-12)
  assert official[1] == pytest.approx(1.3438, abs=1e-4) and official[2] == pytest.approx(0.7441,
                                                                                       abs=1e-4)


def test_first_update_is_unit_adam_step():
  # AdaGN maps the first gradient to (almost) unit norm, Adam's first step is g/|g|.
  tx = stable_spam(1e-3)
  params = jnp.zeros(2)
  updates, _ = tx.update(jnp.array([3.0, 4.0]), tx.init(params), params)
  np.testing.assert_allclose(updates, [-1e-3, -1e-3], rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# The pieces on their own.
# --------------------------------------------------------------------------------------------------


def test_adaptive_clip_rescales_not_clamps():
  tx = adaptive_spike_clip(decay=0.5)
  state = tx.init(jnp.zeros(4))
  _, state = tx.update(jnp.array([1.0, -2.0, 0.5, 0.0]), state)
  g, state = tx.update(jnp.array([8.0, -7.0, 1.0, 0.0]), state)
  # m_max: 0.5 * 2 = 1, then 0.5 * 1 + 0.5 * 8 = 4.5; bias-corrected 4.5 / (1 - 0.5**2) = 6.
  # |8| and |-7| exceed 6: both are scaled by 6 / 8 (a rescale; a clamp would give -6).
  np.testing.assert_allclose(g, [6.0, -5.25, 1.0, 0.0], rtol=1e-6)
  chex.assert_type(state.count, jnp.int32)
  assert int(state.count) == 2


_CLIP = adaptive_spike_clip(decay=0.9)
_CLIP_UPDATE = jax.jit(_CLIP.update)
_NORM = adaptive_grad_norm(0.7, 0.9, 1e-8)
_NORM_UPDATE = jax.jit(_NORM.update)
_FLOATS = st.floats(-1e6, 1e6, width=32, allow_subnormal=False)
_LO, _HI = float(np.float32(1e-3)), float(np.float32(1e3))
_NORMAL_FLOATS = st.one_of(st.just(0.0), st.floats(_LO, _HI, width=32),
                           st.floats(-_HI, -_LO, width=32))


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    g1=hnp.arrays(np.float32, (9,), elements=_FLOATS),
    g2=hnp.arrays(np.float32, (9,), elements=_FLOATS),
)
def test_adaptive_clip_properties(g1, g2):
  state = _CLIP.init(jnp.zeros(9))
  _, state = _CLIP_UPDATE(jnp.asarray(g1), state)
  out, state = _CLIP_UPDATE(jnp.asarray(g2), state)
  out = np.asarray(out)
  m_hat = float(state.max_ema) / (1 - 0.9 ** 2)
  assert np.all(np.isfinite(out))
  assert np.all(np.sign(out) == np.sign(g2))
  keep = np.abs(g2) <= m_hat * (1 - 1e-5)
  np.testing.assert_array_equal(out[keep], g2[keep])  # entries under the threshold untouched
  assert np.all(np.abs(out) <= m_hat * (1 + 1e-5))
  # Rescaled entries share one factor (m_hat / max|g|): their ratios are kept. (Across the threshold
  # the order can flip: an entry just above it shrinks below unclipped ones, as in the official code.)
  big = np.abs(g2) > m_hat * (1 + 1e-5)
  if big.any():
    factor = out[big] / g2[big]
    np.testing.assert_allclose(factor, m_hat / np.max(np.abs(g2)), rtol=1e-4)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    gs=st.lists(hnp.arrays(np.float32, (5,), elements=_NORMAL_FLOATS), min_size=1, max_size=4),
)
def test_adaptive_grad_norm_properties(gs):
  b1, b2, eps = 0.7, 0.9, 1e-8
  update = _NORM_UPDATE
  state = _NORM.init(jnp.zeros(5))
  m = v = 0.0
  for k, g in enumerate(gs, start=1):
    out, state = update(jnp.asarray(g), state)
    n = float(np.linalg.norm(g.astype(np.float64)))
    m, v = b1 * m + (1 - b1) * n, b2 * v + (1 - b2) * n * n
    c = (m / (1 - b1 ** k)) / (math.sqrt(v / (1 - b2 ** k)) + eps)
    out = np.asarray(out)
    assert np.all(np.isfinite(out))
    if n == 0:
      np.testing.assert_array_equal(out, g)
    else:
      np.testing.assert_allclose(np.linalg.norm(out), c, rtol=1e-4)
      np.testing.assert_allclose(out * n, g * np.linalg.norm(out), rtol=1e-4, atol=1e-4 * n * c)


def test_adaptive_grad_norm_damps_a_norm_spike():
  tx = adaptive_grad_norm()
  state = tx.init(jnp.zeros(3))
  for _ in range(20):
    out, state = tx.update(jnp.array([1.0, 2.0, 2.0]), state)
  np.testing.assert_allclose(jnp.linalg.norm(out), 1.0, rtol=1e-5)  # steady norm -> ~1
  out, state = tx.update(jnp.array([100.0, 200.0, 200.0]), state)  # norm 3 -> 300
  # m = 0.7 m + 0.3 * 300, v = 0.9 v + 0.1 * 300**2 (bias corrections ~1 after 21 updates):
  m = 0.7 ** 21 * 0 + (1 - 0.7 ** 20) * 3 * 0.7 + 0.3 * 300
  v = (1 - 0.9 ** 20) * 9 * 0.9 + 0.1 * 300 ** 2
  want = (m / (1 - 0.7 ** 21)) / math.sqrt(v / (1 - 0.9 ** 21))
  np.testing.assert_allclose(jnp.linalg.norm(out), want, rtol=1e-5)
  assert want < 0.95  # a 100x norm spike leaves AdaGN with a norm below the steady 1


def test_pieces_compose_in_any_chain():
  # AdaClip + AdaGN in front of plain optax.adam (no reset core): runs, stays finite.
  tx = optax.chain(adaptive_spike_clip(), adaptive_grad_norm(), optax.adam(1e-2))
  params = {"a": jnp.ones((4, 4)), "b": jnp.ones(3)}
  state = tx.init(params)
  for t in range(5):
    g = jax.tree.map(lambda p: jnp.full_like(p, float(t)) * jnp.arange(p.size).reshape(p.shape),
                     params)
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  assert isinstance(state[0], AdaptiveSpikeClipState) and isinstance(state[1], AdaptiveGradNormState)


def test_official_quirk_inflates_clip_threshold_after_reset():
  """SPEC §3's reason for the corrected mode. After a reset at update r the official step restarts,
  so AdaClip's threshold is the long-run max EMA divided by 1 - gamma3**(T-r+1): about
  (1 - gamma3**r) / (gamma3' (T - r + 1)) times the usual max, ~630x on the first update after the
  first reset (gamma3 = 0.999, gap = 1000), still ~6x 100 updates later. A 30-sigma spike (about 9x
  the max EMA here) is clipped everywhere by the corrected mode, but not for the first ~110 updates
  after the reset by the official one."""
  gap, n = 1000, 1200
  rng = np.random.default_rng(0)
  stream = rng.normal(size=(n, 64)).astype(np.float32)
  spikes = np.arange(100, n, 10)
  stream[spikes, 0] = 30.0
  clipped = {}
  for name, interval in (("official", gap), ("corrected", 0)):
    tx = adaptive_spike_clip(0.999, bias_correction_reset_interval=interval)

    def body(state, g, tx=tx):
      out, state = tx.update(g, state)
      return state, out[0]

    _, first = jax.lax.scan(body, tx.init(jnp.zeros(64)), jnp.asarray(stream))
    clipped[name] = {int(i) + 1: bool(first[i] < 29.0) for i in spikes}  # keyed by update T
  assert all(clipped["corrected"].values())
  assert all(c for t, c in clipped["official"].items() if t < gap)  # same before the first reset
  # The spikes lift the max EMA to ~3.3, so 30 is clipped once 3.3 / (1 - 0.999**s) < 30, s > ~110.
  assert not any(c for t, c in clipped["official"].items() if gap < t <= gap + 90)
  assert all(c for t, c in clipped["official"].items() if t > gap + 130)


# --------------------------------------------------------------------------------------------------
# Robustness and wrappers.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("corrected", [False, True])
def test_zero_gradients_never_nan(corrected):
  tx = stable_spam(1e-2, reset_interval=3, total_steps=5, corrected_reset=corrected,
                   weight_decay=0.1)
  params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3), "empty": jnp.ones((0, 3))}
  state = tx.init(params)
  step = jax.jit(tx.update)
  zeros = jax.tree.map(jnp.zeros_like, params)
  ones = jax.tree.map(jnp.ones_like, params)
  for g in [zeros, zeros, zeros, ones, zeros, zeros, ones, zeros]:
    updates, state = step(g, state, params)
    for x in jax.tree.leaves((updates, state)):
      assert bool(jnp.all(jnp.isfinite(x))), (g, updates, state)
  # From zeros only (and no weight decay) the update is exactly zero.
  tx = stable_spam(1e-2, reset_interval=2)
  state = tx.init(params)
  for _ in range(4):
    updates, state = tx.update(zeros, state, params)
    assert all(float(jnp.max(jnp.abs(u), initial=0.0)) == 0.0 for u in jax.tree.leaves(updates))


def test_jit_no_recompilation_across_resets():
  traces = []
  tx = stable_spam(1e-3, reset_interval=3, total_steps=10)
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}

  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  state = tx.init(params)
  for t in range(10):  # crosses three resets and total_steps
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1 * (t + 1), p.dtype), params)
    params, state = step(params, state, grads)
  assert len(traces) == 1
  assert int(state[2].count) == 10


def test_inject_hyperparams_matches_and_is_mutable():
  params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4)}
  kwargs = dict(b1=0.8, gamma1=0.75, gamma3=0.99, reset_interval=4, total_steps=9, eta_min=0.4)
  plain = stable_spam(1e-2, **kwargs)
  injected = optax.inject_hyperparams(stable_spam)(learning_rate=1e-2, **kwargs)
  s_plain, s_inj = plain.init(params), injected.init(params)
  step_inj = jax.jit(injected.update)
  dtypes0 = jax.tree.map(lambda x: x.dtype, s_inj)
  for t in range(10):
    g = {"w": jnp.sin(jnp.arange(12.0).reshape(3, 4) * (t + 1))}
    u1, s_plain = plain.update(g, s_plain, params)
    u2, s_inj = step_inj(g, s_inj, params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-8)
  assert jax.tree.map(lambda x: x.dtype, s_inj) == dtypes0
  s_inj.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u, _ = step_inj(g, s_inj, params)
  assert float(jnp.max(jnp.abs(u["w"]))) == 0.0


def test_inject_hyperparams_traced_values_skip_checks_but_concrete_ones_are_checked():
  with pytest.raises(ValueError, match="gamma3"):
    optax.inject_hyperparams(stable_spam)(learning_rate=1e-3, gamma3=1.5).init(jnp.zeros(2))
  # Traced inside jit (re-created inside update): no error, works.
  tx = optax.inject_hyperparams(stable_spam)(learning_rate=lambda c: 1e-3 / (c + 1),
                                             reset_interval=2)
  state = tx.init(jnp.zeros(2))
  u, state = jax.jit(tx.update)(jnp.ones(2), state, jnp.zeros(2))
  assert bool(jnp.all(jnp.isfinite(u)))


def test_multisteps_counts_real_updates_only():
  k, n_real = 3, 7
  rng = np.random.default_rng(0)
  micro = rng.normal(size=(k * n_real, 5)).astype(np.float32)
  tx_ms = optax.MultiSteps(stable_spam(1e-2, reset_interval=3), every_k_schedule=k)
  tx = stable_spam(1e-2, reset_interval=3)
  update_ms, update = jax.jit(tx_ms.update), jax.jit(tx.update)
  p_ms = p = jnp.ones(5)
  s_ms, s = tx_ms.init(p_ms), tx.init(p)
  for i in range(n_real):
    for j in range(k):
      u, s_ms = update_ms(jnp.asarray(micro[i * k + j]), s_ms, p_ms)
      p_ms = optax.apply_updates(p_ms, u)
    u, s = update(jnp.asarray(micro[i * k:(i + 1) * k].mean(0)), s, p)
    p = optax.apply_updates(p, u)
    np.testing.assert_allclose(p_ms, p, rtol=1e-5, atol=1e-7)
  assert int(s_ms.inner_opt_state[2].count) == n_real


@pytest.mark.parametrize(
    "param_dtype,mu_dtype",
    [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, jnp.float32)],
)
@pytest.mark.parametrize("inject", [False, True], ids=["plain", "inject_hyperparams"])
def test_dtypes_never_drift(param_dtype, mu_dtype, inject):
  params = {"w": jnp.ones((4, 4), param_dtype), "n": jnp.ones(4, param_dtype)}
  kwargs = dict(learning_rate=optax.linear_schedule(1e-3, 1e-4, 10), reset_interval=3,
                total_steps=8, weight_decay=0.01, mu_dtype=mu_dtype, nu_dtype=mu_dtype)
  if inject:
    # dtypes are callables: inject_hyperparams must be told they are not schedules.
    tx = optax.inject_hyperparams(stable_spam, static_args=("mu_dtype", "nu_dtype"),
                                  hyperparam_dtype=jnp.float32)(**kwargs)
  else:
    tx = stable_spam(**kwargs)
  state = tx.init(params)
  init_state = state

  @jax.jit
  def step(params, state, t):
    g = jax.tree.map(lambda p: (jnp.sin(jnp.arange(p.size).reshape(p.shape) + t)).astype(p.dtype),
                     params)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state, updates

  for t in range(7):
    params, state, updates = step(params, state, t)
    chex.assert_trees_all_equal_dtypes(state, init_state)
    chex.assert_trees_all_equal_shapes(state, init_state)
    if not inject:
      # (With float32 hyperparameters injected, optax's own add_decayed_weights and scale promote
      # bf16 updates to float32, exactly as for optax.adamw; apply_updates casts them back.)
      chex.assert_trees_all_equal_dtypes(updates, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  chex.assert_type(jax.tree.leaves(params), param_dtype)
  inner = state.inner_state if inject else state
  chex.assert_type([inner[0].count, inner[1].count, inner[2].count], jnp.int32)
  chex.assert_type(jax.tree.leaves(inner[0].max_ema), jnp.float32)  # stats at least float32
  chex.assert_type(jax.tree.leaves(inner[1].nu_norm), jnp.float32)
  chex.assert_type(jax.tree.leaves(inner[2].mu), mu_dtype or param_dtype)
  chex.assert_type(jax.tree.leaves(inner[2].nu), mu_dtype or param_dtype)


def test_bf16_tracks_float32():
  rng = np.random.default_rng(0)
  gs = rng.normal(size=(8, 32)).astype(np.float32)
  out = {}
  for dt in (jnp.float32, jnp.bfloat16):
    tx = stable_spam(1e-2, reset_interval=4, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
    p = jnp.zeros(32, dt)
    s = tx.init(p)
    for g in gs:
      u, s = tx.update(jnp.asarray(g, dt), s, p)
      p = optax.apply_updates(p, u)
    out[dt] = np.asarray(p, np.float32)
  np.testing.assert_allclose(out[jnp.bfloat16], out[jnp.float32], rtol=0.05, atol=2e-3)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("learning_rate", dict(learning_rate=-1.0)),
        ("b1", dict(b1=1.0)),
        ("b2", dict(b2=-0.1)),
        ("eps", dict(eps=-1e-8)),
        ("gamma1", dict(gamma1=1.0)),
        ("gamma2", dict(gamma2=2.0)),
        ("gamma3", dict(gamma3=-0.5)),
        ("reset_interval", dict(reset_interval=-1)),
        ("reset_interval", dict(reset_interval=2.5)),
        ("total_steps", dict(total_steps=0)),
        ("eta_min", dict(eta_min=1.5)),
        ("weight_decay", dict(weight_decay=-0.1)),
        ("corrected_reset", dict(corrected_reset="yes")),
        ("mu_dtype", dict(mu_dtype=jnp.int32)),
    ],
)
def test_invalid_hyperparameters_raise_naming_the_argument(name, kwargs):
  kwargs = {"learning_rate": 1e-3, **kwargs}
  lr = kwargs.pop("learning_rate")
  with pytest.raises(ValueError, match=name):
    stable_spam(lr, **kwargs)


def test_piece_validation():
  with pytest.raises(ValueError, match="decay"):
    adaptive_spike_clip(1.0)
  with pytest.raises(ValueError, match="bias_correction_reset_interval"):
    adaptive_grad_norm(bias_correction_reset_interval=-3)
  with pytest.raises(ValueError, match="eps"):
    scale_by_stable_spam_adam(eps=-1.0)
  with pytest.raises(ValueError, match="total_steps"):
    stable_spam_momentum_scale(0)


def test_momentum_scale_schedule_values():
  f = stable_spam_momentum_scale(total_steps=9, eta_min=0.5)
  # T = count + 1; cos(pi T / 10)
  for count in (0, 4, 9, 14):
    t = count + 1
    want = 0.5 + 0.5 * (1 + math.cos(math.pi * t / 10)) / 2
    assert float(f(count)) == pytest.approx(want, rel=1e-6)
  assert float(f(14)) > float(f(9))  # no clamp past total_steps + 1, as the official code


def test_reset_interval_zero_never_resets():
  tx = scale_by_stable_spam_adam(reset_interval=0)
  state = tx.init(jnp.zeros(2))
  for _ in range(5):
    _, state = tx.update(jnp.ones(2), state)
  assert float(state.mu[0]) == pytest.approx(1 - 0.9 ** 5, rel=1e-5)
  assert isinstance(state, ScaleByStableSpamAdamState)


# --------------------------------------------------------------------------------------------------
# Sharding: 8 CPU devices in a subprocess (XLA_FLAGS must be set before JAX starts).
# --------------------------------------------------------------------------------------------------

_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from spam_optax._stable_spam import stable_spam
    from spam_optax._spike_monitor import spike_monitor, spike_counts
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    specs = {"w": P("a", "b"), "v": P("a"), "e": P(None, ("a", "b"))}
    shapes = {"w": (16, 6), "v": (12,), "e": (3, 40)}
    rng = np.random.default_rng(0)
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
             for _ in range(12)]
    for g in grads[3::4]:
      for x in g.values():
        x.flat[5] *= 1e3                           # entry spikes, seen by max|g| and ||g||
    for corrected in (False, True):
      tx = optax.chain(spike_monitor(threshold=20.0, warmup=2),
                       stable_spam(1e-2, reset_interval=5, corrected_reset=corrected))
      def run(put):
        params = {k: put(k, np.ones(s, np.float32)) for k, s in shapes.items()}
        state = tx.init(params)
        step = jax.jit(lambda p, s, g: tx.update(g, s, p))
        for g in grads:
          u, state = step(params, state, {k: put(k, v) for k, v in g.items()})
          params = optax.apply_updates(params, u)
        return params, state
      single = lambda k, x: jax.device_put(x, jax.devices()[0])
      sharded = lambda k, x: jax.device_put(x, NamedSharding(mesh, specs[k]))
      p1, s1 = run(single)
      p8, s8 = run(sharded)
      assert len(p8["w"].sharding.device_set) == 8
      for k in shapes:
        np.testing.assert_allclose(np.asarray(p8[k]), np.asarray(p1[k]), rtol=2e-6, atol=1e-7)
      for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7)
      c1, c8 = spike_counts(s1), spike_counts(s8)
      assert jax.tree.map(int, c1) == jax.tree.map(int, c8), (c1, c8)
      assert sum(jax.tree.leaves(jax.tree.map(int, c1))) > 0
    print("OK")
""")


def test_sharded_matches_unsharded_on_8_cpu_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "OK" in proc.stdout


# --------------------------------------------------------------------------------------------------
# Compiled-code regression: no full-size buffer copies with donation (PERFORMANCE-NOTES.md).
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("corrected", [False, True])
def test_no_full_size_copies_in_compiled_step(corrected):
  import re

  tx = stable_spam(1e-3, reset_interval=5, total_steps=100, corrected_reset=corrected)
  params = {"a": jnp.zeros((256, 96)), "b": jnp.zeros((96,))}

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
  text = hlo.compile().as_text()
  copies = re.findall(r"= f32\[(?:256,96|96)\]\{[^}]*\} copy\(", text)
  assert not copies, copies


def test_stacked_axes_equal_the_same_tensors_stored_one_per_leaf():
  # Layers stored stacked (L, d, f) for scan: with stacked_axes=1 on them, AdaClip's max and AdaGN's
  # norm are per layer, so the updates equal those of the layers as separate leaves.
  layers, keys = 3, jax.random.split(jax.random.key(4), 6)
  stacked = {"w": jax.random.normal(keys[0], (layers, 4, 5)), "b": jnp.ones(5)}
  per_leaf = {"w": [stacked["w"][i] for i in range(layers)], "b": stacked["b"]}
  kwargs = dict(reset_interval=4, total_steps=12)
  tx_stacked = stable_spam(1e-2, stacked_axes={"w": 1, "b": 0}, **kwargs)
  tx_leaf = stable_spam(1e-2, **kwargs)
  s_stacked, s_leaf = tx_stacked.init(stacked), tx_leaf.init(per_leaf)
  for t in range(10):
    g = jax.random.normal(keys[1 + t % 5], (layers, 4, 5)) * (1 + 30 * (t == 6) * jnp.arange(3)[:, None, None])
    grads = {"w": g, "b": g[0, 0] * 0.1}
    u_stacked, s_stacked = tx_stacked.update(grads, s_stacked, stacked)
    u_leaf, s_leaf = tx_leaf.update({"w": [g[i] for i in range(layers)], "b": grads["b"]}, s_leaf,
                                    per_leaf)
    np.testing.assert_allclose(u_stacked["w"], jnp.stack(u_leaf["w"]), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(u_stacked["b"], u_leaf["b"], rtol=1e-6, atol=1e-9)
  # Per-tensor statistics, one per layer; without stacked_axes they would be one per leaf.
  assert s_stacked[1].mu_norm["w"].shape == (layers,)
  assert s_stacked[0].max_ema["b"].shape == ()
  whole = stable_spam(1e-2, **kwargs)
  u_whole, _ = whole.update(grads, whole.init(stacked), stacked)
  assert not np.allclose(u_whole["w"], u_stacked["w"])  # the option changes what is a tensor


def test_stacked_axes_are_checked_against_the_leaves():
  params = {"w": jnp.zeros((3, 4)), "s": jnp.zeros(())}
  with pytest.raises(ValueError, match=r"stacked_axes .* got 1 for a leaf of shape \(\)"):
    stable_spam(1e-3, stacked_axes=1).init(params)
  with pytest.raises(ValueError, match="stacked_axes"):
    adaptive_grad_norm(stacked_axes={"w": 3, "s": 0}).init(params)
  state = adaptive_spike_clip(stacked_axes=lambda p: {"w": 1, "s": 0}).init(params)
  assert state.max_ema["w"].shape == (3,)
