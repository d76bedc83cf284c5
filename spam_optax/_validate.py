"""Construction-time checks of hyper-parameters.

Checks run only on concrete scalars: inside `optax.inject_hyperparams` the factory is called again
with traced scalars, which cannot (and need not) be checked a second time; schedules are skipped.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np


def concrete(value) -> float | None:
  """The value as a Python float, or None when it is traced, a callable (schedule) or not a scalar."""
  if isinstance(value, jax.core.Tracer) or callable(value):
    return None
  try:
    return float(value) if np.ndim(value) == 0 else None
  except (TypeError, ValueError):
    return None


def check(name: str, value, ok, requirement: str) -> None:
  """Raises ValueError naming `name` when the concrete `value` fails `ok`."""
  v = concrete(value)
  if v is not None and not ok(v):
    raise ValueError(f"{name} must be {requirement}, got {value!r}")


def check_beta(name: str, value) -> None:
  check(name, value, lambda b: 0.0 <= b < 1.0, "in [0, 1)")


def check_non_negative(name: str, value) -> None:
  check(name, value, lambda v: v >= 0.0, ">= 0")


def check_int(name: str, value, minimum: int) -> None:
  """An integer hyper-parameter (interval, delay) >= minimum; traced values are not checked."""
  if isinstance(value, bool):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  check(name, value, lambda x: x == int(x) and x >= minimum, f"an integer >= {minimum}")



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
