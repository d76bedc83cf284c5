"""Run configuration: one dataclass; its fields are the command line.

The command line is built by ``tyro`` from :class:`Config` (a maintained dataclass-to-CLI library:
the dataclass stays the single source of names, types, defaults and help, which is each field's
comment or docstring). ``batch_size`` is ``--batch-size``; booleans are switches
(``--scan-layers`` / ``--no-scan-layers``). The defaults are the main job: a few minutes of SPAM
pretraining of the ``tiny`` LLaMA on the embedded Shakespeare corpus.

:func:`validate` checks what only the script knows (names of models, optimizers, data options,
positive step counts). Optimizer hyper-parameters are checked by the library itself when the
optimizer is built: its ``ValueError`` becomes the script's error (``train.optimizers``).
"""

from __future__ import annotations

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
  """Pretrain a LLaMA with SPAM or a baseline optimizer. With no arguments: a few minutes of SPAM
  on the tiny model and the embedded Shakespeare corpus. Rerun the same command to resume."""

  # ---- What to train.
  model: str = "tiny"
  """Model config: tiny, 9m, 20m, 35m, 60m, 130m, 350m, 1b (models/llama.py)."""
  optimizer: str = "spam"
  """spam, stable_spam, adam, adamw, adam_clip_norm, adam_clip_value, adafactor, galore, scale,
  adamw_clip_norm, adamw_zclip, adamw_skip, spam_clip_norm (train/optimizers.py)."""
  dtype: str = "fp32"
  """Numerics: fp32, bf16 (bf16 compute, fp32 params) or pure_bf16."""
  opt_state_dtype: str | None = None
  """Dtype of the optimizer moments (float32, bfloat16, float16); default float32 (SPAM: both
  moments; optax's Adam family: the first moment)."""
  quant: str = "none"
  """Fake-quantize weights and activations of the q/k/v/o/gate/up/down projections: none, int4,
  fp4, fp4_e2m1 (straight-through gradients, with qwix; docs/QUANTIZATION.md)."""
  quant_group_size: int = 256
  """--quant group length along the input dimension (the largest divisor of it not above this)."""

  # ---- Run length and batch.
  steps: int = 800
  """Total optimizer steps. A rerun resumes from the workdir's latest checkpoint; it continues
  exactly as the uninterrupted run when the LR schedule is unchanged (same --steps, or a fixed
  --schedule-steps)."""
  batch_size: int = 16
  """Global batch size in sequences."""
  seq_len: int = 128
  """Tokens per training sequence."""

  # ---- Learning rate: linear warmup from 0, then cosine to min_lr_ratio * lr at schedule_steps.
  lr: float = 1e-3
  warmup_steps: int | None = None
  """LR warmup steps; default 10% of the schedule, at most 1000 (the paper)."""
  schedule_steps: int | None = None
  """Length of the cosine LR schedule (default: --steps; fix it to extend a run without changing
  its schedule)."""
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999

  # ---- SPAM.
  density: float = 1.0
  """SPAM momentum density d in (0, 1]: < 1 keeps moments for a random subset of the projection
  kernels' entries (sparse momentum, re-drawn at every reset)."""
  threshold: float = 5000.0
  """SPAM spike threshold θ (entries with g² > θ v are clipped)."""
  reset_interval: int = 500
  """SPAM momentum reset interval ΔT."""
  reset_warmup: int = 150
  """SPAM warmup steps N after each momentum reset (must be < --reset-interval)."""
  clip_delay: int = 20
  """Updates before SPAM's spike clipping starts."""
  restart_bias_correction: bool = False
  """SPAM: restart the bias-correction count at every reset (not the authors' code, whose
  post-reset steps are ~1.9x larger)."""

  # ---- Stable-SPAM (its total_steps is the schedule length).
  gamma1: float = 0.7
  gamma2: float = 0.9
  gamma3: float = 0.999
  stable_reset_interval: int = 1000

  # ---- GaLore.
  galore_rank: int = 128
  galore_gap: int = 200
  galore_scale: float = 0.25

  # ---- Optimizer-state rounding and the spike defences of other trainers.
  state_rounding: str = "stochastic"
  """How SPAM / Stable-SPAM store moments narrower than float32 (--opt-state-dtype bfloat16):
  stochastic (unbiased, v still decays) or nearest (the authors' pure-bf16 behaviour: 0.999 v
  rounds back to v)."""
  zclip_z_thresh: float = 2.5
  """adamw_zclip: z-score above which ZClip clips the gradient norm (other settings: its defaults)."""
  skip_window: int = 128
  """adamw_skip: steps in the rolling window of gradient norms (MaxText)."""
  skip_sigma: float = 6.0
  """adamw_skip: skip a step whose gradient norm exceeds the window's mean by this many standard
  deviations (the inner optimizer's state is untouched)."""

  # ---- Data.
  data: str = "shakespeare"
  """shakespeare (embedded), c4 (Hugging Face streaming), or a path: text file, directory of
  *.txt, .jsonl documents, or a token file (.bin raw, .npy) of uint16/uint32 ids."""
  tokenizer: str = "auto"
  """auto (byte for text, t5 for c4, ids as stored for token files), byte, bpe or t5."""
  bpe_vocab: int = 4096
  """Vocabulary of the BPE tokenizer trained on the training text (--tokenizer bpe)."""
  token_dtype: str = "uint16"
  """Element type of a raw .bin token file."""
  vocab_size: int | None = None
  """Vocabulary of a token file; default its largest id + 1."""
  val_fraction: float = 0.05
  eval_batches: int = 8

  # ---- Bookkeeping.
  workdir: str = "runs/tiny-spam"
  checkpoint_every: int = 200
  eval_every: int = 200
  log_every: int = 10
  keep_checkpoints: int = 3
  """Checkpoints kept (0: all)."""
  seed: int = 0
  progress: bool = True
  """Show a progress bar (tokens/s, MFU, loss, LR, spikes)."""
  plot: bool = True
  """Write loss_curve.png at the end."""
  sample_tokens: int = 256
  """At the end, print a sample of this many tokens generated from the model (0: none)."""
  spike_monitor: float = 0.0
  """Threshold of the online spike score g²/v (the paper uses 50): log spikes per layer type and
  write spike_report.md and spike_heatmap.png (0: off)."""

  # ---- Scale.
  mesh: str | None = None
  """Device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor); default: every device on data."""
  coordinator_address: str | None = None
  """Multi-host: jax.distributed's coordinator (host:port); detected under SLURM, MPI, TPU pods."""
  num_processes: int | None = None
  process_id: int | None = None

  # ---- Spike injection (experiments).
  spike_prob: float = 0.0
  """With this probability per step (grad), per gradient entry (grad_entries) or per sequence
  (input), multiply the gradient by --spike-scale, or replace a fraction --spike-scale (in (0, 1])
  of a sequence's input tokens with random tokens."""
  spike_scale: float = 100.0
  spike_mode: str = "grad"
  """grad, grad_entries or input."""

  # ---- How the step is computed: speed and memory only (same parameters, same results).
  attention: str = "auto"
  """cpu (heads-major matmuls, fastest on XLA:CPU), xla or cudnn (jax.nn.dot_product_attention;
  cudnn = flash attention on NVIDIA GPUs, bf16 only); auto = cpu on a CPU backend, else xla."""
  scan_layers: bool = False
  """Store each weight of all layers stacked (a leading layer axis) and run the layers under
  lax.scan: compile time nearly flat in depth, but slower steps on XLA:CPU. Changes the checkpoint
  layout (a per-layer checkpoint does not resume with it, nor back); not with galore / adafactor."""
  remat: str = "none"
  """Recompute in the backward pass: none, block (all of each block) or dots (all but the
  projections' outputs; on XLA:CPU it saves memory only with --scan-layers)."""

  # ---- Fine-tuning, export and throughput accounting.
  init_from: str | None = None
  """Start from these weights with a fresh optimizer state (fine-tuning): a Hugging Face
  LlamaForCausalLM directory (config.json + safetensors; the model shape comes from it and --model
  is ignored) or a workdir / checkpoints/STEP of this script."""
  export_hf: str | None = None
  """At the end, write the final weights to this directory as a Hugging Face LlamaForCausalLM
  (rerun a finished run's command with it to export)."""
  peak_flops: float | None = None
  """Peak FLOP/s of one device, for MFU (default: a table of GPUs and TPUs; without it MFU is
  omitted on CPU and unknown devices)."""

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


def parse_args(argv: list[str] | None = None) -> Config:
  """The command line (``python -m train --help``) as a Config; exits with a usage error."""
  import tyro
  return tyro.cli(Config, args=argv, prog="python -m train")


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _one_of(flag: str, value, valid) -> None:
  _require(value in valid, f"unknown {flag} {value!r}; valid: {', '.join(valid)}")


def validate(cfg: Config) -> None:
  """Checks the script's own options; raises ConfigError with what to change."""
  _one_of("--model", cfg.model, CONFIGS)
  _one_of("--optimizer", cfg.optimizer, OPTIMIZERS)
  _one_of("--dtype", cfg.dtype, DTYPES)
  _one_of("--attention", cfg.attention, ATTENTION)
  _one_of("--remat", cfg.remat, tuple(REMAT))
  _one_of("--tokenizer", cfg.tokenizer, TOKENIZERS)
  _one_of("--spike-mode", cfg.spike_mode, SPIKE_MODES)
  _one_of("--token-dtype", cfg.token_dtype, ("uint16", "uint32"))
  _one_of("--state-rounding", cfg.state_rounding, STATE_ROUNDINGS)
  _one_of("--quant", cfg.quant, QUANTS)
  if cfg.opt_state_dtype is not None:
    _one_of("--opt-state-dtype", cfg.opt_state_dtype, ("float32", "bfloat16", "float16"))
  for name in ("steps", "batch_size", "seq_len", "eval_batches", "log_every", "checkpoint_every",
               "eval_every", "bpe_vocab", "quant_group_size", "galore_rank", "galore_gap"):
    value = getattr(cfg, name)
    _require(isinstance(value, int) and value >= 1,
             f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
  for name in ("keep_checkpoints", "seed", "sample_tokens"):
    value = getattr(cfg, name)
    _require(isinstance(value, int) and value >= 0,
             f"--{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
  _require(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
  _require(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
  _require(0 <= cfg.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
  _require(0 < cfg.val_fraction < 1, f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
  _require(cfg.total_schedule_steps >= 1,
           f"--schedule-steps must be a positive integer, got {cfg.schedule_steps}")
  # optax's warmup_cosine_decay_schedule needs room for the decay after the warmup.
  _require(0 <= cfg.lr_warmup_steps < cfg.total_schedule_steps,
           f"--warmup-steps ({cfg.lr_warmup_steps}) must be in [0, schedule steps "
           f"({cfg.total_schedule_steps})): the cosine decay follows the warmup")
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
  if cfg.density != 1:  # its range is the library's to check
    _require(cfg.optimizer == "spam",
             f"--density applies to spam only (got --optimizer {cfg.optimizer})")
  if cfg.tokenizer == "t5":
    _require(cfg.data == "c4", "--tokenizer t5 is for --data c4 (the paper's setup)")
