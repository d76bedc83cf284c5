"""Hugging Face LlamaForCausalLM checkpoints: parity with HF's logits, round trips, refusals."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _jax_cache
from models import hf

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = ["hf_llama_mha", "hf_llama_gqa"]
HAVE_HF = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def logits_of(model, ids):
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))


def assert_matches_hf(directory: Path, expected: Path):
  want = np.load(expected)
  model = hf.from_pretrained(directory)
  got = logits_of(model, want["input_ids"])
  assert np.abs(want["logits"]).max() > 1.0  # a tolerance below the logits' scale means something
  np.testing.assert_allclose(got, want["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hugging_face_to_float32_rounding(case):
  assert_matches_hf(FIXTURES / case, FIXTURES / case / "expected.npz")


def test_stacked_layers_load_run_and_export_like_per_layer_ones(tmp_path):
  case = FIXTURES / "hf_llama_gqa"
  want = np.load(case / "expected.npz")
  model = hf.from_pretrained(case, scan_layers=True)
  assert nnx.state(model, nnx.Param)["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 32, 64)
  np.testing.assert_allclose(logits_of(model, want["input_ids"]), want["logits"], rtol=1e-5,
                             atol=1e-5)
  written = hf.read_tensors(hf.to_pretrained(model, tmp_path / "out"))
  original = hf.read_tensors(case)
  assert written.keys() == original.keys()
  for name, value in original.items():
    np.testing.assert_array_equal(written[name], value, err_msg=name)


def test_config_is_mapped_with_gqa_rope_base_and_eps():
  cfg = hf.read_config(FIXTURES / "hf_llama_gqa")
  assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (96, 32, 64, 2)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.kv_heads) == (4, 2, 2)
  assert (cfg.rope_base, cfg.norm_eps, cfg.max_seq_len) == (500.0, 1e-5, 64)
  assert hf.read_config(FIXTURES / "hf_llama_mha").num_kv_heads is None


def test_legacy_top_level_rope_theta_is_read():
  raw = json.loads((FIXTURES / "hf_llama_mha" / "config.json").read_text())
  del raw["rope_parameters"]
  raw["rope_theta"] = 1234.0
  assert hf.config_from_hf(raw).rope_base == 1234.0


@pytest.mark.parametrize("case", CASES)
def test_round_trip_writes_the_same_tensors_sharded_or_not(case, tmp_path):
  model = hf.from_pretrained(FIXTURES / case)
  one = hf.to_pretrained(model, tmp_path / "one")
  assert sorted(p.name for p in one.iterdir()) == ["config.json", "model.safetensors"]
  many = hf.to_pretrained(model, tmp_path / "many", max_shard_bytes=30_000)
  assert len(list(many.glob("model-*-of-*.safetensors"))) > 1 and (many / hf.INDEX_FILE).exists()
  original = hf.read_tensors(FIXTURES / case)
  for out in (one, many):
    written = hf.read_tensors(out)
    assert written.keys() == original.keys()
    for name, value in original.items():
      np.testing.assert_array_equal(written[name], value, err_msg=name)
    assert hf.read_config(out) == hf.read_config(FIXTURES / case)


def test_export_in_bfloat16_and_reload_in_bf16_precision(tmp_path):
  model = hf.from_pretrained(FIXTURES / "hf_llama_gqa")
  out = hf.to_pretrained(model, tmp_path, dtype="bfloat16")
  assert {str(v.dtype) for v in hf.read_tensors(out).values()} == {"bfloat16"}
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  again = hf.from_pretrained(out, precision="pure_bf16")
  assert again.lm_head.kernel[...].dtype == jnp.bfloat16
  ids = np.load(FIXTURES / "hf_llama_gqa" / "expected.npz")["input_ids"]
  np.testing.assert_allclose(logits_of(again, ids).astype(np.float32), logits_of(model, ids),
                             atol=0.15)


def test_reexport_removes_stale_shards(tmp_path):
  model = hf.from_pretrained(FIXTURES / "hf_llama_mha")
  hf.to_pretrained(model, tmp_path, max_shard_bytes=30_000)
  hf.to_pretrained(model, tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("change, field", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters.rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type"),
    ({"head_dim": 16}, "head_dim"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
])
def test_unsupported_configs_are_refused_naming_the_field(change, field):
  raw = json.loads((FIXTURES / "hf_llama_mha" / "config.json").read_text())
  raw.update(change)
  with pytest.raises(hf.UnsupportedCheckpoint, match=field):
    hf.config_from_hf(raw)


def test_unexpected_missing_and_misshapen_tensors_are_refused():
  cfg = hf.read_config(FIXTURES / "hf_llama_mha")
  tensors = hf.read_tensors(FIXTURES / "hf_llama_mha")
  with pytest.raises(hf.UnsupportedCheckpoint, match="unexpected tensors.*q_proj.bias"):
    hf.params_from_hf({**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(32)}, cfg)
  with pytest.raises(hf.UnsupportedCheckpoint, match="missing tensors.*lm_head.weight"):
    hf.params_from_hf({k: v for k, v in tensors.items() if k != "lm_head.weight"}, cfg)
  bad = dict(tensors, **{"model.layers.1.mlp.up_proj.weight": np.zeros((32, 64), np.float32)})
  with pytest.raises(hf.UnsupportedCheckpoint,
                     match=r"up_proj.weight: shape \(32, 64\).*\(64, 32\)"):
    hf.params_from_hf(bad, cfg)
  # Buffers older checkpoints carry are ignored.
  hf.params_from_hf({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4)}, cfg)


def test_directories_without_config_or_safetensors_are_refused(tmp_path):
  with pytest.raises(hf.UnsupportedCheckpoint, match="no config.json"):
    hf.from_pretrained(tmp_path)
  shutil.copy(FIXTURES / "hf_llama_mha" / "config.json", tmp_path)
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(hf.UnsupportedCheckpoint, match=r"pytorch_model.bin.*only safetensors"):
    hf.from_pretrained(tmp_path)


@pytest.mark.skipif(not HAVE_HF, reason="needs torch and transformers")
def test_fixture_script_reruns_and_transformers_reads_our_export(tmp_path):
  env = _jax_cache.subprocess_env()
  script = FIXTURES / "make_hf_llama.py"
  proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                        text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for case in CASES:
    assert_matches_hf(tmp_path / case, tmp_path / case / "expected.npz")
  # Our export, read back by transformers, gives HF's logits.
  out = hf.to_pretrained(hf.from_pretrained(tmp_path / "hf_llama_gqa"), tmp_path / "export",
                         max_shard_bytes=30_000)
  check = ("import sys, numpy as np, torch; from transformers import LlamaForCausalLM; "
           "e = np.load(sys.argv[2]); m = LlamaForCausalLM.from_pretrained(sys.argv[1]).eval(); "
           "l = m(torch.from_numpy(e['input_ids']).long()).logits.detach().numpy(); "
           "np.testing.assert_allclose(l, e['logits'], rtol=1e-5, atol=1e-5); print('ok')")
  proc = subprocess.run([sys.executable, "-c", check, str(out),
                         str(tmp_path / "hf_llama_gqa" / "expected.npz")],
                        capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
