"""The reset calendar of SPAM and Stable-SPAM, in one place, and SPAM's post-reset warmup schedule.

Every rule is a function of the 1-based index ``k`` of the update being computed (SPEC: ``k`` for
SPAM, ``T`` for Stable-SPAM); optax transforms hold ``count = k - 1`` (the number of updates already
done), so ``k = count + 1``. An interval may be a Python int or a traced integer
(``optax.inject_hyperparams`` traces integer hyper-parameters); a static interval of 0 means
"never reset" (Stable-SPAM's ``update_proj_gap = 0``).

* ``k`` -- :func:`update_index`;
* reset updates, ``k % ΔT == 0`` -- :func:`is_reset_update`;
* the reset index ``k // ΔT`` (sparse SPAM's re-draws) -- :func:`reset_index`;
* ``t = k % ΔT``, updates since the last reset -- :func:`steps_since_reset`;
* SPAM's clipping window -- :func:`clipping_active`;
* Stable-SPAM's per-tensor step ``s`` -- :func:`statistics_step` and :func:`adam_step`.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import optax

from spam_optax import _validate


def update_index(count: jnp.ndarray) -> jnp.ndarray:
  """The 1-based index k of the update computed from a state whose count is `count` (int32,
  saturating like optax's counts)."""
  return optax.safe_increment(jnp.asarray(count, jnp.int32))


def _never(interval) -> bool:
  """A static interval of 0: no resets at all."""
  return isinstance(interval, numbers.Integral) and not isinstance(interval, bool) and interval == 0


def is_reset_update(k: jnp.ndarray, reset_interval) -> jnp.ndarray:
  """Moments are reset at update k when k % ΔT == 0 (SPEC §1.1, §3.4); never when ΔT = 0."""
  if _never(reset_interval):
    return jnp.zeros([], jnp.bool_)
  if isinstance(reset_interval, numbers.Integral):
    return k % reset_interval == 0
  interval = jnp.asarray(reset_interval, jnp.int32)
  return (interval > 0) & (k % jnp.maximum(interval, 1) == 0)


def reset_index(k: jnp.ndarray, reset_interval: int) -> jnp.ndarray:
  """How many resets happened up to and including update k (0 before the first reset)."""
  return k // reset_interval


def steps_since_reset(k: jnp.ndarray, reset_interval: int) -> jnp.ndarray:
  """t = k % ΔT: the number of updates since the last reset (0 on the reset update itself)."""
  return k % reset_interval


def clipping_active(k: jnp.ndarray, reset_interval: int, clip_delay: int) -> jnp.ndarray:
  """Spike clipping is off while k < clip_delay and while k % ΔT < clip_delay (SPEC §1.2).

  Right after a reset v = 0, so clipping would zero every gradient; the delay lets v build up.
  """
  return (k >= clip_delay) & (steps_since_reset(k, reset_interval) >= clip_delay)


def statistics_step(k: jnp.ndarray, reset_interval) -> jnp.ndarray:
  """Stable-SPAM's official per-tensor step ``s`` seen by AdaClip and AdaGN at update ``k``.

  ``s = k`` up to and including the first reset; after a reset at update ``r`` (the last multiple
  of the interval strictly below ``k``) the official code sets ``s = 1`` after the reset update, so
  the next update sees ``s = 2``: ``s = k - r + 1``. With a static interval of 0: ``s = k``.
  """
  if _never(reset_interval):
    return k
  interval = jnp.asarray(reset_interval, jnp.int32)
  gap = jnp.maximum(interval, 1)
  last_reset = reset_index(k - 1, gap) * gap
  return jnp.where((interval > 0) & (last_reset > 0), k - last_reset + 1, k)


def adam_step(k: jnp.ndarray, reset_interval) -> jnp.ndarray:
  """Stable-SPAM's Adam bias-correction step at update ``k``: :func:`statistics_step`, except 1 on
  a reset update (in the official and the corrected mode alike; they differ in which moments the
  reset update uses, see :func:`spam_optax.scale_by_stable_spam_adam`)."""
  s = statistics_step(k, reset_interval)
  return jnp.where(is_reset_update(k, reset_interval), jnp.ones_like(s), s)


def reset_warmup_schedule(reset_interval: int = 500, warmup_steps: int = 150) -> optax.Schedule:
  r"""The cosine warmup factor SPAM applies to the update after every momentum reset.

  With ``t = k % ΔT`` the number of updates since the last reset and ``N = warmup_steps``:

  .. math::
    s(t) = 1 - 0.99 \cdot \frac{1 + \cos(\pi t / (N + 1))}{2} \quad (t < N), \qquad s(t) = 1 \quad (t \ge N)

  and ``s = 1`` before the first reset (k < ΔT). So s(0) = 0.01 on the reset update itself. This is
  the authors' code (floor 0.01, denominator N + 1), not the paper's formula. It multiplies the
  update on top of the learning-rate schedule: use it with ``optax.scale_by_schedule``.

  Example:
    >>> import optax, spam_optax as spam
    >>> warm = spam.reset_warmup_schedule(reset_interval=10, warmup_steps=4)
    >>> [round(float(warm(c)), 4) for c in range(8, 16)]  # updates k = 9 ... 16
    [1.0, 0.01, 0.1045, 0.352, 0.658, 1.0, 1.0, 1.0]

  Args:
    reset_interval: ΔT, updates between momentum resets.
    warmup_steps: N, updates over which the factor climbs back to 1; must be < ``reset_interval``
      (otherwise s never reaches 1 and the effective learning rate is cut about 5x, a bug in the
      authors' own trainer).

  Returns:
    A schedule ``count -> s(t)`` where ``count = k - 1`` is optax's update count.

  References:
    Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training, ICLR 2025.
  """
  _validate.check_int("reset_interval", reset_interval, 1)
  _validate.check_int("warmup_steps", warmup_steps, 0)
  n, interval = _validate.concrete(warmup_steps), _validate.concrete(reset_interval)
  if n is not None and interval is not None and n >= interval:
    raise ValueError(
        f"warmup_steps ({warmup_steps}) must be < reset_interval ({reset_interval}): the warmup "
        "factor would never reach 1 and silently cut the learning rate about 5x."
    )

  def schedule(count):
    k = update_index(jnp.asarray(count))
    t = steps_since_reset(k, reset_interval)
    rising = 1.0 - 0.99 * (1.0 + jnp.cos(jnp.pi * t / (warmup_steps + 1))) / 2.0
    warming = (k >= reset_interval) & (t < warmup_steps)
    return jnp.where(warming, rising, 1.0)

  return schedule
