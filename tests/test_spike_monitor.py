"""spike_monitor, spike_counts and the layer-type grouping."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spam_optax._spike_monitor import (
    LAYER_TYPES,
    SpikeMonitorState,
    group_by_layer_type,
    layer_type,
    spike_counts,
    spike_monitor,
)


def reference_monitor(stream, threshold, b2, warmup):
  """The definition in the docstring, in float64 NumPy: per step counts and running max score."""
  nu = np.zeros_like(stream[0], np.float64)
  counts, best, bests = [], 0.0, []
  for k, g in enumerate(stream, start=1):
    g = np.asarray(g, np.float64)
    if k > warmup:
      v_hat = nu / (1 - b2 ** (k - 1))
      with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(v_hat > 0, g * g / v_hat, np.where(g != 0, np.inf, 0.0))
      counts.append(int(np.sum(score > threshold)))
      finite = score[np.isfinite(score)]
      best = max(best, float(finite.max(initial=0.0)))
    else:
      counts.append(0)
    bests.append(best)
    nu = b2 * nu + (1 - b2) * g * g
  return counts, bests


def _stream(n=60, size=(40, 7), seed=0):
  rng = np.random.default_rng(seed)
  stream = rng.normal(size=(n,) + size)
  stream[:, 0, :] = 0.0  # an "embedding row" never seen ...
  stream[45, 0, 3] = 0.5  # ... until update 46: infinite score, counted, not in max_score
  for t, i, j, mag in [(3, 5, 1, 1e3), (25, 7, 2, 40.0), (30, 8, 3, 12.0), (50, 9, 4, 100.0)]:
    stream[t, i, j] = mag  # t = 3 is inside the warmup: not counted
  return stream


def test_matches_float64_reference_with_x64():
  stream = _stream()
  counts, bests = reference_monitor(stream, threshold=50.0, b2=0.99, warmup=20)
  with jax.enable_x64(True):
    tx = spike_monitor(threshold=50.0, b2=0.99, warmup=20)
    state = tx.init(jnp.zeros(stream.shape[1:], jnp.float64))
    update = jax.jit(tx.update)
    got_counts, got_best, totals = [], [], []
    for g in stream:
      out, state = update(jnp.asarray(g), state)
      got_counts.append(int(state.last_spikes))
      got_best.append(float(state.max_score))
      totals.append(int(state.spikes))
    chex.assert_type(state.nu, jnp.float64)
  assert got_counts == counts
  assert totals == list(np.cumsum(counts))
  np.testing.assert_allclose(got_best, bests, rtol=1e-6)  # max_score is stored in float32
  # The stream exercises what it claims: the spike inside the warmup is not counted; the injected
  # ones (updates 26, 31, 51) and the first gradient of the never-seen row (update 46) are.
  assert counts[3] == 0
  assert all(counts[i] >= 1 for i in (25, 30, 45, 50))


def test_gradients_pass_through_unchanged():
  tx = spike_monitor()
  g = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(4, jnp.bfloat16)}
  state = tx.init(g)
  out, state = tx.update(g, state)
  assert out is g
  out, _ = jax.jit(tx.update)(g, state)
  chex.assert_trees_all_equal(out, g)
  chex.assert_trees_all_equal_dtypes(out, g)


def test_steady_gaussian_gradients_give_no_spikes_and_injected_ones_are_all_found():
  rng = np.random.default_rng(1)
  n, size = 120, 2000
  stream = rng.normal(size=(n, size)).astype(np.float32)
  injected = [(40, 17), (41, 900), (77, 5), (100, 1999)]
  for t, i in injected:
    stream[t, i] = 30.0  # 30 sigma: score ~900 > 50; chi2(1) > 50 has probability ~2.5e-12
  tx = spike_monitor(threshold=50.0)
  update = jax.jit(tx.update)
  state = tx.init(jnp.zeros(size))
  per_step = []
  for g in stream:
    _, state = update(jnp.asarray(g), state)
    per_step.append(int(state.last_spikes))
  assert int(state.spikes) == len(injected)
  assert [t for t, c in enumerate(per_step) if c] == sorted({t for t, _ in injected})
  assert 500.0 < float(state.max_score) < 2000.0


def test_warmup_updates_only_feed_the_ema():
  tx = spike_monitor(threshold=2.0, warmup=3)
  state = tx.init(jnp.zeros(2))
  for g in ([1.0, 1.0], [100.0, 1.0], [1.0, 1000.0]):  # updates 1..3: huge jumps, not counted
    _, state = tx.update(jnp.array(g), state)
    assert int(state.spikes) == 0 and float(state.max_score) == 0.0
  _, state = tx.update(jnp.array([1e4, 0.0]), state)  # update 4 is counted
  assert int(state.last_spikes) == 1


def test_zero_gradients_never_nan_and_never_spike():
  tx = spike_monitor(warmup=1)
  params = {"w": jnp.zeros((3, 4)), "e": jnp.zeros((0, 4))}
  state = tx.init(params)
  for _ in range(5):
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state)
  for x in jax.tree.leaves(state):
    assert bool(jnp.all(jnp.isfinite(x)))
  assert sum(int(x) for x in jax.tree.leaves(state.spikes)) == 0


def test_counts_saturate_instead_of_wrapping():
  tx = spike_monitor(threshold=1.0, warmup=1)
  state = tx.init(jnp.zeros(4))
  _, state = tx.update(jnp.ones(4), state)
  state = state._replace(spikes=jnp.asarray(np.iinfo(np.int32).max - 1, jnp.int32))
  _, state = tx.update(jnp.full(4, 100.0), state)
  assert int(state.last_spikes) == 4
  assert int(state.spikes) == np.iinfo(np.int32).max


@pytest.mark.parametrize("grad_dtype,nu_dtype", [(jnp.float32, None), (jnp.bfloat16, None),
                                                 (jnp.float32, jnp.bfloat16)])
def test_dtypes_stable_under_jit_without_recompilation(grad_dtype, nu_dtype):
  traces = []
  tx = spike_monitor(nu_dtype=nu_dtype)
  params = {"w": jnp.zeros((8, 8), grad_dtype), "n": jnp.zeros(8, grad_dtype)}

  def step(state, g):
    traces.append(1)
    return tx.update(g, state)[1]

  step = jax.jit(step, donate_argnums=0)
  state0 = tx.init(params)
  state = tx.init(params)
  for t in range(25):
    g = jax.tree.map(lambda p: (jnp.cos(jnp.arange(p.size) + t) * (1 + 99 * (t == 22)))
                     .reshape(p.shape).astype(p.dtype), params)
    state = step(state, g)
    chex.assert_trees_all_equal_dtypes(state, state0)
  assert len(traces) == 1
  chex.assert_type(state.count, jnp.int32)
  chex.assert_type(jax.tree.leaves(state.spikes), jnp.int32)
  chex.assert_type(jax.tree.leaves(state.max_score), jnp.float32)
  chex.assert_type(jax.tree.leaves(state.nu), nu_dtype or jnp.float32)
  assert sum(int(x) for x in jax.tree.leaves(state.spikes)) > 0  # the x100 step was seen


def test_no_full_size_copies_with_donation():
  tx = optax.chain(spike_monitor(), optax.adam(1e-3))
  params = {"a": jnp.zeros((256, 96))}

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  text = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
  copies = re.findall(r"= f32\[256,96\]\{[^}]*\} copy\(", text.compile().as_text())
  assert not copies, copies


@pytest.mark.parametrize(
    "name,kwargs",
    [("threshold", dict(threshold=0.0)), ("b2", dict(b2=1.0)), ("warmup", dict(warmup=0)),
     ("warmup", dict(warmup=1.5)), ("nu_dtype", dict(nu_dtype=jnp.int8))],
)
def test_invalid_hyperparameters(name, kwargs):
  with pytest.raises(ValueError, match=name):
    spike_monitor(**kwargs)


def test_inject_hyperparams_threshold_is_live():
  tx = optax.inject_hyperparams(spike_monitor)(threshold=1e9, warmup=1)
  state = tx.init(jnp.zeros(3))
  update = jax.jit(tx.update)
  _, state = update(jnp.ones(3), state)
  _, state = update(jnp.array([100.0, 1.0, 1.0]), state)
  assert int(spike_counts(state)) == 0
  state.hyperparams["threshold"] = jnp.asarray(50.0)
  _, state = update(jnp.array([1000.0, 1.0, 1.0]), state)
  assert int(spike_counts(state, "last")) == 1


# --------------------------------------------------------------------------------------------------
# spike_counts: finding the monitor anywhere in an optimizer state.
# --------------------------------------------------------------------------------------------------


def _spiky_updates(tx, params, n=6):
  state = tx.init(params)
  for t in range(n):
    g = jax.tree.map(lambda p: jnp.ones_like(p) * (1.0 if t < n - 1 else 1e3), params)
    _, state = tx.update(g, state, params)
  return state


@pytest.mark.parametrize(
    "wrap",
    ["chain", "inject", "multisteps", "masked"],
)
def test_spike_counts_finds_the_monitor_anywhere(wrap):
  params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
  mon = lambda: spike_monitor(warmup=2)
  if wrap == "chain":
    tx = optax.chain(mon(), optax.adamw(1e-3))
  elif wrap == "inject":
    tx = optax.chain(optax.inject_hyperparams(spike_monitor)(warmup=2), optax.sgd(1e-3))
  elif wrap == "multisteps":
    tx = optax.MultiSteps(optax.chain(mon(), optax.adam(1e-3)), every_k_schedule=1)
  else:
    tx = optax.chain(optax.masked(mon(), {"w": True, "b": False}), optax.sgd(1e-3))
  state = _spiky_updates(tx, params)
  counts = spike_counts(state)
  got = jax.tree.map(int, counts)
  if wrap == "masked":
    assert got["w"] == 6
  else:
    assert got == {"w": 6, "b": 3}
  last = jax.tree.map(int, spike_counts(state, "last"))
  assert last["w"] == 6
  assert float(jax.tree.leaves(spike_counts(state, "max_score"))[0]) > 1e5


def test_spike_counts_errors():
  with pytest.raises(ValueError, match="no SpikeMonitorState"):
    spike_counts(optax.adam(1e-3).init(jnp.zeros(2)))
  two = optax.chain(spike_monitor(), spike_monitor())
  with pytest.raises(ValueError, match="more than one"):
    spike_counts(two.init(jnp.zeros(2)))
  with pytest.raises(ValueError, match="which"):
    spike_counts(spike_monitor().init(jnp.zeros(2)), "bogus")
  assert isinstance(spike_monitor().init(jnp.zeros(2)), SpikeMonitorState)


# --------------------------------------------------------------------------------------------------
# Layer types.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,expected",
    [
        # This repository's Flax NNX LLaMA (models/llama.py), as nnx.state paths.
        ("embed.embedding.value", "embedding"),
        ("layers.0.attn.q_proj.kernel.value", "attention"),
        ("layers.7.attn.o_proj.kernel", "attention"),
        ("layers.0.mlp.gate_proj.kernel", "ffn"),
        ("layers.3.mlp.down_proj.kernel.value", "ffn"),
        ("layers.0.input_norm.weight.value", "norm"),
        ("layers.0.post_attn_norm.weight", "norm"),
        ("final_norm.weight", "norm"),
        ("lm_head.kernel.value", "lm_head"),
        # Hugging Face LLaMA.
        ("model.embed_tokens.weight", "embedding"),
        ("model.layers.3.self_attn.k_proj.weight", "attention"),
        ("model.layers.3.mlp.up_proj.weight", "ffn"),
        ("model.layers.3.input_layernorm.weight", "norm"),
        ("model.layers.3.post_attention_layernorm.weight", "norm"),
        ("model.norm.weight", "norm"),
        ("lm_head.weight", "lm_head"),
        # Meta LLaMA.
        ("tok_embeddings.weight", "embedding"),
        ("layers.1.attention.wq.weight", "attention"),
        ("layers.1.attention.wo.weight", "attention"),
        ("layers.1.feed_forward.w1.weight", "ffn"),
        ("layers.1.attention_norm.weight", "norm"),
        ("layers.1.ffn_norm.weight", "norm"),
        ("output.weight", "lm_head"),
        # Others.
        ("transformer.wte.embedding", "embedding"),
        ("blocks_2.mlp.wo.kernel", "ffn"),  # T5-style wo inside an MLP
        ("blocks_2.ln_1.scale", "norm"),
        ("blocks_2.gate.kernel", "ffn"),
        ("blocks_2.fc1.kernel", "ffn"),
        ("something.else", "other"),
        ("heads_proj.kernel", "other"),  # "heads" is not the LM head
    ],
)
def test_layer_type_rules(path, expected):
  assert layer_type(path) == expected


def test_group_by_layer_type_on_the_project_llama():
  nnx = pytest.importorskip("flax.nnx")
  llama = pytest.importorskip("models.llama")
  cfg = llama.CONFIGS["tiny"].replace(vocab_size=64)
  model = llama.make_model(cfg)
  params = nnx.state(model, nnx.Param)
  sizes = group_by_layer_type(jax.tree.map(lambda x: x.size, params))
  d, f, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
  assert sizes == {"embedding": v * d, "attention": 4 * L * d * d, "ffn": 3 * L * d * f,
                   "norm": (2 * L + 1) * d, "lm_head": d * v}
  # And on a monitor's counts for those parameters (the pure-dict form as well).
  tx = spike_monitor(warmup=1)
  pure = nnx.to_pure_dict(params)
  state = tx.init(pure)
  for t in range(3):
    _, state = tx.update(jax.tree.map(lambda p: jnp.full_like(p, 1.0 + 999 * (t == 2)), pure),
                         state)
  counts = group_by_layer_type(spike_counts(state))
  assert counts == sizes  # every entry spiked once (x1000 jump)
  assert list(counts) == list(LAYER_TYPES)


def test_group_by_layer_type_combine_modes():
  tree = {"embed": np.array(3), "attn": {"q_proj": np.array(5.0), "k_proj": np.array(7.0)},
          "misc": np.array(1)}
  assert group_by_layer_type(tree) == {"embedding": 3, "attention": 12.0, "ffn": 0, "norm": 0,
                                       "lm_head": 0, "other": 1}
  assert group_by_layer_type(tree, "max")["attention"] == 7.0
  assert group_by_layer_type(tree, len)["attention"] == 2
  with pytest.raises(ValueError, match="combine"):
    group_by_layer_type(tree, "mean")
