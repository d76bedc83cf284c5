"""AdaClip: Stable-SPAM's adaptive spike-aware clipping, as an optax transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from spam_optax import _numerics, _schedules, _tree, _validate, _xla_cpu


class AdaptiveSpikeClipState(NamedTuple):
  """State of :func:`adaptive_spike_clip`.

  Attributes:
    count: int32 number of updates done so far.
    max_ema: per leaf, a scalar (one per stacked tensor with ``stacked_axes``): exponential
      moving average of ``max|g|`` of that tensor (not bias-corrected). Dtype: the leaf's dtype
      promoted to at least float32.
  """

  count: chex.Array
  max_ema: optax.Updates


def adaptive_spike_clip(
    decay: float = 0.999,
    *,
    bias_correction_reset_interval: int = 0,
    stacked_axes: Any = None,
) -> optax.GradientTransformation:
  r"""Rescales gradient entries above the running (bias-corrected) maximum of ``|g|``.

  Per leaf (a whole tensor, whatever its sharding), with :math:`s` the bias-correction step:

  .. math::

    m_{\max} &\leftarrow \gamma\, m_{\max} + (1 - \gamma) \max_i |g_i|, \qquad
    \hat m_{\max} = \frac{m_{\max}}{1 - \gamma^{s}}, \\
    g_i &\leftarrow \begin{cases}
      g_i \,\hat m_{\max} / \max_j |g_j| & \text{if } |g_i| > \hat m_{\max}, \\
      g_i & \text{otherwise.} \end{cases}

  Entries above the threshold are *rescaled* by one common factor :math:`\hat m_{\max}/\max|g|`
  (the largest becomes exactly :math:`\hat m_{\max}`), not clamped: their ratios are kept, but an
  entry just above the threshold can end up smaller than unclipped ones. On the first update
  :math:`\hat m_{\max} = \max|g|` and nothing is clipped. A leaf whose gradient is all zeros is
  returned unchanged (no NaN) and only decays :math:`m_{\max}`.

  By default :math:`s` is the global update count (``count + 1``). Stable-SPAM's official code
  instead uses a per-tensor step that is restarted at each momentum reset; set
  ``bias_correction_reset_interval`` to the reset interval to reproduce it: after a reset at update
  ``r``, :math:`s = T - r + 1`, so the long-run :math:`m_{\max}` is divided by
  :math:`1 - \gamma^{s}` with a small :math:`s` (:math:`\approx 0.002` on the update after the
  reset for :math:`\gamma = 0.999`): the threshold is then many times the usual maximum and only
  very large spikes are clipped for a few hundred updates. :func:`spam_optax.stable_spam` does this
  unless ``corrected_reset=True``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from spam_optax import adaptive_spike_clip
    >>> clip = adaptive_spike_clip(decay=0.5)
    >>> state = clip.init(jnp.zeros(3))
    >>> g, state = clip.update(jnp.array([1.0, -2.0, 0.5]), state)  # step 1: max_hat = max|g|
    >>> g, state = clip.update(jnp.array([8.0, 1.0, -0.5]), state)  # max_hat = 4.5 / 0.75 = 6
    >>> print(g)
    [ 6.   1.  -0.5]
    >>> tx = optax.chain(adaptive_spike_clip(), optax.adam(1e-3))  # usable in any chain

  Args:
    decay: :math:`\gamma`, the EMA decay of ``max|g|`` (Stable-SPAM's ``gamma3``), in [0, 1).
    bias_correction_reset_interval: 0 (default) bias-corrects with the global update count; a
      positive value restarts the bias-correction step every that many updates, as Stable-SPAM's
      official code does with its momentum-reset interval.
    stacked_axes: leading axes of a leaf that index separate tensors (layers stored stacked for
      ``scan``): an int for every leaf, a tree of ints like the parameters, or a callable
      ``params -> tree``. ``max|g|`` and its EMA are then per tensor (``max_ema`` of shape
      ``leaf.shape[:n]``), exactly as if each slice were its own leaf.
      Default None: 0 for every leaf.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam
    <https://arxiv.org/abs/2502.17055>`_, 2025 (AdaClip, Algorithm 1).
  """
  _validate.check_beta("decay", decay)
  _validate.check_int("bias_correction_reset_interval", bias_correction_reset_interval, 0)

  def init_fn(params):
    stacked = _tree.stacked_axes_tree(stacked_axes, params)
    zeros = lambda n, p: jnp.zeros(p.shape[:n], _numerics.compute_dtype(p.dtype))
    return AdaptiveSpikeClipState(
        count=jnp.zeros([], jnp.int32), max_ema=jax.tree.map(zeros, stacked, params))

  def update_fn(updates, state, params=None):
    del params
    s = _schedules.statistics_step(_schedules.update_index(state.count),
                                   bias_correction_reset_interval)

    def leaf(g, m):
      if g.size == 0:
        return g, m
      dt = m.dtype
      gmax = _tree.per_tensor(_xla_cpu.abs_max, g, m.ndim).astype(dt)  # m: per tensor
      m_new = (decay * m + (1 - decay) * gmax).astype(dt)
      m_hat = m_new / (1 - _numerics.power(decay, s, dt))
      ratio = m_hat / jnp.where(gmax > 0, gmax, jnp.ones_like(gmax))
      m_hat, ratio = _tree.broadcast_stacked(m_hat, g), _tree.broadcast_stacked(ratio, g)
      clipped = jnp.where(jnp.abs(g) > m_hat, g * ratio, g).astype(g.dtype)
      return clipped, m_new

    new_updates, new_max = _tree.map_multi(leaf, updates, state.max_ema, n_out=2)
    return new_updates, AdaptiveSpikeClipState(
        count=optax.safe_increment(state.count), max_ema=new_max
    )

  return optax.GradientTransformation(init_fn, update_fn)

