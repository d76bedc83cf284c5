"""Sparse momentum (SPEC §2): run an inner transform on a keyed random subset of each leaf.

The layout, chosen so that sparse state shards like its parameter:

* A sparse leaf of shape ``(..., L)`` keeps ``k = max(1, round(d L))`` entries of every row (every
  index of the leading axes) along its last axis. Its compact state has shape ``(..., k)``: the
  same rank and leading dimensions, so **the parameter's own ``PartitionSpec`` applies unchanged**
  whenever the sharded dimensions divide (a ``(d_in, d_out)`` kernel at d = 0.25 has moments of
  shape ``(d_in, d_out / 4)``). Code that shards optimizer state like its parameters (path-matching
  rules, ``nnx.Optimizer`` metadata) shards sparse SPAM without knowing about it.
* Each row is cut into ``k`` strata and one entry is drawn inside each, so the subset has exactly
  ``rows x k`` entries and every entry has probability exactly ``k / L``. With ``g = gcd(k, L)``
  the last axis is ``g`` blocks of ``m = L / g`` entries holding ``c = k / g`` strata each; with
  ``q, r = divmod(m, c)`` a block is ``c`` main strata of ``q`` entries, interleaved (entry ``o``
  of stratum ``s`` at position ``o c + s``: the block's first ``c q`` entries are ``q`` rows of
  ``c``, one entry of every stratum per row), followed by ``r < c`` tail entries. When ``k``
  divides ``L`` (c = 1, r = 0) every block is one stratum of ``L / k`` consecutive entries and the
  draw is uniform inside it. Otherwise tail entry ``t`` of a block joins
  stratum ``(t + pairing) % c`` (``pairing`` uniform in ``[0, c)``, so a stratum has a tail entry
  with probability ``r / c``), and a stratum with a tail entry takes it with probability
  ``c / m`` and else a uniform main entry: every entry, main or tail, then has probability
  ``c / m = k / L``.
* Everything happens inside a block, and a block inside a shard (a mesh axis of size T that
  divides both ``k`` and ``L`` divides ``g``). Selection is ``iota == offset`` on the
  ``(..., g, q, c)`` view and the expansion back is the same select broadcast over the block seen
  as ``q + 1`` rows of ``c`` (the last row holds the tail, moved by a roll of a compact-sized
  array inside its block; the last ``c - r`` positions are cut off). No gather or scatter with
  computed indices, nothing XLA's SPMD partitioner must move between devices, and the expansion
  fuses into the parameter update as one branch-free loop. The offsets are computed once per
  update (a compact array of bytes), not once per entry (see ``_offsets_once``).
* The draw is a pure function of (key, leaf, reset index): three 32-bit seeds (the main draw, the
  tail draw and ``pairing``) come from ``jax.random.fold_in(fold_in(key, leaf_index),
  reset_index)``, and the draws of stratum ``i`` (its flat index in the compact state) are a
  counter-based hash (murmur3's 32-bit finaliser) of ``i`` and a seed. So subsets are identical
  on every device, host and mesh and after a restore, differ between keys, are re-drawn at every
  reset and are never stored.
* Leaves that do not fit: a last dimension with ``d L < 1/2`` keeps one entry per row (density
  ``1 / L > d``); a vector is a single row; scalars and empty leaves stay dense.

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


def row_size(last_dim: int, density: float, multiple: int = 1) -> int:
  """k: the entries kept per row of a leaf whose last dimension is `last_dim`, at density d.

  ``max(1, round(d L))``, or with ``multiple`` (which must divide L to apply) a multiple of it, so
  that a mesh axis of that size which splits the parameter's last dimension splits k too.
  """
  if multiple > 1 and last_dim % multiple == 0:
    return multiple * max(1, int(round(density * last_dim / multiple)))
  return max(1, int(round(density * last_dim)))


def is_sparse(shape, selected: bool) -> bool:
  """Whether a selected leaf of this shape gets a compact layout (scalars, empty leaves do not)."""
  return bool(selected) and len(shape) >= 1 and math.prod(shape) > 0


def _unit(bits: jax.Array) -> jax.Array:
  """uint32 -> float32 uniform in [0, 1) from the top 24 bits."""
  return (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


_UNROLL = 16  # strata of up to this many entries select with a chain of selects (d >= ~1/16)


def _select(view: jax.Array, offsets: jax.Array) -> jax.Array:
  """view[..., offsets, :] along axis -2 (0 where offsets is out of range), without a gather.

  `view` is (..., q, c), `offsets` (..., c). A chain of selects over the short axis is elementwise
  on contiguous rows, so XLA fuses it into the moment updates; a masked sum is the fallback for long
  strata (very low densities).
  """
  zero = jnp.zeros([], view.dtype)
  if view.shape[-2] <= _UNROLL:
    out = jnp.broadcast_to(zero, offsets.shape)
    for o in range(view.shape[-2]):
      out = jnp.where(offsets == o, view[..., o, :], out)
    return out
  iota = jax.lax.broadcasted_iota(offsets.dtype, view.shape, view.ndim - 2)
  return jnp.sum(jnp.where(iota == offsets[..., None, :], view, zero), axis=-2)


def _place(compact: jax.Array, offsets: jax.Array, rows: int) -> jax.Array:
  """The (..., rows, c) array holding compact (..., c) in row offsets, exactly 0 elsewhere."""
  shape = compact.shape[:-1] + (rows,) + compact.shape[-1:]
  iota = jax.lax.broadcasted_iota(offsets.dtype, shape, len(shape) - 2)
  return jnp.where(iota == offsets[..., None, :], compact[..., None, :],
                   jnp.zeros([], compact.dtype))


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
  """The subset of one leaf for one reset index: its static layout and its drawn offsets."""

  shape: tuple[int, ...]  # the leaf's
  k: int  # entries kept per row
  offsets: jax.Array  # (..., k): the chosen entry inside each stratum; q means its tail entry
  pairing: jax.Array  # int32 in [0, c): tail entry t of a block belongs to stratum (t + pairing) % c

  @staticmethod
  def blocks(shape, k: int) -> tuple[int, int, int, int]:
    """(g, c, q, r): every row is g blocks of c strata; a block is c main strata of q entries
    followed by r < c tail entries."""
    g = math.gcd(k, shape[-1])
    c = k // g
    q, r = divmod(shape[-1] // g, c)
    return g, c, q, r

  @classmethod
  def draw(cls, key: jax.Array, shape, k: int) -> "Strata":
    shape = tuple(shape)
    if not 1 <= k <= shape[-1]:
      raise ValueError(f"k must be in [1, {shape[-1]}], got {k}")
    compact = shape[:-1] + (k,)
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
      j = jax.lax.broadcasted_iota(jnp.int32, shape[:-1] + (g, c), len(shape)).reshape(compact)
      paired = jnp.where(j >= pairing, j - pairing, j - pairing + c) < r
      take_tail = paired & (_unit(hash32(index, seed_tail)) < c / (c * q + r))
      offsets = jnp.where(take_tail, q, offsets)
    return cls(shape, k, _offsets_once(offsets, q), pairing)

  @property
  def compact_shape(self) -> tuple[int, ...]:
    return self.shape[:-1] + (self.k,)

  def gather(self, x: jax.Array) -> jax.Array:
    """The compact (..., k) array of x's chosen entries."""
    g, c, q, r = self.blocks(self.shape, self.k)
    lead = self.shape[:-1]
    x = x.reshape(lead + (g, c * q + r))
    offsets = self.offsets.reshape(lead + (g, c))
    out = _select(x[..., : c * q].reshape(lead + (g, q, c)), offsets)
    if r:  # tail entry t sits in stratum (t + pairing) % c
      tail = jnp.pad(x[..., c * q:], [(0, 0)] * (x.ndim - 1) + [(0, c - r)])
      out = jnp.where(offsets == q, jnp.roll(tail, self.pairing, axis=-1), out)
    return out.reshape(self.compact_shape)

  def expand(self, compact: jax.Array) -> jax.Array:
    """The full-size array holding `compact` on the subset and exactly 0 elsewhere.

    A select on the block seen as ``(q + 1, c)`` (its last ``c - r`` positions cut off): row o < q
    holds stratum s's value where its offset is o, row q the tail values rolled to their positions.
    Every operand is a compact array broadcast along the rows, so the select fuses into the
    parameter update as one loop without branches.
    """
    g, c, q, r = self.blocks(self.shape, self.k)
    lead = self.shape[:-1]
    compact = compact.reshape(lead + (g, c))
    offsets = self.offsets.reshape(lead + (g, c))
    if not r:
      return _place(compact, offsets, q).reshape(self.shape)
    zero = jnp.zeros([], compact.dtype)
    tail = jnp.roll(jnp.where(offsets == q, compact, zero), -self.pairing, axis=-1)
    grid = _place(compact, offsets, q + 1)  # row q: stratum s's own tail value, not entry s's
    row = jax.lax.broadcasted_iota(jnp.int32, grid.shape, grid.ndim - 2)
    grid = jnp.where(row == q, _values_once(tail)[..., None, :], grid)
    return grid.reshape(lead + (g, (q + 1) * c))[..., : c * q + r].reshape(self.shape)


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

  For each selected leaf of shape ``(..., L)`` a subset of ``k = max(1, round(d L))`` entries of
  every row is drawn from `key` and the reset index ``r = k // ΔT``, so it is re-drawn at every
  update with ``k % ΔT == 0``. `inner` sees, for a selected leaf, the compact ``(..., k)`` array
  of the subset's gradients (and parameters); unselected leaves reach it whole. Its state
  therefore exists only for the selected entries, in the parameter's rank and leading dimensions:
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
    >>> state[0].inner_state.mu["w"].shape  # 4 of every row's 16 entries
    (8, 4)

  Args:
    inner: the transform to run on the subsets.
    density: d in (0, 1], the fraction of each row of a selected leaf that is updated.
    reset_interval: ΔT; the subset is re-drawn at every update k with k % ΔT == 0.
    key: a `jax.random.key`; the subsets are a pure function of it.
    leaves: which leaves are sparse: a pytree of bools matching the parameters, or a callable
      ``params -> pytree of bools`` (as in `optax.masked`). Default: every leaf with ndim >= 2.
    row_multiple: make k a multiple of this wherever it divides L. Set it to the size of the mesh
      axes that split the parameters' last dimension when ``d L`` is not a multiple of them (for
      example d = 0.1 with L = 512 on 8 devices: k = 48 instead of 51); otherwise XLA moves the
      leaves between devices to expand them. It fixes state shapes, as `density` does.

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
      strata.append(Strata.draw(leaf_key, shape, row_size(shape[-1], density, row_multiple))
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
