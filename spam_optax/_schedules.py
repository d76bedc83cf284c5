"""The reset calendar of SPAM (SPEC §1, steps 1, 2 and 5), in one place.

Every rule is a function of the 1-based index ``k`` of the update being computed; optax transforms
hold ``count = k - 1`` (the number of updates already done), so ``k = count + 1``.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from spam_optax import _validate


def update_index(count: jnp.ndarray) -> jnp.ndarray:
  """The 1-based index k of the update computed from a state whose count is `count`."""
  return count.astype(jnp.int32) + 1


def is_reset_update(k: jnp.ndarray, reset_interval: int) -> jnp.ndarray:
  """Moments are reset at the start of update k when k % ΔT == 0 (SPEC §1.1)."""
  return k % reset_interval == 0


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
  return (k >= clip_delay) & (k % reset_interval >= clip_delay)


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
