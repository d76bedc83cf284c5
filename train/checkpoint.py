"""Checkpoints with orbax-checkpoint's ``CheckpointManager`` (the ``args`` API).

One checkpoint per step directory, with two items:

* ``state``: the train state (step, parameters, optimizer state) as a nested dict of arrays. Typed
  PRNG keys in the optimizer state (sparse SPAM's subset key) are stored as their raw ``key_data``
  (uint32) and re-wrapped on restore with the implementation recorded in ``meta``; optax's named
  tuples become dicts keyed by field name, so the files do not depend on Python classes.
* ``meta`` (JSON): the run config, a compatibility record (model, optimizer, data, batch...), the
  data position and library versions.

The meta also records the layout version of the state (:data:`FORMAT`): a checkpoint written with
another layout is refused with a message that says so, before anything is read.

Orbax writes a checkpoint to a temporary directory and renames it when complete, so an interrupted
save never looks like a checkpoint. Restoring checks the compatibility record and the stored shapes
first; a mismatch or an unreadable file raises :class:`CheckpointError` naming the checkpoint's
path, and nothing in the directory is modified, deleted or overwritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


# The train state's layout. 2: SPAM's and spike_clip's states hold ``num_clipped`` (and
# Stable-SPAM's chain a weight-decay stage at every value). Checkpoints without a format are 1.
FORMAT = 2
_CHANGES = {1: "SPAM's optimizer state has since gained num_clipped (the entries clipped by the "
               "last update)"}


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored; the message names its path."""


def _entry_name(entry) -> str:
  return jax.tree_util.keystr((entry,), simple=True)


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _path_str(path) -> str:
  return "/".join(_entry_name(e) for e in path)


def to_savable(tree) -> tuple[dict, dict[str, str]]:
  """A nested str-keyed dict of the tree's leaves (keys as key_data) and {path: key impl}."""
  nested: dict = {}
  impls: dict[str, str] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [_entry_name(e) for e in path]
    if _size(leaf) == 0:  # orbax cannot store empty arrays (GaLore's placeholders): rebuilt on load
      continue
    if _is_key(leaf):
      impls[_path_str(path)] = _key_impl_name(leaf)
      leaf = _key_data(leaf)
    node = nested
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = leaf
  return nested, impls


def _size(leaf) -> int:
  return int(np.prod(getattr(leaf, "shape", ())))


def _key_impl_name(leaf) -> str:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf.dtype._impl.name  # no public accessor for an abstract key's implementation
  return str(jax.random.key_impl(leaf))


def _key_data(leaf):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    out = jax.eval_shape(jax.random.key_data, leaf)
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):  # the key data's extra trailing dim
      spec = tuple(sharding.spec) + (None,) * (len(out.shape) - len(sharding.spec))
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
      sharding = None
    return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding)
  return jax.random.key_data(leaf)


def from_savable(nested: dict, abstract_tree, impls: dict[str, str]):
  """Inverse of `to_savable`, shaped like `abstract_tree` (keys re-wrapped)."""
  leaves = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]:
    if _size(leaf) == 0:
      leaves.append(jax.device_put(np.zeros(leaf.shape, leaf.dtype), getattr(leaf, "sharding", None)))
      continue
    node = nested
    for e in path:
      node = node[_entry_name(e)]
    if _is_key(leaf):
      node = jax.random.wrap_key_data(node, impl=impls.get(_path_str(path), "threefry2x32"))
    leaves.append(node)
  return jax.tree_util.tree_structure(abstract_tree).unflatten(leaves)


def _flat_shapes(nested: dict, prefix=()) -> dict[tuple, tuple]:
  out = {}
  for k, v in nested.items():
    if isinstance(v, dict):
      out.update(_flat_shapes(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = (tuple(getattr(v, "shape", ())), str(getattr(v, "dtype", "")))
  return out


class Checkpointer:
  """Saves and restores the train state of one workdir (``WORKDIR/checkpoints/<step>``)."""

  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def path(self, step: int) -> Path:
    return self.directory / str(step)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict[str, Any]) -> bool:
    """Saves unless a checkpoint for `step` exists (a good checkpoint is never overwritten)."""
    if step in self.manager.all_steps():
      return False
    tree, impls = to_savable(state)
    meta = dict(meta, step=int(step), key_impls=impls, format=FORMAT)
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def read_meta(self, step: int) -> dict:
    path = self.path(step)
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for missing / truncated / garbled files
      raise CheckpointError(
          f"checkpoint {path} is corrupt or unreadable (its metadata could not be read: "
          f"{type(e).__name__}: {e}). Remove it to resume from an earlier checkpoint, or use "
          f"another --workdir.") from e
    if not isinstance(meta, dict) or "compat" not in meta:
      raise CheckpointError(f"checkpoint {path} has no compatibility record: it was not written "
                            "by this training script. Use another --workdir.")
    return meta

  def restore(self, step: int, abstract_state, compat: dict) -> tuple[Any, dict]:
    """The state saved at `step`, placed with the shardings of `abstract_state`, and its meta.

    Raises CheckpointError if the checkpoint is unreadable or was written by an incompatible run
    (different model, optimizer, data, batch...), naming the path and the differences.
    """
    path = self.path(step)
    meta = self.read_meta(step)
    written = meta.get("format", 1)
    if written != FORMAT:
      why = _CHANGES.get(written, "it was written by a newer version of this script")
      raise CheckpointError(
          f"checkpoint {path} was written with state format {written}, this training script reads "
          f"format {FORMAT}: {why}. Resume it with the version of the repository that wrote it, or "
          "start a new --workdir.")
    diffs = [f"{k}: checkpoint has {meta['compat'].get(k)!r}, this run has {v!r}"
             for k, v in compat.items() if meta["compat"].get(k) != v]
    if diffs:
      raise CheckpointError(
          f"checkpoint {path} is incompatible with this run:\n  " + "\n  ".join(diffs) +
          "\nUse another --workdir (or the original settings) instead of overwriting it.")
    abstract, _ = to_savable(abstract_state)
    try:
      stored = self.manager.item_metadata(step)["state"]
      stored_shapes = _flat_shapes(dict(stored))
    except Exception as e:
      raise CheckpointError(f"checkpoint {path} is corrupt or unreadable (state metadata: "
                            f"{type(e).__name__}: {e})") from e
    wanted = _flat_shapes(abstract)
    if set(stored_shapes) != set(wanted) or any(
        stored_shapes[k][0] != wanted[k][0] for k in wanted):
      missing = sorted("/".join(map(str, k)) for k in set(wanted) - set(stored_shapes))[:5]
      extra = sorted("/".join(map(str, k)) for k in set(stored_shapes) - set(wanted))[:5]
      shape = [f"{'/'.join(map(str, k))}: {stored_shapes[k][0]} vs {wanted[k][0]}"
               for k in wanted if k in stored_shapes and stored_shapes[k][0] != wanted[k][0]][:5]
      raise CheckpointError(
          f"checkpoint {path} does not match this run's model/optimizer state "
          f"(missing: {missing}, unexpected: {extra}, shape mismatches: {shape}). Use another "
          "--workdir.")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
      state = from_savable(restored, abstract_state, meta.get("key_impls", {}))
    except Exception as e:
      raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: "
                            f"{e}). Remove it to resume from an earlier checkpoint, or use another "
                            "--workdir.") from e
    return state, meta


def host_scalar(x) -> float:
  return float(np.asarray(jax.device_get(x)))
