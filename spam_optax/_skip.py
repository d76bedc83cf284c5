r"""Skipping outlier steps: a z-score of the gradient norm over a rolling window (MaxText, Levanter)."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from spam_optax import _validate


class SkipStepOnSpikesState(NamedTuple):
  """State of `skip_step_on_spikes`.

  Attributes:
    count: int32, steps seen (skipped ones included); the window holds the last ``min(count,
      window)`` of them.
    grad_norms: float32 ``(window,)`` ring buffer of global gradient norms (slot ``step % window``).
    losses: float32 ``(window,)`` ring buffer of losses (zeros unless ``loss=`` is passed).
    last_skipped: bool, whether the last step was skipped.
    total_skipped: int32, steps skipped so far.
    inner_state: the wrapped optimizer's state, untouched by skipped steps.
  """

  count: chex.Array
  grad_norms: chex.Array
  losses: chex.Array
  last_skipped: chex.Array
  total_skipped: chex.Array
  inner_state: optax.OptState


def _window_stats(values: jax.Array, count: jax.Array, window: int):
  """Mean and Bessel-corrected std of the first min(count, window) ring-buffer entries."""
  valid = jnp.minimum(count, window)
  mask = jnp.arange(window) < valid
  mean = jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(1, valid)
  var = jnp.sum(jnp.where(mask, (values - mean) ** 2, 0.0)) / jnp.maximum(1, valid - 1)
  return mean, jnp.sqrt(var)


def skip_step_on_spikes(
    inner: optax.GradientTransformation,
    window: int = 128,
    sigma: float = 6.0,
    *,
    min_history: int | None = None,
    min_std: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips a step whose gradient norm (or loss) is an outlier of the last ``window`` steps.

  With ``n_t = ||g_t||₂`` the global norm of the incoming updates and :math:`\mu, s` the mean and
  Bessel-corrected standard deviation of the norms of the last ``min(t-1, window)`` steps, step
  :math:`t` is an outlier when

  .. math::
    n_t - \mu > \sigma \cdot \max(s, s_{\min}).

  An outlier step returns zero updates and leaves the wrapped optimizer's state exactly as it was
  (the inner update is not run: ``jax.lax.cond``, as MaxText and ``optax.apply_if_finite``), so
  neither the parameters nor the moments see the spike. If ``loss=`` is passed to ``update`` (an extra argument, as in MaxText), the loss is
  tested the same way over its own window and either outlier skips the step. No step is skipped
  while fewer than ``min_history - 1`` values are in the window (default ``min_history =
  max(2, window // 2)``). The current values enter the window after the decision, *also when the
  step is skipped*, so a lasting change of scale becomes the new baseline.

  This is MaxText's ``skip_step_on_spikes`` (``src/maxtext/optimizers/optimizers.py`` at commit
  e591f30, itself after OLMo-core's ``SkipStepOptimizer``; defaults window 128, σ 6) as an optax
  wrapper, with these differences: the gradient norm is computed here from the updates (MaxText
  takes it, and the loss, from the caller and skips nothing without a loss); ``min_std`` floors the
  standard deviation (Levanter's ``skip_bad_steps`` uses 1e-6; MaxText, and the default here,
  none, so a perfectly constant history makes any increase an outlier). A NaN or inf norm is an
  outlier (the step is skipped) and, as in MaxText, enters the window and so makes every step
  skipped until it leaves it: wrap this in ``optax.apply_if_finite`` to keep such steps out.

  Under ``optax.inject_hyperparams`` pass ``static_args=("window", "min_history")`` (they fix the
  state's shapes and the warm-up). Under ``optax.MultiSteps`` each real (averaged) update is a step.

  Example:
    >>> import jax.numpy as jnp, optax, spam_optax as spam
    >>> tx = spam.skip_step_on_spikes(optax.adam(1e-3), window=4, sigma=3.0)
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> for n in (1.0, 1.1, 0.9, 1.0):
    ...   _, state = tx.update({"w": jnp.asarray([n, 0.0])}, state, params)
    >>> updates, state = tx.update({"w": jnp.asarray([100.0, 0.0])}, state, params)
    >>> print(bool(state.last_skipped), float(updates["w"][0]))
    True 0.0

  Args:
    inner: the optimizer (or any transform) to run on steps that are not skipped.
    window: the number of recent steps whose mean and standard deviation define an outlier.
    sigma: how many standard deviations above the mean make an outlier.
    min_history: no skipping while fewer than ``min_history - 1`` steps are in the window;
      default ``max(2, window // 2)`` (MaxText's rule).
    min_std: a floor on the standard deviation (0: none, as MaxText).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SkipStepOnSpikesState`.

  References:
    MaxText, ``skip_step_on_spikes`` (github.com/AI-Hypercomputer/maxtext,
    src/maxtext/optimizers/optimizers.py); Levanter, ``SkipStepConfig`` / ``skip_bad_steps``
    (github.com/stanford-crfm/levanter); OLMo-core, ``SkipStepOptimizer``
    (github.com/allenai/OLMo-core).
  """
  _validate.check_int("window", window, 1)
  _validate.check("sigma", sigma, lambda x: x >= 0, ">= 0")
  _validate.check("min_std", min_std, lambda x: x >= 0, ">= 0")
  if min_history is None:
    min_history = max(2, int(window) // 2)
  _validate.check_int("min_history", min_history, 0)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    zeros = lambda: jnp.zeros([window], jnp.float32)  # one buffer each: the state can be donated
    return SkipStepOnSpikesState(
        count=jnp.zeros([], jnp.int32), grad_norms=zeros(), losses=zeros(),
        last_skipped=jnp.zeros([], jnp.bool_), total_skipped=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    loss = extra_args.get("loss")
    norm = optax.tree.norm(updates).astype(jnp.float32)

    def outlier(value, history):
      mean, std = _window_stats(history, state.count, window)
      return ~(value - mean <= sigma * jnp.maximum(std, min_std))

    skip = outlier(norm, state.grad_norms)
    if loss is not None:
      loss = jnp.asarray(loss, jnp.float32)
      skip = skip | outlier(loss, state.losses)
    skip = skip & (state.count + 1 >= min_history)

    def run(_):
      return inner.update(updates, state.inner_state, params, **extra_args)

    def hold(_):
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run, None)[0])
      return zeros, state.inner_state

    # lax.cond (the inner update is not run on a skipped step), with the update as the *first*
    # branch: with the branches the other way round, or with a select, XLA copies every donated
    # moment and parameter buffer at every step (tests/test_competitors.py checks the HLO).
    new_updates, inner_state = jax.lax.cond(~skip, run, hold, None)
    slot = state.count % window
    losses = state.losses if loss is None else state.losses.at[slot].set(loss)
    return new_updates, SkipStepOnSpikesState(
        count=optax.safe_increment(state.count),
        grad_norms=state.grad_norms.at[slot].set(norm),
        losses=losses,
        last_skipped=skip,
        total_skipped=state.total_skipped + skip.astype(jnp.int32),
        inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
