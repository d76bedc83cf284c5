"""Stable-SPAM: AdaClip + AdaGN + Adam with momentum reset, as a chain of optax transforms."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax.numpy as jnp
import optax

from spam_optax import _numerics, _rounding, _schedules, _tree, _validate
from spam_optax._adaptive_clip import adaptive_spike_clip
from spam_optax._adaptive_norm import adaptive_grad_norm
from spam_optax._weight_decay import add_decayed_weights


class ScaleByStableSpamAdamState(NamedTuple):
  """State of :func:`scale_by_stable_spam_adam`.

  Attributes:
    count: int32 number of updates done so far (the global count ``T - 1``). The per-tensor step
      ``s`` of the official code is a function of it and is not stored.
    mu: first moment, like the params, in ``mu_dtype``.
    nu: second moment, like the params, in ``nu_dtype``.

  Resets are applied lazily: the update after a reset treats the stored moments as zero. So in the
  official mode ``mu``/``nu`` right after a reset update still hold that update's moments (the
  official code would store zeros there); every update is identical, and no extra full-size pass
  (or buffer copy) is needed to write the zeros.
  """

  count: chex.Array
  mu: optax.Updates
  nu: optax.Updates


def stable_spam_momentum_scale(total_steps: int, eta_min: float = 0.5) -> optax.Schedule:
  r"""Stable-SPAM's cosine factor on :math:`\beta_1` and :math:`\gamma_1`, as a schedule of ``count``.

  .. math::

    \mathrm{scale}(T) = \eta + (1 - \eta)\,\frac{1 + \cos(\pi T / (T_{\text{total}} + 1))}{2},
    \qquad T = \text{count} + 1,

  i.e. PyTorch's ``CosineAnnealingLR(T_max = total_steps + 1, eta_min)`` evaluated at the 1-based
  update index, with no clamp (past ``total_steps + 1`` the factor rises again, as in the official
  code).

  Examples:
    >>> from spam_optax import stable_spam_momentum_scale
    >>> f = stable_spam_momentum_scale(total_steps=9, eta_min=0.5)
    >>> print(round(float(f(9)), 6))  # T = 10 = total_steps + 1: cos(pi) -> eta_min
    0.5

  Args:
    total_steps: :math:`T_{\text{total}}`, the planned number of updates (``total_T``).
    eta_min: :math:`\eta`, the final value of the factor, in [0, 1].

  Returns:
    A schedule ``count -> scale``.

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam
    <https://arxiv.org/abs/2502.17055>`_, 2025.
  """
  _validate.check_int("total_steps", total_steps, 1)
  _validate.check("eta_min", eta_min, lambda e: 0.0 <= e <= 1.0, "in [0, 1]")

  def schedule(count):
    t = _schedules.update_index(count)
    dtype = jnp.result_type(float)
    frac = t.astype(dtype) / (jnp.asarray(total_steps).astype(dtype) + 1)
    return eta_min + (1 - eta_min) * (1 + jnp.cos(jnp.pi * frac)) / 2

  return schedule


def scale_by_stable_spam_adam(
    b1: float | optax.Schedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    reset_interval: int = 1000,
    corrected_reset: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    rounding: str = "stochastic",
) -> optax.GradientTransformation:
  r"""Adam with Stable-SPAM's momentum reset (PyTorch-style :math:`\epsilon`).

  With :math:`T` the 1-based global update index and :math:`s` the per-tensor step of the official
  code (:math:`s = T` until the first reset, restarted by each reset):

  .. math::

    m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2, \\
    u &= \frac{m / (1 - \beta_1^{s})}{\sqrt{v} / \sqrt{1 - \beta_2^{s}} + \epsilon}

  (the returned update is :math:`u`; chain :func:`optax.scale_by_learning_rate` to step).

  **Reset** on every update with ``T % reset_interval == 0``:

  * default (``corrected_reset=False``, the official code): the reset update itself still uses the
    *old* moments, updated with this gradient, but bias-corrected with :math:`s = 1`; the stored
    moments are then replaced by zeros, which take effect on the next update (:math:`s = 2`).
  * ``corrected_reset=True``: the moments are zeroed *before* the reset update, which is then a
    fresh Adam first step (:math:`s = 1`, :math:`u \approx \operatorname{sign}(g)`).

  ``reset_interval=0`` never resets (as the official ``update_proj_gap=0``). With a schedule for
  :math:`\beta_1` (Stable-SPAM's cosine factor, see :func:`stable_spam_momentum_scale`), the value at
  the current update is used in both the EMA and its bias correction, as in the official code.

  **Low-precision state.** The moments are computed in float32 and rounded once when stored. In a
  dtype narrower than float32 (bfloat16) the default ``rounding="stochastic"`` stores :math:`x` as
  its upper neighbour :math:`hi` with probability :math:`(x - lo)/(hi - lo)`, else as :math:`lo`,
  so :math:`\mathbb{E}[\mathrm{SR}(x)] = x` and :math:`v` decays as in float32;
  ``rounding="nearest"`` is the authors' behaviour (:math:`0.999 v` rounds back to :math:`v`). The
  random bits are a counter-based hash of (count, leaf, moment, position), identical on every
  device and after a restore. Float32 state is not rounded.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from spam_optax import scale_by_stable_spam_adam
    >>> tx = optax.chain(scale_by_stable_spam_adam(reset_interval=500),
    ...                  optax.scale_by_learning_rate(1e-3))
    >>> params = jnp.ones(3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([0.1, -0.2, 0.3]), state, params)
    >>> print(jnp.round(updates / 1e-3, 4))  # first Adam step: -lr * g / (|g| + eps)
    [-1.  1. -1.]
    >>> half = scale_by_stable_spam_adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
    >>> print(half.init(params).nu.dtype)  # stored with stochastic rounding
    bfloat16

  Args:
    b1: decay of the first moment, in [0, 1), or a schedule of the update count returning it.
    b2: decay of the second moment, in [0, 1).
    eps: added to the bias-corrected :math:`\sqrt{v}` (PyTorch placement).
    reset_interval: momentum-reset interval in updates (``update_proj_gap``); 0 disables resets.
    corrected_reset: use the corrected reset described above instead of the official one.
    mu_dtype: dtype of ``mu``; None (default) uses the parameters' dtype (as optax and
      :func:`spam_optax.spam`). Arithmetic is done in at least float32 whatever the storage dtype.
    nu_dtype: dtype of ``nu``; None (default) uses the parameters' dtype.
    rounding: ``"stochastic"`` (default) or ``"nearest"``: how the moments are stored in a dtype
      narrower than float32; no effect on float32 state.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam
    <https://arxiv.org/abs/2502.17055>`_, 2025 (MoRet, Algorithm 1).
    Gupta et al., Deep Learning with Limited Numerical Precision, ICML 2015 (stochastic rounding).
  """
  if not callable(b1):
    _validate.check_beta("b1", b1)
  _validate.check_beta("b2", b2)
  _validate.check_non_negative("eps", eps)
  _validate.check_int("reset_interval", reset_interval, 0)
  if not isinstance(corrected_reset, bool):
    raise ValueError(f"corrected_reset must be a bool, got {corrected_reset!r}")
  mu_dtype = _validate.float_dtype_or_none("mu_dtype", mu_dtype)
  nu_dtype = _validate.float_dtype_or_none("nu_dtype", nu_dtype)
  _rounding.check_rounding(rounding)

  def init_fn(params):
    return ScaleByStableSpamAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params, dtype=nu_dtype),
    )

  def update_fn(updates, state, params=None):
    del params
    k = _schedules.update_index(state.count)
    s = _schedules.adam_step(k, reset_interval)
    if corrected_reset:  # zero the moments before the reset update itself
      start_fresh = _schedules.is_reset_update(k, reset_interval)
    else:  # official: the reset update used the old moments; the zeros apply from the next one
      start_fresh = _schedules.is_reset_update(k - 1, reset_interval) & (k > 1)
    b1_t = b1(state.count) if callable(b1) else b1

    def leaf(g, mu, nu, index):
      # Arithmetic in the wider of the moment and gradient dtypes (float32 for bf16 everything).
      dt = jnp.promote_types(_numerics.compute_dtype(g.dtype), jnp.promote_types(mu.dtype, nu.dtype))
      b1c = jnp.asarray(b1_t, dt)
      gc = g.astype(dt)
      # One fusion per moment that reads and overwrites it in place, then one for u reading the
      # new moments (as optax.adam): reading the old moments for u as well would make XLA copy them.
      mu_prev = jnp.where(start_fresh, jnp.zeros_like(mu), mu).astype(dt)
      nu_prev = jnp.where(start_fresh, jnp.zeros_like(nu), nu).astype(dt)
      m = b1c * mu_prev + (1 - b1c) * gc
      v = b2 * nu_prev + (1 - b2) * gc * gc
      bc1 = 1 - _numerics.power(b1c, s, dt)
      bc2 = 1 - _numerics.power(b2, s, dt)
      u = (m / bc1) / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps)
      rounder = _rounding.LeafRounder(rounding, state.count, index)
      m = rounder.store(m, mu.dtype, _rounding.STREAM_MU)
      v = rounder.store(v, nu.dtype, _rounding.STREAM_NU)
      return u.astype(g.dtype), m, v

    new_updates, new_mu, new_nu = _tree.map_multi(
        leaf, updates, state.mu, state.nu, _tree.leaf_indices(updates), n_out=3)
    return new_updates, ScaleByStableSpamAdamState(
        count=optax.safe_increment(state.count), mu=new_mu, nu=new_nu
    )

  return optax.GradientTransformation(init_fn, update_fn)


def stable_spam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    gamma1: float = 0.7,
    gamma2: float = 0.9,
    gamma3: float = 0.999,
    reset_interval: int = 1000,
    total_steps: int | None = None,
    eta_min: float = 0.5,
    weight_decay: float = 0.0,
    corrected_reset: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    rounding: str = "stochastic",
    stacked_axes: Any = None,
) -> optax.GradientTransformation:
  r"""Stable-SPAM: adaptive spike clipping, adaptive norm, Adam with momentum reset.

  By default this reproduces the authors' official PyTorch code update for update, quirks included.
  Per leaf (tensor), with :math:`T` the 1-based global update index and :math:`s` the official
  per-tensor step (:math:`s = T` until the first reset; a reset at update :math:`r` sets it to 1,
  so update :math:`r + k` sees :math:`s = k + 1`):

  1. **AdaClip** (:func:`adaptive_spike_clip`, decay :math:`\gamma_3`):
     :math:`m_{\max} \leftarrow \gamma_3 m_{\max} + (1-\gamma_3)\max|g|`,
     :math:`\hat m_{\max} = m_{\max}/(1-\gamma_3^{s})`; entries with :math:`|g| > \hat m_{\max}` become
     :math:`g\,\hat m_{\max}/\max|g|`.
  2. **AdaGN** (:func:`adaptive_grad_norm`): :math:`n = \|g\|_2`,
     :math:`m_n \leftarrow \gamma_1' m_n + (1-\gamma_1') n`,
     :math:`v_n \leftarrow \gamma_2 v_n + (1-\gamma_2) n^2`,
     :math:`c = \frac{m_n/(1-\gamma_1'^{s})}{\sqrt{v_n/(1-\gamma_2^{s})}+\epsilon}`, and
     :math:`g \leftarrow g\,c/n` if :math:`n > 0`.
  3. **Adam with momentum reset** (:func:`scale_by_stable_spam_adam`): on updates with
     ``T % reset_interval == 0`` the official code sets :math:`s = 1` but the update still uses the
     old moments; zeros are stored for the next update.
     :math:`u = \frac{m/(1-\beta_1'^{s})}{\sqrt{v}/\sqrt{1-\beta_2^{s}}+\epsilon}`.
  4. :math:`p \leftarrow p - \eta_T\,(u + \lambda p)`: decoupled weight decay via
     :func:`optax.add_decayed_weights` before the learning rate. This equals the official
     ``p *= 1 - lr*wd`` followed by ``p -= lr*u`` exactly, since :math:`u` does not depend on
     :math:`p`.

  The statistics :math:`m_{\max}, m_n, v_n` are never reset. With ``total_steps``,
  :math:`\beta_1' = \beta_1\,\mathrm{scale}(T)` and :math:`\gamma_1' = \gamma_1\,\mathrm{scale}(T)`
  (:func:`stable_spam_momentum_scale`); otherwise :math:`\beta_1' = \beta_1`,
  :math:`\gamma_1' = \gamma_1`. Max and norm are whole-tensor reductions (under ``jit`` with sharded
  arrays XLA reduces across shards). Zero gradients give zero updates, never NaN.

  **Corrected mode** (``corrected_reset=True``). Because the official step :math:`s` restarts at each
  reset while :math:`m_{\max}` does not, after a reset AdaClip divides a long-run average by
  :math:`1-\gamma_3^{s}` with a small :math:`s`: with :math:`\gamma_3 = 0.999` and interval 1000 its
  threshold is ~300x the usual ``max|g|`` on the first update after a reset, ~6x a hundred updates
  later and ~2.4x after three hundred, so only very large spikes are clipped in the first part of
  every interval. AdaGN's output norm is ~0.85 instead of ~1 for the first updates after a reset
  (:math:`\gamma_1 = 0.7, \gamma_2 = 0.9`). And the reset update itself uses the stale moments with
  a first-step bias correction. With
  ``corrected_reset=True`` the moments are zeroed *before* the reset update (a fresh Adam start with
  :math:`s = 1`) and AdaClip/AdaGN bias-correct with the global count :math:`T`, which is what the
  paper describes. Not the default, since it is not what the published runs used.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from spam_optax import stable_spam
    >>> tx = stable_spam(1e-3, reset_interval=500)
    >>> params = {"w": jnp.ones((2, 2))}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([[0.1, -0.2], [0.3, 0.0]])}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: a scalar or a schedule of the update count.
    b1: :math:`\beta_1` of Adam, in [0, 1).
    b2: :math:`\beta_2` of Adam, in [0, 1).
    eps: :math:`\epsilon` of both Adam and AdaGN.
    gamma1: :math:`\gamma_1`, EMA decay of the gradient norm (AdaGN).
    gamma2: :math:`\gamma_2`, EMA decay of the squared gradient norm (AdaGN).
    gamma3: :math:`\gamma_3`, EMA decay of ``max|g|`` (AdaClip).
    reset_interval: momentum-reset interval in updates (the official ``update_proj_gap``); 0 never
      resets.
    total_steps: if given, the cosine factor on :math:`\beta_1` and :math:`\gamma_1` over this many
      updates (the official ``total_T``).
    eta_min: the final value of that factor (:math:`\eta`, in [0, 1]).
    weight_decay: decoupled weight decay :math:`\lambda` (multiplied by the learning rate).
    corrected_reset: the corrected reset described above instead of the official behaviour.
    mu_dtype: dtype of Adam's first moment; None (default) uses the parameters' dtype. Pass
      ``jnp.float32`` to keep float32 moments for bf16 parameters (per-tensor statistics are always
      at least float32).
    nu_dtype: dtype of Adam's second moment; None uses the parameters' dtype.
    rounding: ``"stochastic"`` (default) or ``"nearest"``: how Adam's moments are stored in a
      dtype narrower than float32 (see :func:`scale_by_stable_spam_adam`); no effect on float32.
    stacked_axes: leading axes of a leaf that index separate tensors, for parameters stored
      stacked (layers under ``scan``, as ``--scan-layers`` stores them): an int, a tree of ints
      like the parameters, or a callable ``params -> tree``. AdaClip's max and AdaGN's norm are
      then per tensor, so the update equals the one of the same weights stored per layer.
      Default None (each leaf is one tensor).

  Returns:
    An :class:`optax.GradientTransformation` (an :func:`optax.chain`).

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam
    <https://arxiv.org/abs/2502.17055>`_, 2025.
  """
  if not callable(learning_rate):
    _validate.check_non_negative("learning_rate", learning_rate)
  _validate.check_beta("b1", b1)
  _validate.check_beta("gamma1", gamma1)
  _validate.check_beta("gamma2", gamma2)
  _validate.check_beta("gamma3", gamma3)
  _validate.check_non_negative("weight_decay", weight_decay)
  _validate.check("eta_min", eta_min, lambda e: 0.0 <= e <= 1.0, "in [0, 1]")
  if total_steps is not None:
    _validate.check_int("total_steps", total_steps, 1)
  if not isinstance(corrected_reset, bool):
    raise ValueError(f"corrected_reset must be a bool, got {corrected_reset!r}")

  if total_steps is None:
    b1_t, gamma1_t = b1, gamma1
  else:
    scale = stable_spam_momentum_scale(total_steps, eta_min)
    b1_t = lambda count: b1 * scale(count)
    gamma1_t = lambda count: gamma1 * scale(count)
  stats_interval = 0 if corrected_reset else reset_interval

  parts = [
      adaptive_spike_clip(gamma3, bias_correction_reset_interval=stats_interval,
                          stacked_axes=stacked_axes),
      adaptive_grad_norm(gamma1_t, gamma2, eps, bias_correction_reset_interval=stats_interval,
                         stacked_axes=stacked_axes),
      scale_by_stable_spam_adam(
          b1_t, b2, eps, reset_interval=reset_interval, corrected_reset=corrected_reset,
          mu_dtype=mu_dtype, nu_dtype=nu_dtype, rounding=rounding,
      ),
      add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  ]
  return optax.chain(*parts)
