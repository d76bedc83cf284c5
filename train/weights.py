"""Weights in and out: ``--init-from PATH`` (a fine-tuning run's start) and ``--export-hf DIR``.

PATH is a Hugging Face ``LlamaForCausalLM`` directory (``config.json`` + safetensors) or a run of
this script: its workdir (the latest checkpoint), its ``checkpoints`` directory, or one
``checkpoints/STEP``. The model's shape comes from PATH; only the parameters are taken, the
optimizer starts fresh and the step count from 0, as in the paper's fine-tuning experiments.
``--export-hf DIR`` writes a run's final weights as a Hugging Face ``LlamaForCausalLM``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from models import hf
from models.llama import LlamaConfig, layers_stacked, stack_layers
from train import checkpoint as ckpt_lib
from train.config import ConfigError

# The compat-record entry of a checkpoint whose blocks are stored stacked (--scan-layers); absent
# for per-layer storage, as in checkpoints written before stacking existed.
STACKED_STORAGE = {"layer_storage": "stacked"}


def _checkpoint_step(path: Path) -> tuple[Path, int] | None:
  """(checkpoints directory, step) when PATH is a run of this script, else None."""
  for directory, step in ((path / "checkpoints", None), (path, None), (path.parent, path.name)):
    if step is not None:
      if not step.isdigit() or not (path / "state").is_dir():
        continue
      return directory, int(step)
    steps = [int(p.name) for p in directory.glob("*")
             if p.name.isdigit() and (p / "state").is_dir()]
    if steps:
      return directory, max(steps)
  return None


def kind(path: str | Path) -> str:
  """``"hf"`` or ``"checkpoint"``; a ConfigError if PATH is neither."""
  path = Path(path)
  if (path / hf.CONFIG_FILE).is_file():
    return "hf"
  if _checkpoint_step(path) is not None:
    return "checkpoint"
  raise ConfigError(f"--init-from {path}: neither a Hugging Face model directory (config.json) "
                    "nor a workdir / checkpoints directory / checkpoints/STEP of this script")


def _read_meta(path: Path) -> tuple[Path, dict]:
  directory, step = _checkpoint_step(path)
  checkpointer = ckpt_lib.Checkpointer(directory, keep=0, async_save=False)
  try:
    return directory / str(step), checkpointer.read_meta(step)
  finally:
    checkpointer.close()


def source_config(path: str | Path) -> LlamaConfig:
  """The model shape stored at PATH (precision, sequence length and remat are the run's)."""
  path = Path(path)
  if kind(path) == "hf":
    try:
      return hf.read_config(path)
    except hf.UnsupportedCheckpoint as e:
      raise ConfigError(f"--init-from {path}: {e}") from e
  _, meta = _read_meta(path)
  fields = {f.name for f in dataclasses.fields(LlamaConfig)} - {"dtype", "param_dtype"}
  return LlamaConfig(**{k: v for k, v in meta["compat"]["model"].items() if k in fields})


def _place(value: np.ndarray, like: jax.ShapeDtypeStruct) -> jax.Array:
  """A global array with ``like``'s dtype and sharding; each process supplies its own shards."""
  value = np.asarray(value).astype(like.dtype)
  return jax.make_array_from_callback(like.shape, like.sharding, lambda index: value[index])


def load_params(path: str | Path, abstract_params):
  """The parameters at PATH, shaped and placed like ``abstract_params`` (ShapeDtypeStructs with
  shardings, keyed as ``nnx.to_pure_dict`` keys them)."""
  path = Path(path)
  if kind(path) == "hf":
    cfg = hf.read_config(path)
    try:
      params = hf.params_from_hf(hf.read_tensors(path), cfg, dtype=np.float32)
    except hf.UnsupportedCheckpoint as e:
      raise ConfigError(f"--init-from {path}: {e}") from e
    if layers_stacked(abstract_params):  # --scan-layers
      params = stack_layers(params)
    return jax.tree.map(_place, params, abstract_params)
  step_dir, meta = _read_meta(path)
  stacked = STACKED_STORAGE.items() <= meta["compat"]["model"].items()
  if stacked != layers_stacked(abstract_params):
    raise ConfigError(
        f"--init-from {step_dir}: its layers are stored {'stacked' if stacked else 'per layer'} "
        f"(a run {'with' if stacked else 'without'} --scan-layers); start this run "
        f"{'with' if stacked else 'without'} --scan-layers, or export it with --export-hf and "
        "start from that directory (Hugging Face weights load in either layout)")
  # Only the parameters are read from the saved train state (its optimizer state is not needed).
  target, _ = ckpt_lib.to_savable({"params": abstract_params})
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        step_dir / "state", args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                        partial_restore=True))
  except Exception as e:  # orbax raises many types for unreadable files
    raise ConfigError(f"--init-from {step_dir}: its parameters could not be read "
                      f"({type(e).__name__}: {e})") from e
  return ckpt_lib.from_savable(restored, {"params": abstract_params}, {})["params"]


def export_hf(params, model_cfg: LlamaConfig, path: str) -> None:
  """Writes the parameters as a Hugging Face Llama directory (process 0; all must call it)."""
  from jax.experimental import multihost_utils
  # Every process takes part in gathering the sharded parameters; process 0 writes them.
  host = (jax.device_get(params) if jax.process_count() == 1 else
          multihost_utils.process_allgather(params, tiled=True))
  if jax.process_index() == 0:
    hf.to_pretrained(host, path, config=model_cfg)
