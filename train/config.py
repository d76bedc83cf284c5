"""Run configuration: one dataclass, and the command line built from it.

Every field of :class:`Config` is a flag (``batch_size`` -> ``--batch-size``); the defaults are the
main job: a few minutes of SPAM pretraining of the ``tiny`` LLaMA on the embedded Shakespeare corpus.
:func:`validate` checks everything that can be checked without reading data or touching a device.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from models import CONFIGS, DTYPES
from models.llama import ATTENTION, REMAT
from models.quant import QUANTS


class ConfigError(ValueError):
  """Bad user input, found before anything is compiled; the message says what to change."""


OPTIMIZERS = ("spam", "stable_spam", "adam", "adamw", "adam_clip_norm", "adam_clip_value",
              "adafactor", "galore", "scale", "adamw_clip_norm", "adamw_zclip", "adamw_skip",
              "spam_clip_norm")
STATE_ROUNDINGS = ("stochastic", "nearest")
TOKENIZERS = ("auto", "byte", "bpe", "t5")
SPIKE_MODES = ("grad", "grad_entries", "input")


@dataclasses.dataclass
class Config:
  # What to train.
  model: str = "tiny"
  optimizer: str = "spam"
  dtype: str = "fp32"  # fp32 | bf16 (bf16 compute, fp32 params) | pure_bf16
  opt_state_dtype: str | None = None  # dtype of the moments; default float32
  # Fake-quantized 4-bit training of the seven projections (models/quant.py, docs/QUANTIZATION.md).
  quant: str = "none"  # none | int4 | fp4
  quant_group_size: int = 256  # along the input dimension, as the authors
  # Run length and batch.
  steps: int = 800
  batch_size: int = 16  # global, in sequences
  seq_len: int = 128
  # Learning rate: linear warmup from 0, then cosine to min_lr_ratio * lr at schedule_steps.
  lr: float = 1e-3
  warmup_steps: int | None = None  # default: 10% of schedule_steps, at most 1000 (the paper)
  schedule_steps: int | None = None  # default: steps
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  # SPAM.
  density: float = 1.0
  threshold: float = 5000.0
  reset_interval: int = 500
  reset_warmup: int = 150
  clip_delay: int = 20
  restart_bias_correction: bool = False  # count Adam's bias correction from the last reset
  # Stable-SPAM (its total_steps is schedule_steps).
  gamma1: float = 0.7
  gamma2: float = 0.9
  gamma3: float = 0.999
  stable_reset_interval: int = 1000
  # GaLore.
  galore_rank: int = 128
  galore_gap: int = 200
  galore_scale: float = 0.25
  # Optimizer-state rounding and the spike defences of other trainers (adamw_zclip, adamw_skip).
  state_rounding: str = "stochastic"  # how moments narrower than float32 are stored (SPAM family)
  zclip_z_thresh: float = 2.5  # spam.zclip's z_thresh (other ZClip settings: its defaults)
  skip_window: int = 128  # spam.skip_step_on_spikes: rolling window of gradient norms (MaxText)
  skip_sigma: float = 6.0  # ... and how many standard deviations above the mean skip a step
  # Data.
  data: str = "shakespeare"  # shakespeare | c4 | PATH (text file, directory, .bin/.npy tokens)
  tokenizer: str = "auto"  # auto: byte for text, t5 for c4, ids as stored for token files
  bpe_vocab: int = 4096
  token_dtype: str = "uint16"  # element type of a raw .bin token file
  vocab_size: int | None = None  # of a token file; default: its largest id + 1
  val_fraction: float = 0.05
  eval_batches: int = 8
  # Bookkeeping.
  workdir: str = "runs/tiny-spam"
  checkpoint_every: int = 200
  eval_every: int = 200
  log_every: int = 10
  keep_checkpoints: int = 3  # 0 keeps all
  seed: int = 0
  progress: bool = True
  plot: bool = True
  spike_monitor: float = 0.0  # > 0: per-layer spike counts (score g²/v above it) and a report
  # Scale.
  mesh: str | None = None  # e.g. data=2,fsdp=4 (axes: data, fsdp, tensor); default: all on data
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  # Spike injection (experiments): with probability spike_prob per step (grad), per gradient entry
  # (grad_entries) or per sequence (input), multiply the gradient by spike_scale, or replace a
  # fraction spike_scale (in (0, 1]) of a sequence's input tokens with random tokens.
  spike_prob: float = 0.0
  spike_scale: float = 100.0
  spike_mode: str = "grad"
  # How the step is computed: speed and memory only (same parameters, same results to rounding).
  attention: str = "auto"  # auto | cpu | xla | cudnn
  scan_layers: bool = False
  remat: str = "none"  # none | block | dots
  # Fine-tuning, export and throughput accounting.
  init_from: str | None = None  # Hugging Face Llama directory or a workdir/checkpoint of this script
  export_hf: str | None = None  # write the final weights as a Hugging Face Llama directory
  peak_flops: float | None = None  # per-device peak FLOP/s for MFU (default: built-in table)

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def total_schedule_steps(self) -> int:
    return self.schedule_steps if self.schedule_steps is not None else self.steps

  @property
  def lr_warmup_steps(self) -> int:
    if self.warmup_steps is not None:
      return self.warmup_steps
    return min(1000, self.total_schedule_steps // 10)


_HELP = {
    "model": f"model config ({', '.join(CONFIGS)})",
    "optimizer": f"optimizer ({', '.join(OPTIMIZERS)})",
    "dtype": f"numerics ({', '.join(DTYPES)})",
    "opt_state_dtype": "dtype of optimizer moments (float32, bfloat16, float16); default float32 "
                       "(SPAM: both moments; optax's Adam family: the first moment)",
    "quant": "fake-quantize weights and activations of the q/k/v/o/gate/up/down projections "
             f"({', '.join(QUANTS)}; straight-through gradients, with qwix; docs/QUANTIZATION.md)",
    "quant_group_size": "--quant group length along the input dimension (the largest divisor of "
                        "the dimension not above it)",
    "steps": "total optimizer steps; rerunning with a larger value resumes from the workdir",
    "batch_size": "global batch size in sequences",
    "schedule_steps": "length of the cosine LR schedule (default: --steps; set it to resume "
                      "into a longer run with an unchanged schedule)",
    "data": "shakespeare (embedded), c4 (HF streaming), or a path: text file, directory of *.txt, "
            "or token file (.bin raw, .npy) of uint16/uint32 ids",
    "mesh": "device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; default: data=#devices)",
    "density": "SPAM momentum density d in (0, 1]",
    "reset_warmup": "SPAM warmup steps N after each momentum reset",
    "restart_bias_correction": "SPAM: restart the bias-correction count at every reset (not the "
                               "authors' code, whose post-reset steps are ~1.9x larger)",
    "state_rounding": "how SPAM / Stable-SPAM store moments narrower than float32 "
                      "(--opt-state-dtype bfloat16): stochastic (unbiased, v still decays) or "
                      "nearest (the authors' pure-bf16 behaviour: 0.999 v rounds back to v)",
    "zclip_z_thresh": "adamw_zclip: z-score above which ZClip clips the gradient norm",
    "skip_window": "adamw_skip: steps in the rolling window of gradient norms",
    "skip_sigma": "adamw_skip: skip a step whose gradient norm exceeds the window's mean by this "
                  "many standard deviations (inner optimizer state untouched)",
    "spike_mode": f"spike injection ({', '.join(SPIKE_MODES)})",
    "attention": "attention kernel: cpu (heads-major matmuls, fastest on XLA:CPU), xla or cudnn "
                 "(jax.nn.dot_product_attention; cudnn = flash attention on NVIDIA GPUs, bf16 "
                 "only); auto = cpu on a CPU backend, else xla",
    "scan_layers": "run the layers under lax.scan: one compiled block whatever the depth (compile "
                   "time grows less), but 16-18%% slower steps on XLA:CPU; false unrolls them "
                   "(parameters and checkpoints are the same either way)",
    "remat": f"recompute in the backward pass ({', '.join(REMAT)}): block = all of each block, "
             "dots = all but the projections' outputs (on XLA:CPU it saves memory only with "
             "--scan-layers true)",
    "init_from": "start from these weights with a fresh optimizer state (fine-tuning): a Hugging "
                 "Face LlamaForCausalLM directory (config.json + safetensors; the model shape comes "
                 "from it and --model is ignored) or a workdir / checkpoints/STEP of this script",
    "export_hf": "at the end, write the final weights to this directory as a Hugging Face "
                 "LlamaForCausalLM (rerun a finished run's command with it to export)",
    "peak_flops": "peak FLOP/s of one device, for MFU (default: a table of GPUs and TPUs; "
                  "without it MFU is omitted on CPU and unknown devices)",
    "spike_monitor": "threshold of the online spike score g²/v (the paper uses 50): log spikes per "
                     "layer type and write spike_report.md and spike_heatmap.png (0: off)",
}


def _parse_bool(text: str) -> bool:
  lowered = text.lower()
  if lowered in ("1", "true", "yes", "on"):
    return True
  if lowered in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m train",
      description="Pretrain a LLaMA with SPAM or a baseline optimizer. With no arguments: "
                  "a few minutes of SPAM on the tiny model and the embedded Shakespeare corpus.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  for field in dataclasses.fields(Config):
    flag = "--" + field.name.replace("_", "-")
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    kwargs: dict[str, Any] = {"default": field.default, "help": _HELP.get(field.name, " ")}
    if kind == "bool":
      kwargs.update(type=_parse_bool, metavar="BOOL")
      parser.add_argument(flag, **kwargs)
      continue
    base = kind.split("|")[0].strip()
    kwargs["type"] = {"int": int, "float": float, "str": str}[base]
    parser.add_argument(flag, **kwargs)
  return parser


def parse_args(argv: list[str] | None = None) -> Config:
  args = build_parser().parse_args(argv)
  return Config(**vars(args))


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(cfg: Config) -> None:
  """Checks names and ranges; raises ConfigError with what to change."""
  _require(cfg.model in CONFIGS,
           f"unknown model {cfg.model!r}; valid models: {', '.join(CONFIGS)}")
  _require(cfg.optimizer in OPTIMIZERS,
           f"unknown optimizer {cfg.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
  _require(cfg.dtype in DTYPES, f"unknown dtype {cfg.dtype!r}; valid: {', '.join(DTYPES)}")
  _require(cfg.attention in ATTENTION,
           f"unknown --attention {cfg.attention!r}; valid: {', '.join(ATTENTION)}")
  _require(cfg.remat in REMAT, f"unknown --remat {cfg.remat!r}; valid: {', '.join(REMAT)}")
  _require(cfg.tokenizer in TOKENIZERS,
           f"unknown tokenizer {cfg.tokenizer!r}; valid tokenizers: {', '.join(TOKENIZERS)}")
  _require(cfg.spike_mode in SPIKE_MODES,
           f"unknown spike mode {cfg.spike_mode!r}; valid: {', '.join(SPIKE_MODES)}")
  _require(cfg.token_dtype in ("uint16", "uint32"),
           f"--token-dtype must be uint16 or uint32, got {cfg.token_dtype!r}")
  _require(cfg.state_rounding in STATE_ROUNDINGS, f"--state-rounding must be one of "
           f"{', '.join(STATE_ROUNDINGS)}, got {cfg.state_rounding!r}")
  _require(cfg.zclip_z_thresh > 0, f"--zclip-z-thresh must be > 0, got {cfg.zclip_z_thresh}")
  _require(isinstance(cfg.skip_window, int) and cfg.skip_window >= 2,
           f"--skip-window must be an integer >= 2, got {cfg.skip_window!r}")
  _require(cfg.skip_sigma >= 0, f"--skip-sigma must be >= 0, got {cfg.skip_sigma}")
  if cfg.opt_state_dtype is not None:
    _require(cfg.opt_state_dtype in ("float32", "bfloat16", "float16"),
             f"--opt-state-dtype must be float32, bfloat16 or float16, got {cfg.opt_state_dtype!r}")
  _require(cfg.quant in QUANTS, f"unknown --quant {cfg.quant!r}; valid: {', '.join(QUANTS)}")
  _require(isinstance(cfg.quant_group_size, int) and cfg.quant_group_size >= 1,
           f"--quant-group-size must be a positive integer, got {cfg.quant_group_size!r}")
  for name in ("steps", "batch_size", "seq_len", "eval_batches", "log_every", "checkpoint_every",
               "eval_every", "reset_interval", "bpe_vocab", "galore_rank", "galore_gap",
               "stable_reset_interval"):
    value = getattr(cfg, name)
    _require(isinstance(value, int) and value >= 1,
             f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
  for name in ("reset_warmup", "clip_delay", "keep_checkpoints", "seed"):
    value = getattr(cfg, name)
    _require(isinstance(value, int) and value >= 0,
             f"--{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
  _require(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
  _require(0 < cfg.density <= 1, f"--density must be in (0, 1], got {cfg.density}")
  _require(cfg.threshold >= 0, f"--threshold must be >= 0, got {cfg.threshold}")
  _require(cfg.reset_warmup < cfg.reset_interval,
           f"--reset-warmup ({cfg.reset_warmup}) must be < --reset-interval "
           f"({cfg.reset_interval}): the warmup factor would never reach 1")
  _require(0 <= cfg.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
  _require(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
  _require(0 < cfg.val_fraction < 1, f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
  _require(cfg.total_schedule_steps >= 1,
           f"--schedule-steps must be a positive integer, got {cfg.schedule_steps}")
  _require(0 <= cfg.lr_warmup_steps <= cfg.total_schedule_steps,
           f"--warmup-steps ({cfg.lr_warmup_steps}) must be in [0, schedule steps "
           f"({cfg.total_schedule_steps})]")
  _require(cfg.spike_monitor >= 0, f"--spike-monitor must be >= 0, got {cfg.spike_monitor}")
  _require(0 <= cfg.spike_prob <= 1, f"--spike-prob must be in [0, 1], got {cfg.spike_prob}")
  if cfg.spike_mode == "input" and cfg.spike_prob > 0:
    _require(0 < cfg.spike_scale <= 1,
             f"with --spike-mode input, --spike-scale is the fraction of tokens replaced and must "
             f"be in (0, 1], got {cfg.spike_scale}")
  if cfg.peak_flops is not None:
    _require(cfg.peak_flops > 0, f"--peak-flops must be > 0, got {cfg.peak_flops}")
  if cfg.init_from is not None:
    _require(Path(cfg.init_from).exists(), f"--init-from {cfg.init_from}: no such file or directory")
  if cfg.density < 1:
    _require(cfg.optimizer == "spam", f"--density applies to spam only (got --optimizer "
                                      f"{cfg.optimizer})")
  if cfg.tokenizer == "t5":
    _require(cfg.data == "c4", "--tokenizer t5 is for --data c4 (the paper's setup)")
