"""The spike defences JAX trainers already use, as optax transforms: ZClip and step skipping."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spam_optax as spam
from tests.zclip_reference import ZClipReference

STEPS = 90


def gradient_sequence(seed=0, steps=STEPS, base=0.2):
  """Norms around `base` with slow drift, spikes (x20, x5; x2 in the warm-up), a quiet step, a zero."""
  rng = np.random.default_rng(seed)
  out = []
  for k in range(steps):
    scale = base * (1 + 0.3 * np.sin(k / 7.0))
    if k in (31, 32, 55, 80):
      scale *= 20.0
    elif k in (40, 70):
      scale *= 5.0
    elif k == 10:
      scale *= 2.0
    elif k == 60:
      scale *= 0.01
    g = {"w": rng.normal(size=(3, 4)) * scale / 3.0, "b": rng.normal(size=(5,)) * scale / 3.0}
    if k == 65:
      g = {n: np.zeros_like(x) for n, x in g.items()}
    out.append(g)
  return out


CASES = {
    "defaults": {},
    "mean": dict(clip_option="mean"),
    "percentile": dict(mode="percentile"),
    "percentile_upper_case": dict(mode="PERCENTILE", z_thresh=1.5),
    "no_cap": dict(max_grad_norm=None),
    "cap_binds": dict(max_grad_norm=0.25),
    "clip_factor": dict(clip_factor=0.7, max_grad_norm=None),
    "skip_ema_on_spike": dict(skip_update_on_spike=True, max_grad_norm=None),
    "skip_ema_percentile": dict(skip_update_on_spike=True, mode="percentile", z_thresh=1.0),
    "warmup_0": dict(warmup_steps=0),
    "warmup_1": dict(warmup_steps=1, max_grad_norm=None),
    "warmup_5_large_eps": dict(warmup_steps=5, eps=0.1, z_thresh=1.0, alpha=0.8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_zclip_matches_float64_reference_update_for_update(case):
  kwargs = CASES[case]
  ref = ZClipReference(**kwargs)
  with jax.enable_x64(True):
    tx = spam.zclip(**kwargs)
    grads = gradient_sequence()
    state = tx.init(jax.tree.map(jnp.asarray, grads[0]))
    assert state.mean.dtype == jnp.float64  # statistics follow the widest parameter dtype
    update = jax.jit(tx.update)
    clipped_any = False
    for k, g in enumerate(grads, start=1):
      want = ref.step(g)
      got, state = update(jax.tree.map(jnp.asarray, g), state)
      for n in want:
        np.testing.assert_allclose(np.asarray(got[n]), want[n], rtol=1e-9, atol=1e-15,
                                   err_msg=f"{case}, update {k}, {n}")
      clipped_any |= not np.allclose(want["w"], g["w"])
      if ref.initialized:
        np.testing.assert_allclose(float(state.mean), ref.mean, rtol=1e-9, err_msg=f"update {k}")
        np.testing.assert_allclose(float(state.var), ref.var, rtol=1e-9, atol=1e-300)
    assert clipped_any
    assert int(state.count) == STEPS and state.count.dtype == jnp.int32


def test_the_reference_cases_differ():
  """Each option changes the reference trajectory, so the test above checks every branch."""
  def final(kwargs):
    ref = ZClipReference(**kwargs)
    return np.concatenate([ref.step(g)["w"].ravel() for g in gradient_sequence()])
  base = final(CASES["defaults"])
  # (the 1.0 cap never binds on these norms, so "no_cap" equals the defaults; "cap_binds" covers it)
  for name in set(CASES) - {"defaults", "no_cap"}:
    assert not np.allclose(final(CASES[name]), base, rtol=1e-7), name
  assert not np.allclose(final(CASES["percentile"]), final(CASES["percentile_upper_case"]))
  assert not np.allclose(final(CASES["warmup_0"]), final(CASES["warmup_1"] | {"max_grad_norm": 0.3}))


def test_zclip_float32_close_to_the_reference():
  ref = ZClipReference()
  tx = spam.zclip()
  grads = gradient_sequence(seed=1)
  state = tx.init(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads[0]))
  update = jax.jit(tx.update)
  for g in grads:
    want = ref.step(g)
    got, state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state)
    assert got["w"].dtype == jnp.float32 and state.mean.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got["w"]), want["w"], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["defaults", "mean", "percentile", "cap_binds", "clip_factor",
                                  "skip_ema_on_spike", "warmup_5_large_eps"])
def test_zclip_matches_the_pytorch_zclip_package(case):
  torch = pytest.importorskip("torch")
  zclip_pkg = pytest.importorskip("zclip")
  kwargs = CASES[case]
  torch.manual_seed(0)
  model = torch.nn.Module()
  model.w = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
  model.b = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
  zc = zclip_pkg.ZClip(**kwargs)
  with jax.enable_x64(True):
    tx = spam.zclip(**kwargs)
    grads = gradient_sequence(seed=2)
    state = tx.init(jax.tree.map(jnp.asarray, grads[0]))
    update = jax.jit(tx.update)
    for k, g in enumerate(grads, start=1):
      model.w.grad = torch.tensor(g["w"])
      model.b.grad = torch.tensor(g["b"])
      zc.step(model)
      got, state = update(jax.tree.map(jnp.asarray, g), state)
      np.testing.assert_allclose(np.asarray(got["w"]), model.w.grad.numpy(), rtol=1e-9,
                                 atol=1e-15, err_msg=f"{case}, update {k}")
      np.testing.assert_allclose(np.asarray(got["b"]), model.b.grad.numpy(), rtol=1e-9,
                                 atol=1e-15)
      if zc.initialized:
        np.testing.assert_allclose(float(state.mean), zc.mean, rtol=1e-9)


def test_zclip_bad_arguments():
  for kwargs, name in [(dict(mode="median"), "mode"), (dict(clip_option="max"), "clip_option"),
                       (dict(alpha=1.0), "alpha"), (dict(z_thresh=0.0), "z_thresh"),
                       (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(eps=-1.0), "eps"),
                       (dict(warmup_steps=-1), "warmup_steps"), (dict(clip_factor=0.0), "clip_factor")]:
    with pytest.raises(ValueError, match=name):
      spam.zclip(**kwargs)
  spam.zclip(mode="percentile", z_thresh=0.0, clip_option="ignored")  # as ZClip: ignored there


def test_zclip_nan_gradient_passes_through_like_zclip_and_apply_if_finite_skips_it():
  p = {"w": jnp.zeros(3)}
  tx = spam.zclip(warmup_steps=2)
  s = tx.init(p)
  for n in (1.0, 1.0, 1.0):
    _, s = tx.update({"w": jnp.asarray([n, 0.0, 0.0])}, s)
  guarded = optax.apply_if_finite(optax.chain(spam.zclip(warmup_steps=2), optax.sgd(1.0)), 3)
  gs = guarded.init(p)
  for n in (1.0, 1.0, 1.0):
    _, gs = guarded.update({"w": jnp.asarray([n, 0.0, 0.0])}, gs, p)
  before = gs
  u, gs = guarded.update({"w": jnp.asarray([jnp.nan, 0.0, 0.0])}, gs, p)
  chex.assert_trees_all_equal(gs.inner_state, before.inner_state)
  assert float(jnp.abs(u["w"]).sum()) == 0.0


# ---------------------------------------------------------------------------------------------
# skip_step_on_spikes


def maxtext_reference(norms, losses, window, sigma, min_history=None, min_std=0.0):
  """MaxText's rule (optimizers.py, skip_step_on_spikes) in NumPy: which steps are skipped."""
  min_history = max(2, window // 2) if min_history is None else min_history
  hist_n, hist_l, skipped = [], [], []
  for t, (n, l) in enumerate(zip(norms, losses)):
    def bad(x, hist):
      h = np.asarray(hist[-window:], np.float64)
      if len(h) == 0:
        mean, std = 0.0, 0.0
      else:
        mean = h.mean()
        std = np.sqrt(((h - mean) ** 2).sum() / max(1, len(h) - 1))
      return not (x - mean <= sigma * max(std, min_std))
    skip = (bad(n, hist_n) or (l is not None and bad(l, hist_l))) and t + 1 >= min_history
    skipped.append(skip)
    hist_n.append(n)
    hist_l.append(l)
  return skipped


def test_skip_matches_maxtexts_rule_and_leaves_inner_state_untouched():
  grads = gradient_sequence(seed=3)
  norms = [float(np.sqrt(sum((x.astype(np.float32) ** 2).sum() for x in g.values()))) for g in grads]
  want = maxtext_reference(norms, [None] * len(norms), window=16, sigma=3.0)
  assert 3 <= sum(want) < 20  # the spikes, not every step
  inner = optax.adam(1e-2)
  tx = spam.skip_step_on_spikes(inner, window=16, sigma=3.0)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), grads[0])
  state = tx.init(params)
  update = jax.jit(tx.update)
  for k, g in enumerate(grads):
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    u, new = update(g, state, params)
    assert bool(new.last_skipped) == want[k], k
    if want[k]:
      chex.assert_trees_all_equal(new.inner_state, state.inner_state)
      chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, g))
    else:
      ref_u, ref_s = inner.update(g, state.inner_state, params)
      chex.assert_trees_all_close(u, ref_u, rtol=1e-5, atol=1e-8)
      chex.assert_trees_all_close(new.inner_state, ref_s, rtol=1e-5, atol=1e-10)
    state = new
  assert int(state.total_skipped) == sum(want)


def test_skip_uses_the_loss_when_given_and_floors_the_std():
  losses = [3.0, 3.1, 2.9, 3.0, 3.05, 2.95, 3.0, 50.0, 3.0]
  g = {"w": jnp.ones(4)}
  tx = spam.skip_step_on_spikes(optax.sgd(1.0), window=8, sigma=6.0)
  s = tx.init(g)
  skipped = []
  for l in losses:
    _, s = tx.update(g, s, g, loss=jnp.asarray(l))
    skipped.append(bool(s.last_skipped))
  assert skipped == maxtext_reference([2.0] * len(losses), losses, 8, 6.0)
  assert skipped == [False] * 7 + [True, False]
  # constant norms: std 0; any increase is an outlier unless min_std floors it
  for min_std, want in ((0.0, True), (0.5, False)):
    tx = spam.skip_step_on_spikes(optax.sgd(1.0), window=4, sigma=6.0, min_std=min_std)
    s = tx.init(g)
    for _ in range(4):
      _, s = tx.update(g, s, g)
    _, s = tx.update({"w": jnp.full(4, 1.1)}, s, g)
    assert bool(s.last_skipped) == want


def test_skip_nan_step_is_skipped():
  g = {"w": jnp.ones(2)}
  tx = optax.apply_if_finite(spam.skip_step_on_spikes(optax.adam(1e-2), window=4), 10)
  s = tx.init(g)
  for _ in range(4):
    _, s = tx.update(g, s, g)
  before = s.inner_state
  u, s = tx.update({"w": jnp.asarray([jnp.nan, 1.0])}, s, g)
  chex.assert_trees_all_equal(s.inner_state, before)  # the window did not take the NaN either
  bare = spam.skip_step_on_spikes(optax.adam(1e-2), window=4)
  bs = bare.init(g)
  for _ in range(4):
    _, bs = bare.update(g, bs, g)
  u, bs2 = bare.update({"w": jnp.asarray([jnp.nan, 1.0])}, bs, g)
  assert bool(bs2.last_skipped) and float(jnp.abs(u["w"]).sum()) == 0.0
  chex.assert_trees_all_equal(bs2.inner_state, bs.inner_state)


def test_skip_bad_arguments():
  for kwargs, name in [(dict(window=0), "window"), (dict(sigma=-1.0), "sigma"),
                       (dict(min_std=-1.0), "min_std"), (dict(min_history=-1), "min_history")]:
    with pytest.raises(ValueError, match=name):
      spam.skip_step_on_spikes(optax.sgd(1.0), **kwargs)


@pytest.mark.parametrize("make", [
    lambda: spam.skip_step_on_spikes(spam.spam(1e-3)),
    lambda: spam.skip_step_on_spikes(optax.adamw(1e-3)),
    lambda: optax.chain(spam.zclip(), spam.spam(1e-3)),
], ids=["skip_spam", "skip_adamw", "zclip_spam"])
def test_compiled_step_has_no_moment_copies(make):
  """A lax.cond with the branches the other way round (or a select) copies every donated buffer."""
  from tests.test_hlo import PARAMS, full_size_copies
  assert full_size_copies(make(), PARAMS) == []
