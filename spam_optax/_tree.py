"""A tree map whose per-leaf function returns several arrays (one tree per output)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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

