"""Dtypes and powers shared by every transform of the package."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype arithmetic and per-tensor statistics use: `dtype`, at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def power(base, exponent: jax.Array, dtype) -> jax.Array:
  """``base ** exponent`` in ``dtype`` for a (possibly traced) float base and an int32 exponent."""
  return jnp.power(jnp.asarray(base, dtype), exponent.astype(dtype))
