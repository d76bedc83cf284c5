"""AdaGN: Stable-SPAM's adaptive gradient-norm normalisation, as an optax transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from spam_optax import _numerics, _schedules, _tree, _validate


class AdaptiveGradNormState(NamedTuple):
  """State of :func:`adaptive_grad_norm`.

  Attributes:
    count: int32 number of updates done so far.
    mu_norm: per leaf, a scalar (or one per stacked tensor, see ``stacked_axes``): EMA of the leaf's gradient norm :math:`\\|g\\|_2` (not bias-corrected).
    nu_norm: likewise, EMA of :math:`\\|g\\|_2^2` (not bias-corrected).

  Both are in the leaf's dtype promoted to at least float32.
  """

  count: chex.Array
  mu_norm: optax.Updates
  nu_norm: optax.Updates


def adaptive_grad_norm(
    b1: float | optax.Schedule = 0.7,
    b2: float = 0.9,
    eps: float = 1e-8,
    *,
    bias_correction_reset_interval: int = 0,
    stacked_axes: Any = None,
) -> optax.GradientTransformation:
  r"""Rescales each leaf's gradient to an adaptive, Adam-like normalised norm.

  Per leaf (whole-tensor norm, whatever its sharding), with :math:`s` the bias-correction step and
  :math:`\beta_1` possibly a schedule of the update count:

  .. math::

    n &= \|g\|_2, \qquad
    m \leftarrow \beta_1 m + (1-\beta_1)\, n, \qquad
    v \leftarrow \beta_2 v + (1-\beta_2)\, n^2, \\
    c &= \frac{m / (1-\beta_1^{s})}{\sqrt{v / (1-\beta_2^{s})} + \epsilon}, \qquad
    g \leftarrow \begin{cases} g\, c / n & n > 0 \\ g & n = 0. \end{cases}

  The output norm :math:`c` is about 1 while the norm is steady and falls below 1 when the current
  norm spikes above its history (:math:`v` grows faster than :math:`m^2`). With a schedule for
  :math:`\beta_1`, the value at the current update is used both in the EMA and in the bias
  correction, as in Stable-SPAM's official code. Zero gradients are returned unchanged (no NaN).

  By default :math:`s` is the global update count; ``bias_correction_reset_interval`` reproduces
  Stable-SPAM's official per-tensor step that restarts at each momentum reset (see
  :func:`spam_optax.adaptive_spike_clip`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from spam_optax import adaptive_grad_norm
    >>> tx = adaptive_grad_norm()
    >>> state = tx.init(jnp.zeros(2))
    >>> g, state = tx.update(jnp.array([3.0, 4.0]), state)  # first step: norm becomes ~1
    >>> print(jnp.round(g, 6))
    [0.6 0.8]

  Args:
    b1: EMA decay of the norm (Stable-SPAM's ``gamma1``), in [0, 1), or a schedule of the update
      count returning it.
    b2: EMA decay of the squared norm (Stable-SPAM's ``gamma2``), in [0, 1).
    eps: added to the bias-corrected RMS of the norm.
    bias_correction_reset_interval: 0 (default) bias-corrects with the global update count; a
      positive value restarts the step every that many updates (Stable-SPAM's official behaviour).
    stacked_axes: leading axes of a leaf that index separate tensors (layers stored stacked for
      ``scan``): an int for every leaf, a tree of ints like the parameters, or a callable
      ``params -> tree``. The norm and its EMAs are then kept per tensor (``mu_norm`` of shape
      ``leaf.shape[:n]``), exactly as if each slice were its own leaf.
      Default None: 0 for every leaf.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam
    <https://arxiv.org/abs/2502.17055>`_, 2025 (AdaGN, Algorithm 1).
  """
  if not callable(b1):
    _validate.check_beta("b1", b1)
  _validate.check_beta("b2", b2)
  _validate.check_non_negative("eps", eps)
  _validate.check_int("bias_correction_reset_interval", bias_correction_reset_interval, 0)

  def init_fn(params):
    stacked = _tree.stacked_axes_tree(stacked_axes, params)
    zeros = lambda n, p: jnp.zeros(p.shape[:n], _numerics.compute_dtype(p.dtype))
    return AdaptiveGradNormState(
        count=jnp.zeros([], jnp.int32),
        mu_norm=jax.tree.map(zeros, stacked, params),
        nu_norm=jax.tree.map(zeros, stacked, params),
    )

  def update_fn(updates, state, params=None):
    del params
    s = _schedules.statistics_step(_schedules.update_index(state.count),
                                   bias_correction_reset_interval)
    b1_t = b1(state.count) if callable(b1) else b1

    def leaf(g, m, v):
      if g.size == 0:
        return g, m, v
      dt = m.dtype
      n = jnp.sqrt(_tree.per_tensor(jnp.sum, jnp.square(g.astype(dt)), m.ndim))  # m: per tensor
      b1c = jnp.asarray(b1_t, dt)
      m_new = (b1c * m + (1 - b1c) * n).astype(dt)
      v_new = (b2 * v + (1 - b2) * n * n).astype(dt)
      m_hat = m_new / (1 - _numerics.power(b1c, s, dt))
      v_hat = v_new / (1 - _numerics.power(b2, s, dt))
      c = m_hat / (jnp.sqrt(v_hat) + eps)
      factor = jnp.where(n > 0, c / jnp.where(n > 0, n, jnp.ones_like(n)), jnp.ones_like(n))
      return (g * _tree.broadcast_stacked(factor, g)).astype(g.dtype), m_new, v_new

    new_updates, new_mu, new_nu = _tree.map_multi(
        leaf, updates, state.mu_norm, state.nu_norm, n_out=3
    )
    return new_updates, AdaptiveGradNormState(
        count=optax.safe_increment(state.count), mu_norm=new_mu, nu_norm=new_nu
    )

  return optax.GradientTransformation(init_fn, update_fn)
