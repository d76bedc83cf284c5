"""Hugging Face ``LlamaForCausalLM`` checkpoints in and out of :class:`models.Llama`.

The format is what ``transformers``' ``save_pretrained`` writes: a ``config.json`` and the weights
in ``model.safetensors``, or sharded over ``model-0000i-of-0000n.safetensors`` files listed in
``model.safetensors.index.json``. Files are read and written with the ``safetensors`` package on
numpy arrays: neither torch nor the hub is needed.

Hugging Face stores a linear layer's weight as (out, in) and applies ``x @ W.T``; this model stores
the kernel (in, out) and applies ``x @ kernel``, so every projection is transposed on the way in and
out. Norm scales and the embedding table are copied as they are.

Only what this model computes is accepted: a config with scaled RoPE, tied embeddings, biases, an
activation other than SiLU or a ``head_dim`` other than ``hidden_size / num_attention_heads`` is
refused with :class:`UnsupportedCheckpoint` naming the field, rather than loaded into a model that
would silently compute something else.

Example:
  >>> model = from_pretrained("path/to/llama")           # doctest: +SKIP
  >>> to_pretrained(model, "out/llama", dtype="bfloat16")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llama import Llama, LlamaConfig, make_model, stack_layers, unstack_layers

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' default shard size; a checkpoint larger than this is split over several files.
DEFAULT_SHARD_BYTES = 5 * 1024**3


class UnsupportedCheckpoint(ValueError):
  """A checkpoint this model cannot represent exactly, or a malformed checkpoint directory."""


# Per block: this model's parameter path -> (Hugging Face name under model.layers.{i}, transposed).
_BLOCK = {
    ("input_norm", "weight"): ("input_layernorm.weight", False),
    ("attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", True),
    ("attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", True),
    ("attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", True),
    ("attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", True),
    ("post_attn_norm", "weight"): ("post_attention_layernorm.weight", False),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", True),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", True),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", True),
}
_TOP = {
    ("embed", "embedding"): ("model.embed_tokens.weight", False),
    ("final_norm", "weight"): ("model.norm.weight", False),
    ("lm_head", "kernel"): ("lm_head.weight", True),
}
# Buffers some older checkpoints carry; recomputed by the model, so skipped.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _names(num_layers: int) -> dict[tuple, tuple[str, bool]]:
  """Every parameter path of a ``num_layers`` model -> (Hugging Face name, transposed)."""
  out = dict(_TOP)
  for i in range(num_layers):
    for path, (name, transposed) in _BLOCK.items():
      out[("layers", i) + path] = (f"model.layers.{i}.{name}", transposed)
  return out


# ----------------------------------------------------------------------------- config


def _refuse(field: str, value, why: str) -> None:
  raise UnsupportedCheckpoint(f"config.json: {field}={value!r} is not supported ({why})")


def _rope_theta(hf: dict) -> float:
  """RoPE base from either layout: ``rope_parameters`` (transformers >= 5) or ``rope_theta``."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for source, block in (("rope_parameters", params), ("rope_scaling", scaling)):
    kind = block.get("rope_type", block.get("type", "default"))
    if kind not in (None, "default"):
      _refuse(f"{source}.rope_type", kind, "only the default, unscaled rotary embedding is "
              "implemented (no linear / dynamic / yarn / llama3 scaling)")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: Mapping) -> LlamaConfig:
  """This repository's :class:`LlamaConfig` for a Hugging Face Llama ``config.json`` dict.

  Raises UnsupportedCheckpoint for anything the model does not compute (the message names it).
  """
  hf = dict(hf)
  if hf.get("model_type") != "llama":
    _refuse("model_type", hf.get("model_type"), "only Hugging Face 'llama' checkpoints are read")
  if hf.get("hidden_act", "silu") != "silu":
    _refuse("hidden_act", hf["hidden_act"], "the MLP is SwiGLU with SiLU")
  for field in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
    if hf.get(field):
      _refuse(field, hf[field], "the model has an untied lm_head and no biases")
  heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim * heads != hidden:
    _refuse("head_dim", head_dim, f"must be hidden_size / num_attention_heads = {hidden // heads}")
  rope_base = _rope_theta(hf)
  kv = hf.get("num_key_value_heads") or heads
  try:
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hidden,
        intermediate_size=hf["intermediate_size"], num_heads=heads,
        num_kv_heads=None if kv == heads else kv, num_layers=hf["num_hidden_layers"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_base=rope_base,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)))
  except ValueError as e:
    raise UnsupportedCheckpoint(f"config.json: {e}") from e


def config_to_hf(cfg: LlamaConfig, dtype: str) -> dict:
  """A ``config.json`` dict that ``transformers.LlamaConfig`` reads back into this model's shape.

  The RoPE base is written both ways (``rope_theta``, ``rope_parameters``) so that transformers 4
  and 5 read the same model.
  """
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "initializer_range": cfg.init_std, "rope_theta": cfg.rope_base,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
      "rope_scaling": None, "tie_word_embeddings": False, "attention_bias": False,
      "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1, "use_cache": True,
      "torch_dtype": dtype, "dtype": dtype,
  }


# ----------------------------------------------------------------------------- weights


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: LlamaConfig, dtype=None) -> dict:
  """The model's parameters (a pure dict, as ``nnx.to_pure_dict`` gives) from HF tensors.

  Every expected tensor must be present with its shape; an unexpected one (a bias, say) is an error.
  """
  dtype = jnp.dtype(dtype or cfg.param_dtype)
  expected = _names(cfg.num_layers)
  per_layer = cfg.replace(scan_layers=False)
  model = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(make_model(per_layer), nnx.Param)))
  hf_names = {name for name, _ in expected.values()}
  extra = sorted(k for k in tensors if k not in hf_names and not k.endswith(_IGNORED_SUFFIXES))
  if extra:
    raise UnsupportedCheckpoint(f"unexpected tensors (not part of this model): {extra[:5]}"
                                f"{' ...' if len(extra) > 5 else ''}")
  missing = sorted(name for name, _ in expected.values() if name not in tensors)
  if missing:
    raise UnsupportedCheckpoint(f"missing tensors: {missing[:5]}"
                                f"{' ...' if len(missing) > 5 else ''}")
  params: dict = {}
  for path, (name, transposed) in expected.items():
    value = np.asarray(tensors[name])
    value = value.T if transposed else value
    want = _get(model, path).shape
    if value.shape != want:  # reported in Hugging Face's (out, in) order
      stored = value.shape[::-1] if transposed else value.shape
      raise UnsupportedCheckpoint(f"{name}: shape {stored} does not match config.json (expected "
                                  f"{want[::-1] if transposed else want})")
    _set(params, path, np.ascontiguousarray(value).astype(dtype))
  return stack_layers(params) if cfg.scan_layers else params


def params_to_hf(params: Mapping, num_layers: int, dtype=None) -> dict[str, np.ndarray]:
  """Hugging Face tensors (numpy, C-contiguous) from the model's parameters (a pure dict, either
  layout)."""
  params = unstack_layers(params)
  out = {}
  for path, (name, transposed) in _names(num_layers).items():
    value = np.asarray(jax.device_get(_get(params, path)))
    value = value.T if transposed else value
    out[name] = np.ascontiguousarray(value.astype(dtype or value.dtype))
  return out


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


# ----------------------------------------------------------------------------- files


def _check_dir(path: Path) -> None:
  if not (path / CONFIG_FILE).is_file():
    raise UnsupportedCheckpoint(f"{path} is not a Hugging Face model directory (no {CONFIG_FILE})")


def read_config(path: str | Path) -> LlamaConfig:
  path = Path(path)
  _check_dir(path)
  return config_from_hf(json.loads((path / CONFIG_FILE).read_text()))


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
  """All tensors of a directory: ``model.safetensors``, or the shards its index lists."""
  from safetensors.numpy import load_file
  path = Path(path)
  if (path / INDEX_FILE).is_file():
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
  elif (path / SINGLE_FILE).is_file():
    files = [SINGLE_FILE]
  else:
    found = sorted(p.name for p in path.glob("*"))
    raise UnsupportedCheckpoint(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: "
                                f"{found}); only safetensors weights are read, not *.bin")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(load_file(str(path / name)))
  return tensors


def write_tensors(tensors: Mapping[str, np.ndarray], path: str | Path,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
  """Writes ``model.safetensors``, or shards plus an index when larger than ``max_shard_bytes``."""
  from safetensors.numpy import save_file
  path = Path(path)
  shards: list[dict] = [{}]
  size = 0
  for name, value in tensors.items():  # greedy in order, as transformers does
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += value.nbytes
  metadata = {"format": "pt"}  # what transformers' loaders expect in the header
  if len(shards) == 1:
    save_file(shards[0], str(path / SINGLE_FILE), metadata=metadata)
    return [SINGLE_FILE]
  files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for file, shard in zip(files, shards):
    save_file(shard, str(path / file), metadata=metadata)
  index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
           "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}
  (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
  return files


# ----------------------------------------------------------------------------- public


def load_pretrained(path: str | Path, precision: str = "fp32",
                    scan_layers: bool = False) -> tuple[LlamaConfig, dict]:
  """(config, parameters as a pure dict of numpy arrays) of a Hugging Face Llama directory."""
  cfg = read_config(path).with_precision(precision).replace(scan_layers=scan_layers)
  return cfg, params_from_hf(read_tensors(path), cfg)


def from_pretrained(path: str | Path, precision: str = "fp32", scan_layers: bool = False,
                    **model_kwargs) -> Llama:
  """A :class:`Llama` holding the weights of a Hugging Face ``LlamaForCausalLM`` directory.

  Args:
    path: a local directory with ``config.json`` and ``*.safetensors`` (sharded or not).
    precision: ``fp32``, ``bf16`` or ``pure_bf16`` (see ``models.DTYPES``).
    scan_layers: store the layers stacked and run them under ``scan`` (``LlamaConfig.scan_layers``).
    **model_kwargs: passed to :class:`Llama` (e.g. ``mesh``).
  """
  cfg, params = load_pretrained(path, precision, scan_layers)
  model = nnx.eval_shape(lambda: make_model(cfg, **model_kwargs))
  nnx.update(model, jax.tree.map(jnp.asarray, params))
  return model


def to_pretrained(model_or_params, path: str | Path, config: LlamaConfig | None = None,
                  dtype: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
  """Writes a Hugging Face ``LlamaForCausalLM`` directory (config.json + safetensors).

  Args:
    model_or_params: a :class:`Llama`, or its parameters as a pure dict (then pass ``config``).
    path: the output directory (created; existing weight files in it are overwritten).
    config: the model's config when ``model_or_params`` is a dict.
    dtype: ``float32`` / ``bfloat16`` / ``float16`` for the stored weights; default: as held.
    max_shard_bytes: split the weights over several files above this size.

  Returns the directory. ``transformers.LlamaForCausalLM.from_pretrained(path)`` loads it.
  """
  if isinstance(model_or_params, Llama):
    config = model_or_params.config
    params = nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
  elif config is None:
    raise ValueError("to_pretrained(params, ...) needs the model's config=")
  else:
    params = model_or_params
  tensors = params_to_hf(params, config.num_layers, None if dtype is None else jnp.dtype(dtype))
  dtype = dtype or str(next(iter(tensors.values())).dtype)
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  for stale in list(path.glob("model*.safetensors")) + list(path.glob(INDEX_FILE)):
    stale.unlink()  # a previous export's shards would otherwise be read with the new index
  write_tensors(tensors, path, max_shard_bytes)
  (path / CONFIG_FILE).write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
  return path

