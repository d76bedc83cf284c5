"""Throughput accounting: model FLOPs per token, device peaks, and MFU.

MFU (model FLOPs utilisation) = model FLOPs per token x tokens/s / (peak FLOP/s per device x
devices). "Model FLOPs" count what the model needs, not what the program runs: remat's recomputed
forward is not counted (PaLM, Appendix B). Per trained token that is

  6 x (parameters in matrix multiplies: every projection and the lm_head, not the embedding lookup)
  + 12 x layers x seq_len x hidden_size (attention scores q.k and the weighted sum of v, forward 4,
    backward 8, over the full context as PaLM counts it).

Peaks are the dense bfloat16 tensor-core / MXU figures of the vendors' data sheets, per JAX device
(a GPU, a TPU chip; on TPU v2/v3 a JAX device is one of the chip's two cores). A float32 run is
measured against the same bf16 peak, so its MFU reads low, as it should. For a device not in the
table pass ``--peak-flops``; on CPU MFU is left out unless it is given.
"""

from __future__ import annotations

import jax

from models.llama import LlamaConfig

# (substring of jax's device_kind, lower-cased; dense bf16 peak FLOP/s per JAX device). First match
# wins, so the more specific names come first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("gb200", 2.5e15), ("b200", 2.25e15), ("b100", 1.75e15),
    ("gh200", 989e12), ("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12),
    ("h800", 989e12), ("h20", 148e12),
    ("a100", 312e12), ("a800", 312e12), ("a40", 150e12), ("a30", 165e12), ("a10g", 70e12),
    ("a10", 125e12), ("l40s", 362e12), ("l40", 181e12), ("l4", 121e12),
    ("rtx 6000 ada", 364e12), ("rtx 4090", 165e12), ("rtx 3090", 71e12),
    ("v100", 125e12),  # fp16 (V100 has no bf16)
    ("mi300x", 1307e12), ("mi250x", 383e12), ("mi250", 362e12),
    ("tpu v6", 918e12),  # Trillium (v6e, "TPU v6 lite")
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v4 lite", 138e12), ("tpu v4", 275e12),
    ("tpu v3", 61.5e12), ("tpu v2", 22.5e12),  # per core: JAX sees each core as a device
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind, or None if it is not in the table."""
  kind = device_kind.lower()
  for name, peak in PEAK_FLOPS:
    if name in kind:
      return peak
  return None


def device_peak_flops(override: float | None = None, device=None) -> float | None:
  """``override`` if given, else the table's peak for ``device`` (default: the first device).

  None on CPU and on unknown accelerators: a made-up peak would make a made-up MFU.
  """
  if override is not None:
    return float(override)
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return None
  return peak_flops(getattr(device, "device_kind", ""))


def matmul_params(cfg: LlamaConfig) -> int:
  """Parameters used in matrix multiplies per token: all but the embedding table and norms."""
  d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  kv = cfg.kv_heads * cfg.head_dim
  return n * (2 * d * d + 2 * d * kv + 3 * d * f) + d * cfg.vocab_size


def train_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
  """Model FLOPs of one trained token (forward and backward) at context length ``seq_len``."""
  return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * seq_len * cfg.hidden_size


def mfu(tokens_per_s: float, flops_per_token: float, peak_per_device: float | None,
        num_devices: int) -> float | None:
  """Model FLOPs utilisation in [0, 1] (None without a peak)."""
  if not peak_per_device:
    return None
  return tokens_per_s * flops_per_token / (peak_per_device * num_devices)
