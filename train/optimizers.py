"""The optimizer menu and the paper's learning-rate schedule.

=================  ===========================================================================
``spam``           ``spam_optax.spam`` (``--density`` < 1: sparse momentum on the projections)
``stable_spam``    ``spam_optax.stable_spam`` (total_steps = the schedule length)
``adam``           ``optax.adam`` (no weight decay)
``adamw``          ``optax.adamw`` with ``--weight-decay``
``adam_clip_norm`` Adam after global-norm clipping to 1.0
``adam_clip_value`` Adam after element-wise clipping to 1e-3
``adafactor``      ``optax.adafactor`` without parameter scaling (the GaLore/SPAM baseline setup)
``galore``         ``optax.contrib.galore`` on the projection kernels (rank, gap, scale 0.25)
``scale``          ``spam_optax.scale``: column-normalised SGD, momentum 0.9 on ``lm_head`` only
``adamw_clip_norm`` AdamW after global-norm clipping to 1.0 (MaxText's and Levanter's default)
``adamw_zclip``    AdamW after ``spam_optax.zclip`` (ZClip, z-score clipping of the norm)
``adamw_skip``     AdamW wrapped in ``spam_optax.skip_step_on_spikes`` (MaxText: window, σ)
``spam_clip_norm`` SPAM after global-norm clipping to 1.0
=================  ===========================================================================

Moments narrower than float32 (``--opt-state-dtype bfloat16``) are stored with stochastic rounding
by SPAM and Stable-SPAM unless ``--state-rounding nearest``.

Every optimizer takes the same schedule: linear warmup from 0 over ``warmup_steps``, then cosine
decay to ``min_lr_ratio`` (10%) of the peak at ``schedule_steps``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import models
import spam_optax as spam
from train.config import Config, ConfigError

# The leaves the authors make sparse (and GaLore projects): attention and MLP projection kernels.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lr_schedule(cfg: Config) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.lr_warmup_steps,
      decay_steps=cfg.total_schedule_steps, end_value=cfg.lr * cfg.min_lr_ratio)


def projection_mask(params) -> Any:
  """True for the attention / MLP projection kernels, False for embeddings, norms and the head."""

  def is_projection(path, _):
    names = [jax.tree_util.keystr((entry,), simple=True) for entry in path]
    return any(n in PROJECTIONS for n in names) and names[-1] == "kernel"

  return jax.tree_util.tree_map_with_path(is_projection, params)


def stacked_layer_axes(params) -> Any:
  """1 for the blocks' weights stored stacked (``--scan-layers``: ``layers/...`` leaves carry a
  leading layer axis), else 0: per-tensor statistics (Stable-SPAM's) stay per layer."""
  stacked = "layers" in params and models.layers_stacked(params)
  return {k: jax.tree.map(lambda _: int(stacked and k == "layers"), v) for k, v in params.items()}


# Optimizers whose per-tensor rules have no notion of stacked layers: with --scan-layers they would
# treat all layers of a weight as one tensor (GaLore would not project the 3-D kernels at all).
PER_TENSOR_ONLY = {"galore": "GaLore projects 2-D matrices (optax.contrib.galore has no batch axes)",
                   "adafactor": "Adafactor clips each tensor's update by its RMS"}


def build_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer named by ``cfg.optimizer`` with the paper's schedule (and spike monitor).

  Hyper-parameters are checked by the library that builds the optimizer: its ``ValueError``
  (β out of range, N >= ΔT, a density outside (0, 1] ...) becomes a ConfigError with its message.
  """
  if cfg.scan_layers and cfg.optimizer in PER_TENSOR_ONLY:
    raise ConfigError(f"--optimizer {cfg.optimizer} with --scan-layers: "
                      f"{PER_TENSOR_ONLY[cfg.optimizer]}, and --scan-layers stores each weight of "
                      "all layers as one stacked tensor; run it without --scan-layers")
  try:
    tx, sched = _named_optimizer(cfg)
    if cfg.spike_monitor > 0:
      tx = optax.chain(spam.spike_monitor(cfg.spike_monitor), tx)
  except ValueError as e:
    raise ConfigError(f"--optimizer {cfg.optimizer}: {e} (names are the library's arguments; "
                      "python -m train --help lists their flags)") from e
  return tx, sched


def _named_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  sched = lr_schedule(cfg)
  # Optimizer state in float32 unless asked otherwise, also with pure-bf16 parameters: in bf16,
  # v * 0.999 rounds back to v and the second moment never decays (SPEC §4).
  mu_dtype = jnp.dtype(cfg.opt_state_dtype or "float32")
  name = cfg.optimizer

  def adam():
    return optax.adam(sched, b1=cfg.b1, b2=cfg.b2, mu_dtype=mu_dtype)

  def adamw():
    return optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                       mu_dtype=mu_dtype)

  if name in ("spam", "spam_clip_norm"):
    kwargs: dict[str, Any] = dict(
        b1=cfg.b1, b2=cfg.b2, threshold=cfg.threshold, reset_interval=cfg.reset_interval,
        warmup_steps=cfg.reset_warmup, clip_delay=cfg.clip_delay, weight_decay=cfg.weight_decay,
        mu_dtype=mu_dtype, nu_dtype=mu_dtype, restart_bias_correction=cfg.restart_bias_correction,
        rounding=cfg.state_rounding, count_clipped=True)  # the spikes the metrics report
    if cfg.density != 1:  # (the library checks its range)
      kwargs.update(density=cfg.density, key=jax.random.key(cfg.seed), sparse_leaves=projection_mask)
    tx = spam.spam(sched, **kwargs)
    if name == "spam_clip_norm":
      tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
    return tx, sched
  if name == "stable_spam":
    return spam.stable_spam(
        sched, b1=cfg.b1, b2=cfg.b2, gamma1=cfg.gamma1, gamma2=cfg.gamma2, gamma3=cfg.gamma3,
        reset_interval=cfg.stable_reset_interval, total_steps=cfg.total_schedule_steps,
        weight_decay=cfg.weight_decay, mu_dtype=mu_dtype, nu_dtype=mu_dtype,
        rounding=cfg.state_rounding, stacked_axes=stacked_layer_axes), sched
  if name == "adam":
    return adam(), sched
  if name == "adamw":
    return adamw(), sched
  if name == "adamw_clip_norm":
    return optax.chain(optax.clip_by_global_norm(1.0), adamw()), sched
  if name == "adamw_zclip":
    return optax.chain(spam.zclip(z_thresh=cfg.zclip_z_thresh), adamw()), sched
  if name == "adamw_skip":
    return spam.skip_step_on_spikes(adamw(), window=cfg.skip_window, sigma=cfg.skip_sigma), sched
  if name == "adam_clip_norm":
    return optax.chain(optax.clip_by_global_norm(1.0), adam()), sched
  if name == "adam_clip_value":
    return optax.chain(optax.clip(1e-3), adam()), sched
  if name == "adafactor":
    return optax.adafactor(sched, multiply_by_parameter_scale=False, clipping_threshold=1.0,
                           weight_decay_rate=cfg.weight_decay or None), sched
  if name == "galore":
    return optax.contrib.galore(
        sched, rank=cfg.galore_rank, update_proj_gap=cfg.galore_gap, scale=cfg.galore_scale,
        weight_decay=cfg.weight_decay, base_optimizer=optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2),
        mask=projection_mask), sched
  if name == "scale":
    return spam.scale(sched), sched  # momentum on the output layer (lm_head)
  raise ConfigError(f"unknown optimizer {name!r}")

