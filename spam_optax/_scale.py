"""SCALE: column-normalised SGD with first-order momentum only on the output layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from spam_optax import _validate
from spam_optax._spike_monitor import layer_type


def scale_by_column_norm(eps: float = 1e-8, axis: int = -1) -> optax.GradientTransformation:
  r"""Normalises every gradient column to unit l2 norm (stateless).

  For a matrix leaf each slice along `axis` is divided by its norm:
  ``g[..., j] -> g / (||g||_axis + eps)``. With Flax kernels laid out ``(in, out)`` the default
  ``axis=-1`` normalises over the output dimension, as SCALE does (PyTorch's ``(out, in)`` weight
  columns). Leaves with fewer than two dimensions are normalised as one vector; scalars pass.

  Example:
    >>> import optax, spam_optax as spam
    >>> tx = optax.chain(spam.scale_by_column_norm(), optax.sgd(1e-3))

  References:
    Glentis, Li, Han, Hong, A Minimalist Optimizer Design for LLM Pretraining (SCALE), 2025.
  """
  _validate.check("eps", eps, lambda x: x >= 0, ">= 0")

  def update_fn(updates, state, params=None):
    del params

    def normalise(g):
      if g.ndim == 0 or g.size == 0:
        return g
      g32 = g.astype(jnp.promote_types(g.dtype, jnp.float32))
      norm = jnp.sqrt(jnp.sum(g32 * g32, axis=axis if g.ndim >= 2 else None, keepdims=True))
      return (g32 / (norm + eps)).astype(g.dtype)

    return jax.tree.map(normalise, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def output_layer_mask(params):
  """True for the leaves `layer_type` classes as the output layer (``"lm_head"``), else False."""
  return jax.tree_util.tree_map_with_path(lambda path, _: layer_type(path) == "lm_head", params)


def scale(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    *,
    momentum: float = 0.9,
    eps: float = 1e-8,
    axis: int = -1,
    momentum_leaves=None,
) -> optax.GradientTransformation:
  r"""SCALE (Stochastic Column-normAlized Last-layer momEntum).

  ``u = -lr * g / ||g||_col`` for every leaf, with heavy-ball momentum (``optax.trace``) on the
  normalised gradient of the output layer only; the only optimizer state is that one momentum
  buffer (the LM head's size).

  Example:
    >>> import spam_optax as spam
    >>> tx = spam.scale(1e-3)

  Args:
    learning_rate: a float or an optax schedule.
    momentum: decay of the output layer's momentum.
    eps: added to the column norms.
    axis: the axis normalised over (-1: the output dimension of Flax ``(in, out)`` kernels).
    momentum_leaves: pytree of bools or callable ``params -> bools`` choosing the leaves with
      momentum; default: the output layer, the leaves that `layer_type` classes as ``"lm_head"``
      (a path component ``lm_head``, ``head``, ``output`` or ``unembed``).

  References:
    Glentis, Li, Han, Hong, A Minimalist Optimizer Design for LLM Pretraining (SCALE), 2025.
  """
  _validate.check_beta("momentum", momentum)
  if momentum_leaves is None:
    momentum_leaves = output_layer_mask
  return optax.chain(
      scale_by_column_norm(eps, axis),
      optax.masked(optax.trace(decay=momentum), momentum_leaves),
      optax.scale_by_learning_rate(learning_rate),
  )
