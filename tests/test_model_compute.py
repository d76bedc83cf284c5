"""How the LLaMA step is computed (attention kernels, fused SwiGLU, scan, remat): every choice gives
the same numbers, and scan and remat do what they are for (flat program size, less memory)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import models

from models import CONFIGS, make_model, stack_layers, unstack_layers
from models.llama import causal_attention, swiglu

TINY = CONFIGS["tiny"].replace(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4,
                               num_layers=2)


def reference_attention(q, k, v):
  """The textbook formulation: materialised scores, kv heads repeated per group (HF repeat_kv)."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  t = q.shape[1]
  scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def values_and_grads(fn, *args):
  cotangent = jax.random.normal(jax.random.key(9), fn(*args).shape)
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent)
  return jax.jit(fn)(*args), jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


def assert_close(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tol)


def test_swiglu_vjp_equals_autodiff():
  a, b = jax.random.normal(jax.random.key(0), (2, 37, 24)) * 3
  ours = values_and_grads(swiglu, a, b)
  autodiff = values_and_grads(lambda x, y: jax.nn.silu(x) * y, a, b)
  assert_close(ours, autodiff, rtol=1e-6, atol=1e-6)
  bf16 = values_and_grads(swiglu, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))
  assert_close(bf16, autodiff, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("implementation", ["cpu", "xla"])
def test_attention_implementations_agree_with_the_textbook_formula(implementation, kv_heads):
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(kq, (2, 11, 4, 8))
  k, v = (jax.random.normal(key, (2, 11, kv_heads, 8)) for key in (kk, kv))
  got = values_and_grads(lambda *a: causal_attention(*a, implementation=implementation), q, k, v)
  assert_close(got, values_and_grads(reference_attention, q, k, v), rtol=2e-5, atol=2e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_attention_agrees_with_the_cpu_kernel_in_bf16():
  q, k, v = (jax.random.normal(key, (2, 128, 4, 64), jnp.bfloat16)
             for key in jax.random.split(jax.random.key(2), 3))
  got = values_and_grads(lambda *a: causal_attention(*a, implementation="cudnn"), q, k, v)
  want = values_and_grads(lambda *a: causal_attention(*a, implementation="cpu"), q, k, v)
  assert_close(got, want, rtol=0.05, atol=0.05)


@functools.cache
def logits_and_grads(**changes):
  cfg = TINY.replace(num_kv_heads=2, **changes)
  tokens = jnp.arange(40, dtype=jnp.int32).reshape(2, 20) * 7 % TINY.vocab_size
  graphdef, params = nnx.split(make_model(cfg, seed=2), nnx.Param)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens)
    return logits.astype(jnp.float32).std(), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, unstack_layers(nnx.to_pure_dict(grads))  # either layout, compared per layer


@pytest.mark.parametrize("scan_layers,remat", [(True, "none"), (False, "none"), (True, "block"),
                                               (True, "dots"), (False, "dots")])
def test_scan_unroll_and_remat_give_the_same_logits_and_gradients(scan_layers, remat):
  want = logits_and_grads(scan_layers=False, remat="none", attention="xla")
  got = logits_and_grads(scan_layers=scan_layers, remat=remat, attention="cpu")
  assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_scanned_model_stores_each_weight_once_stacked_with_the_same_values():
  scanned = make_model(TINY.replace(scan_layers=True))
  looped = make_model(TINY.replace(scan_layers=False))
  stacked = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  per_layer = nnx.to_pure_dict(nnx.state(looped, nnx.Param))
  assert stacked["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
  assert per_layer["layers"][1]["attn"]["q_proj"]["kernel"].shape == (32, 32)
  assert len(jax.tree.leaves(stacked["layers"])) == 9  # one leaf per weight, whatever the depth
  assert_close(stack_layers(per_layer), stacked, rtol=0, atol=0)  # same seed, same values
  assert_close(unstack_layers(stacked), per_layer, rtol=0, atol=0)
  assert jax.tree.structure(unstack_layers(stacked)) == jax.tree.structure(per_layer)
  # The layer axis is never sharded; the weight's own annotations follow it.
  specs = models.partition_specs(nnx.state(scanned, nnx.Param))
  assert specs["layers"]["attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
  assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
  assert specs["layers"]["input_norm"]["weight"] == P(None, None)


def train_step_hlo(cfg, batch=2, seq=16) -> str:
  graphdef, params = nnx.split(make_model(cfg), nnx.Param)
  loss = lambda p, t: nnx.merge(graphdef, p)(t).astype(jnp.float32).mean()
  return jax.jit(jax.grad(loss)).lower(params, jnp.zeros((batch, seq), jnp.int32)).as_text()


def test_scanned_program_does_not_grow_with_depth():
  dots = lambda cfg: train_step_hlo(cfg).count("dot_general")
  shallow, deep = (TINY.replace(num_layers=n, scan_layers=True) for n in (2, 6))
  assert dots(shallow) == dots(deep)
  assert dots(deep.replace(scan_layers=False)) > dots(shallow.replace(scan_layers=False))


def test_remat_lowers_peak_memory_of_the_scanned_model():
  # Under scan the saved activations are the loop's outputs, so the policy decides them. Unrolled,
  # XLA:CPU's scheduler recomputes early and remat saves nothing (benchmarks/RESULTS.md).
  cfg = TINY.replace(hidden_size=64, intermediate_size=256, num_layers=4, scan_layers=True)
  tokens = jnp.zeros((8, 64), jnp.int32)

  def temp_bytes(remat):
    graphdef, params = nnx.split(make_model(cfg.replace(remat=remat)), nnx.Param)
    loss = lambda p: nnx.merge(graphdef, p)(tokens).astype(jnp.float32).mean()
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  none, dots, block = temp_bytes("none"), temp_bytes("dots"), temp_bytes("block")
  assert block < dots < none


def test_remat_names_and_the_former_boolean():
  assert TINY.replace(remat=True).remat == "block"
  assert TINY.replace(remat=False).remat == "none"
  with pytest.raises(ValueError, match="unknown remat 'all'; valid: none, block, dots"):
    TINY.replace(remat="all")
  with pytest.raises(ValueError, match="unknown attention 'flash'"):
    TINY.replace(attention="flash")


@pytest.mark.parametrize("optimizer", ["stable_spam", "spam"])
def test_training_optimizer_updates_stacked_weights_as_per_layer_ones(optimizer):
  """The train script's optimizer keeps per-tensor statistics (Stable-SPAM's AdaGN norm, AdaClip
  max) per layer when --scan-layers stacks the weights: same gradients, same updates."""
  from train import optimizers
  from train.config import Config
  per_layer = nnx.to_pure_dict(nnx.state(make_model(TINY), nnx.Param))
  stacked = stack_layers(per_layer)
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), per_layer)
           for _ in range(3)]
  for g in grads:  # layers with very different gradient scales: a norm across layers would differ
    g["layers"][1] = jax.tree.map(lambda x: 50.0 * x, g["layers"][1])
  out = {}
  for name, params, scan in (("per_layer", per_layer, False), ("stacked", stacked, True)):
    tx, _ = optimizers.build_optimizer(Config(optimizer=optimizer, scan_layers=scan))
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(stack_layers(g) if scan else g, state, params)
    out[name] = updates
  assert_close(out["stacked"], stack_layers(out["per_layer"]), rtol=1e-6, atol=1e-9)


def test_checkpoints_restore_across_compute_choices_not_across_layer_storage():
  # The compatibility record a checkpoint is checked against holds the model's shape and numerics
  # and its parameters' layout, not attention / remat: a checkpoint restores whichever way the step
  # is computed, and a scanned run (stacked weights) refuses a per-layer checkpoint and back.
  from train.config import Config
  from train.state import compat_record, model_config

  records = [compat_record(cfg, model_config(cfg, 256), {"data": "corpus"})
             for cfg in (Config(), Config(attention="xla", remat="dots"), Config(scan_layers=True))]
  assert records[0] == records[1]
  assert set(records[0]["model"]) == {
      "vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers", "num_kv_heads",
      "rope_base", "norm_eps", "init_std", "dtype", "param_dtype"}
  assert records[2]["model"] == {**records[0]["model"], "layer_storage": "stacked"}


def test_scanned_train_step_with_its_optimizer_does_not_grow_with_depth():
  # The whole jitted step of the training script (forward, backward, SPAM update): with the weights
  # stored stacked the program is the same size at any depth, which is what keeps compile time flat
  # (benchmarks/RESULTS.md section 6); unrolled, it grows with every layer.
  from train.config import Config
  from train.mesh import make_mesh
  from train.state import build_training, model_config

  def size(layers, scan):
    cfg = Config(model="tiny", batch_size=2, seq_len=16, optimizer="spam", progress=False,
                 scan_layers=scan)
    built = build_training(cfg, model_config(cfg, 64).replace(num_layers=layers), make_mesh(None))
    batch = {"tokens": jax.ShapeDtypeStruct((2, 17), jnp.int32),
             "weights": jax.ShapeDtypeStruct((2, 16), jnp.float32)}
    return built.train_step.lower(built.abstract_state, batch).as_text().count("\n")

  assert size(2, scan=True) == size(6, scan=True)
  assert size(6, scan=False) > size(2, scan=False) + 500
