"""A tree map whose per-leaf function returns several arrays (one tree per output)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def map_multi(fn, tree, *rest, n_out: int):
  """Applies ``fn(leaf, *rest_leaves) -> tuple of n_out`` leaf-wise; returns n_out trees.

  `rest` trees must have `tree`'s structure as a prefix (like jax.tree.map); None and empty nodes
  (optax's MaskedNode) in `tree` hold no leaves and are carried through untouched.
  """
  leaves, treedef = jax.tree.flatten(tree)
  rest_leaves = [treedef.flatten_up_to(r) for r in rest]
  outs = [fn(*args) for args in zip(leaves, *rest_leaves)]
  return tuple(treedef.unflatten([o[i] for o in outs]) for i in range(n_out))


def leaf_indices(tree):
  """A tree like `tree` whose leaves are their positions 0, 1, ... in `jax.tree.leaves(tree)`."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten(list(range(len(leaves))))


def sum_leaves(tree) -> jax.Array:
  """The int32 sum of a tree of int32 scalars (0 for a tree without leaves)."""
  return sum(jax.tree.leaves(tree), jnp.zeros([], jnp.int32))


def stacked_axes_tree(stacked_axes, params):
  """The number of leading "stacked" axes of every leaf: a tree like `params` of ints.

  `stacked_axes` is None (0 for every leaf), an int (every leaf), a tree of ints with `params`'
  structure, or a callable ``params -> tree of ints``. A leaf's first n axes index separate tensors
  (layers stored stacked for ``scan``): whole-tensor statistics are kept per index of those axes.
  """
  tree = stacked_axes(params) if callable(stacked_axes) else stacked_axes
  if tree is None or isinstance(tree, (int, np.integer, jax.Array, np.ndarray)):  # one for all
    # (an array when inject_hyperparams has turned the int into a hyper-parameter)
    tree = jax.tree.map(lambda _: 0 if stacked_axes is None else stacked_axes, params)

  def check(n, p):
    ok = (not isinstance(n, bool) and np.ndim(n) == 0
          and np.issubdtype(np.asarray(n).dtype, np.integer) and 0 <= int(n) <= np.ndim(p))
    if not ok:
      raise ValueError(f"stacked_axes must give each leaf an int in [0, its ndim]; got {n!r} for "
                       f"a leaf of shape {np.shape(p)}")
    return int(n)

  return jax.tree.map(check, tree, params)


def per_tensor(reduce, x: jax.Array, stacked: int) -> jax.Array:
  """``reduce(x, axis)`` over all but the first `stacked` axes (all of them when 0)."""
  return reduce(x, axis=None if stacked == 0 else tuple(range(stacked, x.ndim)))


def broadcast_stacked(s: jax.Array, x: jax.Array) -> jax.Array:
  """A per-tensor value `s` (shape ``x.shape[:s.ndim]``) shaped to broadcast against `x`."""
  return s.reshape(s.shape + (1,) * (x.ndim - s.ndim))
