"""Sparse momentum (SPEC §2): run an inner transform on a keyed random subset of each leaf.

The layout, chosen so that sparse state shards like its parameter and expands at the speed of a
dense update:

* The strata run along a leaf's **rows** (axis -2; a vector's only axis). A sparse leaf of shape
  ``(..., n, L)`` keeps ``k = max(1, round(d n))`` entries of every column (every index of the
  other axes). Its compact state has shape ``(..., k, L)``: the same rank and every other
  dimension, so **the parameter's own ``PartitionSpec`` applies unchanged** whenever the sharded
  dimensions divide (a ``(d_in, d_out)`` kernel at d = 0.25 has moments of shape
  ``(d_in / 4, d_out)``). Code that shards optimizer state like its parameters (path-matching
  rules, ``nnx.Optimizer`` metadata) shards sparse SPAM without knowing about it.
* Each column is cut into ``k`` strata and one entry is drawn inside each, so the subset has
  exactly ``k x columns`` entries and every entry has probability exactly ``k / n``. With
  ``g = gcd(k, n)`` the rows are ``g`` blocks of ``m = n / g`` rows holding ``c = k / g`` strata
  each; with ``q, r = divmod(m, c)`` a block is ``c`` main strata of ``q`` rows, interleaved (row
  ``o`` of stratum ``s`` at position ``o c + s``), followed by ``r < c`` tail rows. When ``k``
  divides ``n`` (c = 1, r = 0) every block is one stratum of ``n / k`` consecutive rows and the
  draw is uniform inside it. Otherwise tail row ``t`` of a block joins
  stratum ``(t + pairing) % c`` (``pairing`` uniform in ``[0, c)``, so a stratum has a tail entry
  with probability ``r / c``), and a stratum with a tail entry takes it with probability
  ``c / m`` and else a uniform main entry: every entry, main or tail, then has probability
  ``c / m = k / n``.
* Why rows: the expansion is fused into the parameter update, a loop over the leaf whose inner,
  vectorised dimension is the last axis. With the strata along the rows, each row of that loop
  belongs to one stratum position, so ``q`` and ``c`` cost nothing per entry; along the last axis
  (this module's first layout) every entry needed a division by ``c`` and scalar loads, 5-6x a
  dense update at d = 0.1 (benchmarks/RESULTS.md, section 1).
* Everything happens inside a block, and a block inside a shard (a mesh axis of size T that
  divides both ``k`` and ``n`` divides ``g``). Selection is ``iota == offset`` on the
  ``(..., g, q, c, L)`` view and the expansion back is the same select, followed by the tail rows
  (moved by a roll of a compact-sized array inside its block). No gather or scatter with computed
  indices, nothing XLA's SPMD partitioner must move between devices, and the expansion fuses into
  the parameter update as one branch-free loop. The offsets are computed once per update (a
  compact array of bytes), not once per entry (see ``_offsets_once``).
* The draw is a pure function of (key, leaf, reset index): three 32-bit seeds (the main draw, the
  tail draw and ``pairing``) come from ``jax.random.fold_in(fold_in(key, leaf_index),
  reset_index)``, and the draws of stratum ``i`` (its flat index in the compact state) are a
  counter-based hash (murmur3's 32-bit finaliser) of ``i`` and a seed. So subsets are identical
  on every device, host and mesh and after a restore, differ between keys, are re-drawn at every
  reset and are never stored.
* Leaves that do not fit: rows with ``d n < 1/2`` keep one entry per column (density
  ``1 / n > d``); a vector is a single column; scalars and empty leaves stay dense.

The draw is stratified, not independent as in the authors' code: exactly one entry per stratum,
so every region of the tensor gets its share and the size is exact at every re-draw.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spam_optax import _schedules, _validate
from spam_optax._rounding import flat_index, hash32


class SparseMaskState(NamedTuple):
  """State of `sparse_mask`: update count, the PRNG key the subsets derive from, inner state."""

  count: chex.Array  # int32
  key: chex.PRNGKey  # typed key, jax.random.key(...)
  inner_state: optax.OptState


def row_size(n: int, density: float, multiple: int = 1) -> int:
  """k: the entries kept along a stratified axis of length `n` (per index of the other axes).

  ``max(1, round(d n))``, or with ``multiple`` (which must divide n to apply) a multiple of it, so
  that a mesh axis of that size which splits the parameter along that axis splits k too.
  """
  if multiple > 1 and n % multiple == 0:
    return multiple * max(1, int(round(density * n / multiple)))
  return max(1, int(round(density * n)))


def is_sparse(shape, selected: bool) -> bool:
  """Whether a selected leaf of this shape gets a compact layout (scalars, empty leaves do not)."""
  return bool(selected) and len(shape) >= 1 and math.prod(shape) > 0


def _unit(bits: jax.Array) -> jax.Array:
  """uint32 -> float32 uniform in [0, 1) from the top 24 bits."""
  return (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


_UNROLL = 16  # strata of up to this many entries select with a chain of selects (d >= ~1/16)


def _select(view: jax.Array, offsets: jax.Array, axis: int) -> jax.Array:
  """The entries of `view` at position `offsets` along `axis` (0 where out of range), no gather.

  `offsets` has `view`'s shape without `axis`. A chain of selects over the short axis is
  elementwise on contiguous rows, so XLA fuses it into the moment updates; a masked sum is the
  fallback for long strata (very low densities).
  """
  zero = jnp.zeros([], view.dtype)
  rows = view.shape[axis]
  if rows <= _UNROLL:
    out = jnp.broadcast_to(zero, offsets.shape)
    for o in range(rows):
      out = jnp.where(offsets == o, jax.lax.index_in_dim(view, o, axis, keepdims=False), out)
    return out
  iota = jax.lax.broadcasted_iota(offsets.dtype, view.shape, axis % view.ndim)
  return jnp.sum(jnp.where(iota == jnp.expand_dims(offsets, axis), view, zero), axis=axis)


def _place(compact: jax.Array, offsets: jax.Array, rows: int, axis: int) -> jax.Array:
  """`compact` with a new axis of size `rows` at `axis`, holding each value at its offset, exactly 0
  elsewhere."""
  compact, offsets = jnp.expand_dims(compact, axis), jnp.expand_dims(offsets, axis)
  shape = list(compact.shape)
  shape[axis] = rows
  iota = jax.lax.broadcasted_iota(offsets.dtype, tuple(shape), axis % len(shape))
  return jnp.where(iota == offsets, compact, jnp.zeros([], compact.dtype))
# XLA:CPU fuses a cheap elementwise producer into every consumer, also one that reads each of its
# elements several times (the expansion reads a stratum's offset and value for each of its q
# entries): the draw's hashes then ran once per entry of the full-size update and once per gather,
# and a roll of compact values was redone for every entry. It does not fuse an integer remainder or
# a float division whose dividend is an array into such a consumer, so these two identities, which
# XLA cannot fold, make it compute their argument once, in a compact-sized fusion of its own
# (benchmarks/sparse_parts.py; tests/test_sparse.py checks the compiled expansion).
_MODULI = {jnp.uint8: 251, jnp.uint16: 65521, jnp.uint32: 4294967291}  # primes: x % p == x, x < p


def _offsets_once(x: jax.Array, bound: int) -> jax.Array:
  """Integers 0..bound (held exactly in `x`, any dtype) as the narrowest unsigned type, computed
  once: ``x % p`` for a prime ``p > bound``."""
  dtype, p = next((t, p) for t, p in _MODULI.items() if bound < p)
  return jax.lax.rem(x.astype(dtype), dtype(p))


def _values_once(x: jax.Array) -> jax.Array:
  """Float `x`, computed once: ``x / 1`` (exact, NaN and inf included) with the 1 made of x's
  own bits (``1 + ((bits >> 31) >> 1)``), so that XLA can neither fold it nor hoist a reciprocal."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return x / (1 + ((bits >> 31) >> 1)).astype(x.dtype)


class Strata(NamedTuple):
  """The subset of one leaf for one reset index: its static layout and its drawn offsets.

  The strata run along the leaf's stratified axis (:func:`stratified_axis`: the rows, axis -2, of
  a leaf of rank >= 2; the only axis of a vector); the last axis of a matrix rides along.
  """

  shape: tuple[int, ...]  # the leaf's
  k: int  # entries kept along the stratified axis, per index of the other axes
  offsets: jax.Array  # compact-shaped: the chosen entry inside each stratum; q means its tail entry
  pairing: jax.Array  # int32 in [0, c): tail entry t of a block belongs to stratum (t + pairing) % c

  @staticmethod
  def blocks(shape, k: int) -> tuple[int, int, int, int]:
    """(g, c, q, r): the stratified axis is g blocks of c strata; a block is c main strata of q
    entries (interleaved: entry o of stratum s at position o c + s) followed by r < c tail
    entries."""
    n = shape[stratified_axis(shape)]
    g = math.gcd(k, n)
    c = k // g
    q, r = divmod(n // g, c)
    return g, c, q, r

  @classmethod
  def draw(cls, key: jax.Array, shape, k: int) -> "Strata":
    shape = tuple(shape)
    axis = stratified_axis(shape)
    if not 1 <= k <= shape[axis]:
      raise ValueError(f"k must be in [1, {shape[axis]}], got {k}")
    compact = _compact(shape, k)
    if math.prod(compact) >= 1 << 31:
      raise ValueError(f"a sparse leaf's compact state must have fewer than 2**31 entries: {shape}")
    g, c, q, r = cls.blocks(shape, k)
    seed_main, seed_tail, pairing_bits = jax.random.bits(key, (3,), jnp.uint32)
    index = flat_index(compact)
    offsets = jnp.floor(_unit(hash32(index, seed_main)) * q).astype(jnp.int32)
    offsets = jnp.minimum(offsets, q - 1)
    pairing = (pairing_bits % jnp.uint32(c)).astype(jnp.int32)
    if r:
      # Stratum j is paired with a tail entry when (j - pairing) % c < r (probability r / c); it
      # then takes that entry with probability c / m, which gives every entry probability c / m.
      lead, trail = shape[:axis], shape[axis + 1:]
      j = jax.lax.broadcasted_iota(jnp.int32, lead + (g, c) + trail, len(lead) + 1).reshape(compact)
      paired = jnp.where(j >= pairing, j - pairing, j - pairing + c) < r
      take_tail = paired & (_unit(hash32(index, seed_tail)) < c / (c * q + r))
      offsets = jnp.where(take_tail, q, offsets)
    return cls(shape, k, _offsets_once(offsets, q), pairing)

  @property
  def compact_shape(self) -> tuple[int, ...]:
    return _compact(self.shape, self.k)

  def _views(self):
    """(lead, trail, g, c, q, r): the leaf is lead + (g, c q + r) + trail."""
    axis = stratified_axis(self.shape)
    g, c, q, r = self.blocks(self.shape, self.k)
    return self.shape[:axis], self.shape[axis + 1:], g, c, q, r

  def gather(self, x: jax.Array) -> jax.Array:
    """The compact array of x's chosen entries."""
    lead, trail, g, c, q, r = self._views()
    t = len(trail)
    x = x.reshape(lead + (g, c * q + r) + trail)
    offsets = self.offsets.reshape(lead + (g, c) + trail)
    main = jax.lax.slice_in_dim(x, 0, c * q, axis=-1 - t).reshape(lead + (g, q, c) + trail)
    out = _select(main, offsets, axis=-2 - t)
    if r:  # tail entry t sits in stratum (t + pairing) % c
      tail = jax.lax.slice_in_dim(x, c * q, c * q + r, axis=-1 - t)
      tail = jnp.pad(tail, [(0, 0)] * (x.ndim - 1 - t) + [(0, c - r)] + [(0, 0)] * t)
      out = jnp.where(offsets == q, jnp.roll(tail, self.pairing, axis=-1 - t), out)
    return out.reshape(self.compact_shape)

  def expand(self, compact: jax.Array) -> jax.Array:
    """The full-size array holding `compact` on the subset and exactly 0 elsewhere.

    Row o < q of a block is a select of its strata's values where their offset is o; the r tail
    entries follow (the tail values rolled to their positions). For a matrix the stratified axis
    is the rows, so the vectorised inner loop over the last axis reads one stratum per row: the
    block structure costs nothing per entry, whatever q and c are (d = 0.1 included).
    """
    lead, trail, g, c, q, r = self._views()
    t = len(trail)
    compact = compact.reshape(lead + (g, c) + trail)
    offsets = self.offsets.reshape(lead + (g, c) + trail)
    main = _place(compact, offsets, q, axis=-2 - t).reshape(lead + (g, q * c) + trail)
    if not r:
      return main.reshape(self.shape)
    zero = jnp.zeros([], compact.dtype)
    tail = jnp.roll(jnp.where(offsets == q, compact, zero), -self.pairing, axis=-1 - t)
    tail = jax.lax.slice_in_dim(_values_once(tail), 0, r, axis=-1 - t)
    return jnp.concatenate([main, tail], axis=-1 - t).reshape(self.shape)


def stratified_axis(shape) -> int:
  """The axis a leaf's strata run along: its rows (axis -2, so 0 for a matrix) for rank >= 2, its
  only axis for a vector."""
  return len(shape) - 2 if len(shape) >= 2 else len(shape) - 1


def _compact(shape, k: int) -> tuple[int, ...]:
  axis = stratified_axis(shape)
  return tuple(shape[:axis]) + (k,) + tuple(shape[axis + 1:])


def _resolve_selection(leaves, params):
  if leaves is None:
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  if callable(leaves):
    return leaves(params)
  return leaves


def sparse_mask(
    inner: optax.GradientTransformation,
    density: float,
    *,
    reset_interval: int = 500,
    key: chex.PRNGKey,
    leaves: Any = None,
    row_multiple: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs `inner` on a random subset of each selected leaf; the other entries get zero update.

  For each selected leaf of shape ``(..., n, L)`` a subset of ``k = max(1, round(d n))`` entries
  of every column is drawn from `key` and the reset index ``r = k // ΔT``, so it is re-drawn at
  every update with ``k % ΔT == 0``. `inner` sees, for a selected leaf, the compact
  ``(..., k, L)`` array of the subset's gradients (and parameters); unselected leaves reach it
  whole (a vector ``(n,)`` becomes ``(k,)``). Its state therefore exists only for the selected
  entries, in the parameter's rank and other dimensions:
  at density d the optimizer state is about ``d`` x the dense state, plus a key and a count, and
  the parameter's sharding applies to it unchanged. No mask is stored; the subset is regenerated
  from the key at every update (see the module docstring for the layout and the draw).

  `inner` should zero its moments on the same schedule (`scale_by_adam_with_reset` with the same
  ``reset_interval``, as `spam` does): `sparse_mask` does not touch `inner`'s state, so moments
  kept across a re-draw would belong to other entries.

  Example:
    >>> import jax, jax.numpy as jnp, optax, spam_optax as spam
    >>> tx = optax.chain(
    ...     spam.sparse_mask(spam.scale_by_adam_with_reset(reset_interval=500), 0.25,
    ...                      reset_interval=500, key=jax.random.key(0)),
    ...     optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init({"w": jnp.ones((8, 16))})
    >>> state[0].inner_state.mu["w"].shape  # 2 of every column's 8 entries
    (2, 16)

  Args:
    inner: the transform to run on the subsets.
    density: d in (0, 1], the fraction of each row of a selected leaf that is updated.
    reset_interval: ΔT; the subset is re-drawn at every update k with k % ΔT == 0.
    key: a `jax.random.key`; the subsets are a pure function of it.
    leaves: which leaves are sparse: a pytree of bools matching the parameters, or a callable
      ``params -> pytree of bools`` (as in `optax.masked`). Default: every leaf with ndim >= 2.
    row_multiple: make k a multiple of this wherever it divides n. Set it to the size of the mesh
      axes that split the parameters' rows when ``d n`` is not a multiple of them (for example
      d = 0.1 with n = 512 on fsdp = 8: k = 48 instead of 51); otherwise XLA moves the leaves
      between devices to expand them. It fixes state shapes, as `density` does.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SparseMaskState`.

  References:
    Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training, ICLR 2025.
  """
  _validate.check("density", density, lambda d: 0.0 < d <= 1.0, "in (0, 1]")
  if _validate.concrete(density) is None:
    raise ValueError(f"density must be a Python float in (0, 1] (it fixes state shapes), got {density!r}")
  _validate.check_int("reset_interval", reset_interval, 1)
  _validate.check_int("row_multiple", row_multiple, 1)
  if _validate.concrete(row_multiple) is None:
    raise ValueError(f"row_multiple must be a Python int (it fixes state shapes), got {row_multiple!r}")
  if key is None:
    raise ValueError("key must be a jax.random.key when density < 1 (the subsets derive from it)")
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # accept a raw uint32 key, store a typed one
  inner = optax.with_extra_args_support(inner)

  def subsets(tree, key, r):
    """Per leaf of `tree`: None (dense) or its `Strata` for reset index r."""
    selection, treedef = jax.tree.flatten(_resolve_selection(leaves, tree))
    strata = []
    for i, (sel, x) in enumerate(zip(selection, treedef.flatten_up_to(tree))):
      shape = tuple(np.shape(x))
      leaf_key = jax.random.fold_in(jax.random.fold_in(key, i), r)
      n = shape[stratified_axis(shape)] if shape else 0
      strata.append(Strata.draw(leaf_key, shape, row_size(n, density, row_multiple))
                    if is_sparse(shape, sel) else None)
    return treedef, strata

  def take(treedef, strata, tree):
    return treedef.unflatten([
        x if st is None else st.gather(x) for x, st in zip(treedef.flatten_up_to(tree), strata)
    ])

  def init_fn(params):
    treedef, strata = subsets(params, key, 0)
    inner_state = inner.init(take(treedef, strata, params))
    return SparseMaskState(count=jnp.zeros([], jnp.int32), key=key, inner_state=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    k = _schedules.update_index(state.count)
    treedef, strata = subsets(updates, state.key, _schedules.reset_index(k, reset_interval))
    params = None if params is None else take(treedef, strata, params)
    inner_updates, inner_state = inner.update(
        take(treedef, strata, updates), state.inner_state, params, **extra_args
    )
    # Entries outside the subset get exactly zero update (no SGD step, no weight decay).
    full = [
        u if st is None else st.expand(u)
        for u, st in zip(treedef.flatten_up_to(inner_updates), strata)
    ]
    new_state = SparseMaskState(optax.safe_increment(state.count), state.key, inner_state)
    return treedef.unflatten(full), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
