r"""ZClip (adaptive z-score clipping of the global gradient norm) as an optax transform."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from spam_optax import _validate

ZCLIP_MODES = ("zscore", "percentile")
ZCLIP_CLIP_OPTIONS = ("adaptive_scaling", "mean")
_TORCH_EPS = 1e-6  # the ε of torch's clip_grad_norm_ and of ZClip's in-place clip (not `eps`)


class ZClipState(NamedTuple):
  """State of `zclip`.

  Attributes:
    count: int32, updates done so far. The first ``max(1, warmup_steps)`` are the warm-up.
    mean: EMA of the gradient norm (during the warm-up: the mean of the norms seen so far).
    var: EMA of its variance (during the warm-up: the population variance of the norms so far).
  """

  count: chex.Array
  mean: chex.Array
  var: chex.Array


def _global_norm(updates, dtype) -> jax.Array:
  leaves = jax.tree.leaves(updates)
  if not leaves:
    return jnp.zeros([], dtype)
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(dtype))) for g in leaves))


def zclip(
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    max_grad_norm: float | None = 1.0,
    eps: float = 1e-6,
    warmup_steps: int = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: float = 1.0,
    skip_update_on_spike: bool = False,
) -> optax.GradientTransformation:
  r"""ZClip: clips the global gradient norm against an EMA z-score, update for update as ZClip 1.0.0.

  Keyword names and defaults are those of the PyTorch ``zclip.ZClip`` (PyPI ``zclip`` 1.0.0). With
  ``n = ||g||₂`` the global norm of the incoming updates and ``W = max(1, warmup_steps)``:

  **Warm-up** (updates 1 .. W): the norms are collected; at update W the EMA starts from their mean
  and population variance (computed online here, equal up to rounding). Meanwhile, if
  ``max_grad_norm`` is set, ``g`` is clipped as ``torch.nn.utils.clip_grad_norm_`` does:
  ``g <- g · min(1, max_grad_norm / (n + 1e-6))``.

  **After the warm-up**, with :math:`\mu, \sigma^2` the EMA mean and variance,
  :math:`\sigma = \sqrt{\sigma^2}` and :math:`z_t` = ``z_thresh``:

  .. math::
    \text{zscore: } z = \frac{n - \mu}{\sigma + \epsilon}, \quad
    c = \begin{cases} c_f\,\bigl(\mu + z_t \sigma / (z / z_t)\bigr) & \text{adaptive\_scaling} \\
                      \mu & \text{mean} \end{cases}
    \quad\text{if } z > z_t \text{ (a spike), else none;}

  .. math::
    \text{percentile: } c = \mu + z_t \sigma \quad\text{if } n > \mu + z_t \sigma \text{, else none.}

  The clip target is ``e = min(c if spike else n, max_grad_norm)`` (no cap when ``max_grad_norm``
  is None), and ``g <- g · e / (n + 1e-6)`` only if ``n > e``. The EMA is then updated with
  ``x = c`` on a spike (the clip value, before the ``max_grad_norm`` cap) and ``x = n`` otherwise,
  mean first: :math:`\mu \leftarrow \alpha\mu + (1-\alpha)x`,
  :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(x - \mu)^2` with the *new* mean; with
  ``skip_update_on_spike`` a spike leaves the EMA unchanged. ``clip_factor`` (``c_f``) only scales
  the adaptive threshold. Two ε as in the original: ``eps`` in the z-score, 1e-6 in the clip.

  Differences from the PyTorch class: the norm is that of the incoming updates (chain it first, on
  the raw gradients), computed in float32 (or the widest parameter dtype, e.g. float64); the
  statistics live in the state, not in Python, so it works under ``jit``, ``pmap``, sharding and
  checkpointing. A NaN/inf norm is let through (as in ZClip) and poisons the statistics: wrap the
  optimizer in ``optax.apply_if_finite`` to skip such steps.

  Example:
    >>> import jax.numpy as jnp, optax, spam_optax as spam
    >>> tx = optax.chain(spam.zclip(), optax.adamw(1e-3))
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.full(3, 10.0)}, state, params)
    >>> clip = spam.zclip(warmup_steps=2, max_grad_norm=None)
    >>> s = clip.init(params)
    >>> for n in (1.0, 1.2, 1.1):  # warm-up norms 1.0, 1.2 (mean 1.1, std 0.1), then 1.1
    ...   _, s = clip.update({"w": jnp.asarray([n, 0.0, 0.0])}, s)
    >>> g, s = clip.update({"w": jnp.asarray([9.0, 0.0, 0.0])}, s)  # a spike: z ≈ 80
    >>> print(round(float(g["w"][0]), 3))  # clipped to μ + z_t² σ / z = 1.1 + 6.25 · 0.0985 / 80
    1.108

  Args:
    alpha: EMA decay of the mean and variance of the gradient norm.
    z_thresh: z-score threshold (percentile mode: the number of standard deviations).
    max_grad_norm: a cap on the norm, also applied during the warm-up; None for no cap.
    eps: added to the standard deviation in the z-score.
    warmup_steps: updates whose norms initialise the EMA (no adaptive clipping during them).
    mode: ``"zscore"`` or ``"percentile"``.
    clip_option: in zscore mode, ``"adaptive_scaling"`` or ``"mean"`` (ignored in percentile mode).
    clip_factor: multiplies the adaptive-scaling threshold (0.5-0.9 clip more aggressively).
    skip_update_on_spike: leave the EMA unchanged on spikes.

  Returns:
    An `optax.GradientTransformation` whose state is a `ZClipState`.

  References:
    Kumar et al., ZClip: Adaptive Spike Mitigation for LLM Pre-Training, arXiv:2504.02507, 2025
    (code: github.com/bluorion-com/ZClip, PyPI zclip 1.0.0).
  """
  if not isinstance(mode, str) or mode.lower() not in ZCLIP_MODES:
    raise ValueError(f"mode must be one of {', '.join(ZCLIP_MODES)}, got {mode!r}")
  mode = mode.lower()
  if mode == "zscore":
    if not isinstance(clip_option, str) or clip_option.lower() not in ZCLIP_CLIP_OPTIONS:
      raise ValueError(f"clip_option must be one of {', '.join(ZCLIP_CLIP_OPTIONS)} in zscore "
                       f"mode, got {clip_option!r}")
    clip_option = clip_option.lower()
  _validate.check_beta("alpha", alpha)
  if mode == "zscore" and clip_option == "adaptive_scaling":
    _validate.check("z_thresh", z_thresh, lambda x: x > 0, "> 0 with adaptive_scaling")
  else:
    _validate.check("z_thresh", z_thresh, lambda x: x >= 0, ">= 0")
  if max_grad_norm is not None:
    _validate.check("max_grad_norm", max_grad_norm, lambda x: x > 0, "> 0 or None")
  _validate.check("eps", eps, lambda x: x >= 0, ">= 0")
  _validate.check_int("warmup_steps", warmup_steps, 0)
  _validate.check("clip_factor", clip_factor, lambda x: x > 0, "> 0")

  def init_fn(params):
    dtype = jnp.float32
    for x in jax.tree.leaves(params):
      dtype = jnp.promote_types(dtype, x.dtype)
    # One buffer per field: a state built outside jit can then be donated.
    return ZClipState(count=jnp.zeros([], jnp.int32), mean=jnp.zeros([], dtype),
                      var=jnp.zeros([], dtype))

  def update_fn(updates, state, params=None):
    del params
    dt = state.mean.dtype
    n = _global_norm(updates, dt)
    warm = jnp.maximum(jnp.asarray(warmup_steps, jnp.int32), 1)
    in_warmup = state.count < warm

    # Warm-up: running mean and population variance of the norms (Welford).
    seen = (state.count + 1).astype(dt)
    delta = n - state.mean
    w_mean = state.mean + delta / seen
    w_var = state.var + (delta * (n - w_mean) - state.var) / seen
    if max_grad_norm is None:
      w_coef = jnp.ones([], dt)
    else:
      w_coef = jnp.minimum(1, max_grad_norm / (n + _TORCH_EPS))

    # After the warm-up: ZClip's clip value, clip target and EMA update.
    mean, var = state.mean, state.var
    std = jnp.sqrt(var)
    if mode == "percentile":
      threshold = mean + z_thresh * std
      spike = n > threshold
      clip_val = threshold
    else:
      z = (n - mean) / (std + eps)
      spike = z > z_thresh
      if clip_option == "adaptive_scaling":
        eta = z / z_thresh
        clip_val = (mean + (z_thresh * std) / jnp.where(spike, eta, 1)) * clip_factor
      else:
        clip_val = mean
    adaptive = jnp.where(spike, clip_val, n)
    target = adaptive if max_grad_norm is None else jnp.minimum(adaptive, max_grad_norm)
    z_coef = jnp.where(n > target, target / (n + _TORCH_EPS), 1)
    x = jnp.where(spike, clip_val, n)
    e_mean = alpha * mean + (1 - alpha) * x
    e_var = alpha * var + (1 - alpha) * (x - e_mean) ** 2
    frozen = spike & jnp.asarray(skip_update_on_spike, jnp.bool_)
    e_mean = jnp.where(frozen, mean, e_mean)
    e_var = jnp.where(frozen, var, e_var)

    coef = jnp.where(in_warmup, w_coef, z_coef).astype(dt)
    new_mean = jnp.where(in_warmup, w_mean, e_mean).astype(dt)
    new_var = jnp.where(in_warmup, w_var, e_var).astype(dt)
    updates = jax.tree.map(lambda g: (g.astype(dt) * coef).astype(g.dtype), updates)
    return updates, ZClipState(count=optax.safe_increment(state.count), mean=new_mean, var=new_var)

  return optax.GradientTransformation(init_fn, update_fn)
