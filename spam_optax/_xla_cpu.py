"""Rewrites that exist only to steer XLA's fusion and buffer assignment (tests/test_hlo.py).

Each helper computes a plain mathematical value; the way it is written keeps XLA:CPU from copying a
donated moment buffer or materialising a full-size temporary. The math a reader checks against the
SPEC is in the callers; these functions can be replaced by their one-line meaning (given in each
docstring) at the cost of the copies test_hlo.py detects.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def zero_after(x: jax.Array, dtype) -> jax.Array:
  """``0`` (a scalar of `dtype`) that depends on `x` (an array or a scalar, a reduction's result):
  adding it orders a fusion after the one that computes `x`.

  XLA cannot fold it away: it is the sign bit of one entry of `x`, shifted out (0, NaN or not).
  Used so that an in-place moment update runs after every other reader of the old moment;
  otherwise XLA copies the moment buffer.
  """
  if x.size == 0:
    return jnp.zeros([], dtype)
  # x[0, ..., 0], not x.reshape(-1)[0]: a reshape of a sharded x would all-gather it.
  bits = jax.lax.bitcast_convert_type(x[(0,) * x.ndim].astype(jnp.float32), jnp.uint32)
  return ((bits >> 31) >> 1).astype(dtype)


def abs_max(g: jax.Array, axis=None) -> jax.Array:
  """``max |g|`` (over `axis`, default all), written as ``max(max g, -min g)``.

  A reduction of ``|g|`` materialises ``|g|`` in a new full-size buffer on XLA:CPU (the reduce
  emitter does not fuse the abs), which tripled the AdaClip step time.
  """
  return jnp.maximum(jnp.max(g, axis=axis), -jnp.min(g, axis=axis))


def clipped_square(g: jax.Array, v: jax.Array, threshold, active=True) -> jax.Array:
  """``clip_spikes(g, v, threshold, active) ** 2``, written as ``min(g², θ v)``.

  Same value (to rounding) in a different expression: XLA cannot merge it with the clip inside the
  first-moment update, so each moment update stays one fusion with no shared temporary.
  """
  g2 = g * g
  return jnp.where(active & (threshold > 0), jnp.minimum(g2, threshold * v), g2)
