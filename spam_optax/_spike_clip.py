"""Spike-aware clipping (SPEC §1.2): the rule, and a standalone optax transform that applies it."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from spam_optax import _numerics, _rounding, _schedules, _tree, _validate


def spikes(g: jax.Array, v: jax.Array, threshold, active=True) -> jax.Array:
  """Where ``g² > θ v`` (SPEC §1.2): the entries SPAM clips; none when inactive or ``θ <= 0``."""
  return active & (threshold > 0) & (g * g > threshold * v)


def clip_spikes(g: jax.Array, v: jax.Array, threshold, active=True, nullify=False) -> jax.Array:
  r"""Clips spiked entries of `g` to the spike boundary ``sqrt(θ v)``, keeping their sign.

  .. math::
    \tilde g = \begin{cases} \mathrm{sign}(g) \sqrt{\theta v} & \text{if } g^2 > \theta v \\
                             g & \text{otherwise} \end{cases}

  `v` is the raw (not bias-corrected) EMA of squared gradients from *before* this gradient. Nothing
  is clipped when `active` is false or ``threshold <= 0``. An inf entry is clipped; a NaN entry is
  not (NaN compares false) and passes through. ``nullify=True`` sets spiked entries to 0 instead
  (the paper's Appendix K ablation).
  """
  spike = spikes(g, v, threshold, active)
  return jnp.where(spike, 0 if nullify else jnp.sign(g) * jnp.sqrt(threshold * v), g)


def count_spikes(g: jax.Array, v: jax.Array, threshold, active=True) -> jax.Array:
  """int32: how many entries `clip_spikes` clips."""
  return jnp.sum(spikes(g, v, threshold, active), dtype=jnp.int32)


class SpikeClipState(NamedTuple):
  """State of `spike_clip`.

  Attributes:
    count: int32, updates done so far (k - 1).
    nu: the raw EMA of the clipped squared gradient, like the params.
    num_clipped: int32, gradient entries clipped (or nullified) by the last update, over all
      leaves; ``optax.tree.get(opt_state, "num_clipped")`` reads it from any enclosing state.
  """

  count: chex.Array
  nu: optax.Updates
  num_clipped: chex.Array


def spike_clip(
    threshold: float = 5000.0,
    *,
    b2: float = 0.999,
    reset_interval: int = 500,
    clip_delay: int = 20,
    nu_dtype=None,
    nullify: bool = False,
    rounding: str = "stochastic",
) -> optax.GradientTransformation:
  r"""Clips gradient spikes element-wise against a running second moment, as SPAM does.

  For update ``k`` (1-based) with raw EMA ``v`` of previous clipped squared gradients:

  .. math::
    v &\leftarrow 0 \quad \text{if } k \bmod ΔT = 0 \\
    \tilde g &= \mathrm{sign}(g)\sqrt{\theta v} \quad \text{where } g^2 > \theta v
        \text{ and } k \ge d \text{ and } (k \bmod ΔT) \ge d, \text{ else } g \\
    v &\leftarrow \beta_2 v + (1 - \beta_2)\, \tilde g^2

  with ``d = clip_delay``. It keeps its own ``v``, so it can sit in front of any optimizer (SGD,
  Lion, Adafactor...). In front of `scale_by_adam_with_reset` with the same ``b2`` and
  ``reset_interval`` its ``v`` equals Adam's, which is why `spam` fuses the two instead of storing
  ``v`` twice.

  Its state counts the entries clipped by the last update (``num_clipped``, int32, over all leaves).

  Example:
    >>> import jax.numpy as jnp, optax, spam_optax as spam
    >>> tx = optax.chain(spam.spike_clip(5000.0), optax.sgd(1e-2))
    >>> clip = spam.spike_clip(5000.0, reset_interval=100, clip_delay=2)
    >>> state = clip.init(jnp.zeros(3))
    >>> g, state = clip.update(jnp.ones(3), state)  # k = 1 < clip_delay: v = 0.001
    >>> g, state = clip.update(jnp.array([1.0, -1.0, 100.0]), state)  # 100² > θ v = 5
    >>> print(g, int(optax.tree.get(state, "num_clipped")))
    [ 1.       -1.        2.236068] 1

  Args:
    threshold: θ, the spike threshold on ``g² / v``; 0 disables clipping.
    b2: decay of the squared-gradient EMA.
    reset_interval: ΔT; ``v`` is zeroed at every update k with k % ΔT == 0.
    clip_delay: no clipping while ``k < clip_delay`` or ``k % ΔT < clip_delay``.
    nu_dtype: dtype of ``v``; defaults to the dtype of the gradient.
    nullify: zero spiked entries instead of clipping them (the paper's clip-vs-nullify ablation).
    rounding: how ``v`` is stored in a dtype narrower than float32: ``"stochastic"`` (default,
      unbiased, with the same random bits as `scale_by_adam_with_reset`'s ``v``, so the two still
      agree in a chain) or ``"nearest"``. No effect on float32 state.

  Returns:
    An `optax.GradientTransformation`.

  References:
    Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training, ICLR 2025.
  """
  _validate.check("threshold", threshold, lambda x: x >= 0, ">= 0")
  _validate.check_beta("b2", b2)
  _validate.check_int("reset_interval", reset_interval, 1)
  _validate.check_int("clip_delay", clip_delay, 0)
  _rounding.check_rounding(rounding)

  def init_fn(params):
    nu = optax.tree.zeros_like(params, dtype=nu_dtype)
    return SpikeClipState(count=jnp.zeros([], jnp.int32), nu=nu,
                          num_clipped=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    k = _schedules.update_index(state.count)
    reset = _schedules.is_reset_update(k, reset_interval)
    active = _schedules.clipping_active(k, reset_interval, clip_delay)

    def leaf(g, v, index):
      dt = _numerics.compute_dtype(g.dtype)
      v_old = jnp.where(reset, 0, v.astype(dt))
      g_dt = g.astype(dt)
      clipped = clip_spikes(g_dt, v_old, threshold, active, nullify)
      v_new = b2 * v_old + (1 - b2) * clipped * clipped
      v_new = _rounding.LeafRounder(rounding, state.count, index).store(
          v_new, v.dtype, _rounding.STREAM_NU)
      return clipped.astype(g.dtype), v_new, count_spikes(g_dt, v_old, threshold, active)

    clipped, nu, counts = _tree.map_multi(leaf, updates, state.nu, _tree.leaf_indices(updates),
                                          n_out=3)
    return clipped, SpikeClipState(count=optax.safe_increment(state.count), nu=nu,
                                   num_clipped=_tree.sum_leaves(counts))

  return optax.GradientTransformation(init_fn, update_fn)
