"""Step counters and small helpers shared by the Stable-SPAM transforms.

Stable-SPAM's official code keeps, per tensor, a step ``s`` that is incremented at every update and
set back to 1 at every momentum reset (global update ``T`` with ``T % gap == 0``). In JAX every leaf
is updated at every real update, so ``s`` is the same for every leaf and is a pure function of the
transform's global ``count``: it is recomputed here instead of being stored.

All functions take ``count`` (int32, the number of updates done before this one, so ``T = count + 1``)
and an interval that may be a Python int or a traced integer (``optax.inject_hyperparams`` traces
integer hyper-parameters); an interval of 0 means "never reset", as in the official code.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import optax

from spam_optax import _validate


def global_step(count: jax.Array) -> jax.Array:
  """``T = count + 1``, the 1-based index of the update being computed (saturating int32)."""
  return optax.safe_increment(jnp.asarray(count, jnp.int32))


def _is_static_zero(interval) -> bool:
  return isinstance(interval, numbers.Integral) and not isinstance(interval, bool) and interval == 0


def is_reset_step(count: jax.Array, interval) -> jax.Array:
  """Whether update ``T = count + 1`` is a reset update (``interval > 0`` and ``T % interval == 0``)."""
  t = global_step(count)
  if _is_static_zero(interval):
    return jnp.zeros([], jnp.bool_)
  interval = jnp.asarray(interval, jnp.int32)
  return (interval > 0) & (t % jnp.maximum(interval, 1) == 0)


def statistics_step(count: jax.Array, interval) -> jax.Array:
  """The official per-tensor step ``s`` seen by AdaClip and AdaGN at update ``T = count + 1``.

  ``s = T`` up to and including the first reset; after a reset at update ``r`` (the last multiple of
  ``interval`` strictly below ``T``) the official code sets ``s = 1`` after the reset update, so the
  next update sees ``s = 2``: ``s = T - r + 1``. With ``interval == 0`` this is the global count ``T``.
  """
  t = global_step(count)
  if _is_static_zero(interval):
    return t
  interval = jnp.asarray(interval, jnp.int32)
  gap = jnp.maximum(interval, 1)
  last_reset = ((t - 1) // gap) * gap
  return jnp.where((interval > 0) & (last_reset > 0), t - last_reset + 1, t)


def adam_step(count: jax.Array, interval) -> jax.Array:
  """The Adam core's bias-correction step at update ``T = count + 1``.

  Equal to :func:`statistics_step`, except on a reset update, where it is 1. This is the same in the
  official and the corrected mode; what differs between them is which moments the reset update uses
  (see :func:`spam_optax.scale_by_stable_spam_adam`).
  """
  s = statistics_step(count, interval)
  return jnp.where(is_reset_step(count, interval), jnp.ones_like(s), s)


def stat_dtype(dtype) -> jnp.dtype:
  """Dtype of per-tensor statistics and default moment dtype: the leaf's dtype, at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def power(base, exponent: jax.Array, dtype) -> jax.Array:
  """``base ** exponent`` in ``dtype`` for a (possibly traced) float base and an int32 exponent."""
  return jnp.power(jnp.asarray(base, dtype), exponent.astype(dtype))


def check_interval(name: str, value, minimum: int = 0) -> None:
  """An integer hyper-parameter, checked only when concrete (it may be traced by inject_hyperparams)."""
  _validate.check_int(name, value, minimum)


check = _validate.check
check_beta = _validate.check_beta


def check_non_negative(name: str, value) -> None:
  check(name, value, lambda v: v >= 0.0, ">= 0")


def float_dtype_or_none(name: str, dtype):
  """``jnp.dtype(dtype)`` for a floating dtype, None for None; ValueError naming ``name`` otherwise."""
  if dtype is None:
    return None
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"{name} must be a floating dtype or None, got {dtype!r}") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype or None, got {dtype}")
  return dtype
