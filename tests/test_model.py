"""The Flax NNX LLaMA: sizes, shapes, causality, numerics and sharding annotations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

import models
from models import CONFIGS, MESH_AXES, abstract_model, count_params, make_model
from models.llama import RMSNorm, apply_rope, fit_spec, rope_tables



@nnx.jit
def forward(model, tokens):
  return model(tokens)


TINY = CONFIGS["tiny"].replace(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4,
                               num_layers=2)


def test_60m_config_with_vocab_32000_has_58_07m_parameters():
  model = abstract_model(CONFIGS["60m"])
  n = count_params(model)
  assert n == 58_073_600
  assert f"{n / 1e6:.2f}M" == "58.07M"


@pytest.mark.parametrize("name", ["tiny", "9m", "20m", "35m", "60m", "130m", "350m", "1b"])
def test_parameter_count_formula_matches_the_module(name):
  cfg = CONFIGS[name]
  assert count_params(abstract_model(cfg)) == cfg.num_params()


def test_named_configs_are_the_authors_sizes():
  got = {k: (c.hidden_size, c.intermediate_size, c.num_heads, c.num_layers)
         for k, c in CONFIGS.items()}
  assert got["60m"] == (512, 1376, 8, 8)
  assert got["130m"] == (768, 2048, 12, 12)
  assert got["350m"] == (1024, 2736, 16, 24)
  assert got["1b"] == (2048, 5461, 32, 24)
  assert got["7b"] == (4096, 11008, 32, 32)
  assert set(CONFIGS) == {"tiny", "9m", "20m", "35m", "60m", "130m", "350m", "1b", "7b"}


def test_unknown_model_name_lists_valid_ones():
  with pytest.raises(ValueError, match="valid models: tiny, 9m, 20m"):
    models.get_config("60M")


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="multiple of num_heads"):
    CONFIGS["tiny"].replace(num_heads=3)


def test_bad_num_kv_heads_is_rejected():
  for kv in (3, 0, 8):
    with pytest.raises(ValueError, match="num_kv_heads must be a positive divisor"):
      TINY.replace(num_kv_heads=kv)


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_gqa_parameter_count_and_kv_projection_widths(kv):
  cfg = TINY.replace(num_kv_heads=kv)
  model = make_model(cfg)
  assert count_params(model) == cfg.num_params()
  assert model.layers[0].attn.k_proj.kernel.shape == (32, kv * cfg.head_dim)
  assert model.layers[0].attn.v_proj.kernel.shape == (32, kv * cfg.head_dim)


def test_gqa_equals_mha_with_each_kv_head_copied_to_its_group():
  # 4 query heads over 2 kv heads: query heads 0,1 read kv head 0 and heads 2,3 read kv head 1.
  gqa = make_model(TINY.replace(num_kv_heads=2), seed=3)
  mha = make_model(TINY, seed=4)
  hd = TINY.head_dim
  widen = lambda w: np.repeat(np.asarray(w).reshape(w.shape[0], 2, hd), 2, axis=1).reshape(
      w.shape[0], 4 * hd)
  state = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
  for layer in state["layers"].values():
    for name in ("k_proj", "v_proj"):
      layer["attn"][name]["kernel"] = widen(layer["attn"][name]["kernel"])
  nnx.update(mha, state)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, TINY.vocab_size)
  np.testing.assert_allclose(forward(gqa, tokens), forward(mha, tokens), rtol=1e-5, atol=1e-6)


def test_forward_shape_and_dtypes():
  model = make_model(TINY)
  logits = forward(model, jnp.zeros((3, 10), jnp.int32))
  assert logits.shape == (3, 10, TINY.vocab_size)
  assert logits.dtype == jnp.float32
  bf16 = make_model(TINY.with_precision("bf16"))
  assert forward(bf16, jnp.zeros((2, 5), jnp.int32)).dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
  pure = make_model(TINY.with_precision("pure_bf16"))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(pure, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
  with pytest.raises(ValueError, match="unknown precision"):
    TINY.with_precision("fp8")


def test_causality_future_tokens_do_not_change_past_logits():
  model = make_model(TINY, seed=1)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, TINY.vocab_size)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % TINY.vocab_size)
  a, b = forward(model, tokens), forward(model, changed)
  np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
  assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-4


def test_parameters_have_no_biases_and_the_papers_init():
  model = make_model(CONFIGS["9m"].replace(vocab_size=64, num_layers=1))
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  names = {path[-1] for path in flat}
  assert names == {"kernel", "embedding", "weight"}  # no bias anywhere
  assert ("lm_head", "kernel") in flat and ("embed", "embedding") in flat  # untied head
  up = np.asarray(flat[("layers", 0, "mlp", "up_proj", "kernel")][...])
  assert abs(up.std() - 0.02) < 1e-3 and abs(up.mean()) < 1e-3
  np.testing.assert_array_equal(np.asarray(flat[("final_norm", "weight")][...]), 1.0)


def test_rmsnorm_is_computed_in_float32_with_eps_1e_6():
  cfg = TINY.with_precision("pure_bf16")
  norm = RMSNorm(8, cfg)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.bfloat16)
  x32 = np.asarray(x, np.float32)
  want = x32 / np.sqrt((x32 ** 2).mean(-1, keepdims=True) + 1e-6)
  out = norm(x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=1e-2)


def test_rope_scores_depend_only_on_relative_position():
  cos, sin = rope_tables(16, 8, 10000.0)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

  def score(i, j):
    qi = apply_rope(jnp.tile(q, (1, 16, 1, 1)), cos, sin)[0, i, 0]
    kj = apply_rope(jnp.tile(k, (1, 16, 1, 1)), cos, sin)[0, j, 0]
    return float(qi @ kj)

  assert score(5, 2) == pytest.approx(score(9, 6), rel=1e-5)
  assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
  # Position 0 is the identity.
  np.testing.assert_allclose(np.asarray(apply_rope(q, cos[:1], sin[:1])), np.asarray(q))


def test_sharding_annotations_and_fitting_to_a_mesh():
  _, params = nnx.split(abstract_model(CONFIGS["1b"]), nnx.Param)
  specs = models.partition_specs(params)
  layer = specs["layers"][0]
  assert layer["attn"]["q_proj"]["kernel"] == P("fsdp", "tensor")
  assert layer["attn"]["o_proj"]["kernel"] == P("tensor", "fsdp")
  assert layer["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")
  assert specs["final_norm"]["weight"] == P(None)
  mesh = AbstractMesh((2, 4, 2), MESH_AXES)
  # 5461 (1B's intermediate size) does not divide over tensor=2: that axis is dropped there.
  assert fit_spec(P("fsdp", "tensor"), (2048, 5461), mesh) == P("fsdp", None)
  assert fit_spec(P("tensor", "fsdp"), (5461, 2048), mesh) == P(None, "fsdp")
  assert fit_spec(P("fsdp", "tensor"), (2048, 2048), mesh) == P("fsdp", "tensor")
  assert fit_spec(P(("data", "fsdp")), (16,), mesh) == P(("data", "fsdp"))
  assert fit_spec(P(("data", "fsdp")), (4,), mesh) == P("data")


def test_param_shardings_on_a_real_one_device_mesh():
  mesh = jax.make_mesh((1, 1, 1), MESH_AXES)
  _, params = nnx.split(abstract_model(TINY), nnx.Param)
  shardings = models.param_shardings(params, mesh)
  leaves = jax.tree.leaves(shardings)
  assert len(leaves) == len(jax.tree.leaves(nnx.to_pure_dict(params)))
  assert all(s.mesh.shape == mesh.shape for s in leaves)


def test_model_with_mesh_gives_the_same_logits():
  mesh = jax.make_mesh((1, 1, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  plain, sharded = make_model(TINY, seed=3), make_model(TINY, seed=3, mesh=mesh)
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % TINY.vocab_size
  np.testing.assert_allclose(np.asarray(forward(plain, tokens)),
                             np.asarray(forward(sharded, tokens)), rtol=1e-6, atol=1e-6)


def test_remat_gives_the_same_gradients():
  tokens = jnp.arange(20, dtype=jnp.int32).reshape(2, 10) % TINY.vocab_size

  def grads(cfg):
    graphdef, params = nnx.split(make_model(cfg, seed=2), nnx.Param)

    def loss(p):
      return nnx.merge(graphdef, p)(tokens).astype(jnp.float32).mean()

    return jax.jit(jax.grad(loss))(params)

  one_layer = TINY.replace(num_layers=1)
  a, b = grads(one_layer), grads(one_layer.replace(remat=True))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
