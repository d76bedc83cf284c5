r"""Storing optimizer state in a narrower float dtype: round to nearest, or stochastically.

Moments are always *computed* in float32 (or wider); only the store into a sub-float32 state dtype
(bfloat16, float16, float8) rounds. Round-to-nearest (the authors' pure-bf16 behaviour, and what
``x.astype(bfloat16)`` does) loses every increment below half a unit in the last place: with
bfloat16's 8 significant bits, ``0.999 v`` rounds back to ``v``, so Adam's second moment stops
growing at 0.25 under a constant gradient of 1 and never decays again (SPEC §4).

Stochastic rounding stores ``x`` as one of its two neighbours ``lo <= x < hi`` in the state dtype,

.. math::

  \operatorname{SR}(x) = \begin{cases} hi & \text{with probability } (x - lo) / (hi - lo) \\
                                       lo & \text{otherwise} \end{cases}
  \qquad\Rightarrow\qquad \mathbb{E}[\operatorname{SR}(x)] = x,

so a linear recursion such as ``v <- β2 v + (1-β2) g²`` keeps, in expectation, the float32
trajectory. For bfloat16 (the upper 16 bits of a float32) this is one integer add: add 16 uniform
random bits to the float32 bit pattern and truncate the lower 16 bits. Other narrow dtypes use the
two neighbours explicitly. Sixteen random bits per stored value resolve the rounding probability
to 2**-16 of a unit in the last place, ample for any dtype narrower than float32.

The random bits are a pure function of (update count, leaf index, flat position): one counter-based
hash (murmur3's 32-bit finaliser) per entry, whose upper half rounds the first moment and lower half
the second. So nothing is stored, there is no PRNG key to split or checkpoint, every device of a
sharded array draws the bits of its own global positions (``iota`` is partitioned by XLA), and a
restored checkpoint continues with the same bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROUNDINGS = ("stochastic", "nearest")

# Which half of an entry's 32 random bits rounds which moment (so m and v never share bits).
STREAM_MU = 1  # the upper 16 bits
STREAM_NU = 0  # the lower 16 bits
_SALT = 0x5350414D  # "SPAM"


def hash32(x: jax.Array, seed: jax.Array) -> jax.Array:
  """murmur3 fmix32 of (x * golden ratio + seed): a cheap, well-mixed counter-based hash.

  `x` is any integer array (taken modulo 2**32), `seed` a uint32 scalar or broadcastable array.
  """
  h = x.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.asarray(seed, jnp.uint32)
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def check_rounding(rounding: str) -> str:
  """ValueError unless `rounding` is "stochastic" or "nearest"."""
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {', '.join(map(repr, ROUNDINGS))}, got {rounding!r}")
  return rounding


def rounds(dtype) -> bool:
  """Whether storing a float32 value in `dtype` loses precision (a float narrower than float32)."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def flat_index(shape) -> jax.Array:
  """uint32 row-major flat index (modulo 2**32) of every position of `shape`, from one iota per
  axis: XLA partitions an iota along any sharding, where a reshaped 1-D arange would be gathered."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(
        stride & 0xFFFFFFFF)
    stride *= shape[axis]
  return index


def random_bits(shape, count: jax.Array, leaf_index: int) -> jax.Array:
  """uint32 bits, one per entry of `shape`: a hash of (count, leaf_index, flat position).

  A pure function of its arguments; the same on every device and after a restore.
  """
  seed = hash32(jnp.asarray(count).astype(jnp.uint32),
                jnp.uint32((int(leaf_index) * 0x2545F491 + _SALT) & 0xFFFFFFFF))
  seed = hash32(seed, jnp.uint32(_SALT))
  position = flat_index(shape)
  return hash32(position, seed)


def half_bits(bits: jax.Array, stream: int) -> jax.Array:
  """The 16 random bits (as uint32 in [0, 2**16)) of `bits` that `stream` (STREAM_MU/NU) uses."""
  return bits >> 16 if stream == STREAM_MU else bits & jnp.uint32(0xFFFF)


def stochastic_round(x: jax.Array, dtype, bits16: jax.Array) -> jax.Array:
  """Rounds float32 `x` to `dtype` up or down with probabilities that make it unbiased.

  `bits16` are uniform uint32 in [0, 2**16) of x's shape. bfloat16: add them to the float32 bit
  pattern and truncate the lower 16 bits (inf stays inf, NaN stays NaN). Other dtypes: pick
  between the two neighbours ``lo <= x <= hi`` in `dtype`, ``hi`` with probability
  ``(x - lo) / (hi - lo)`` (resolved to 2**-16).
  """
  dtype = jnp.dtype(dtype)
  x = x.astype(jnp.float32)
  if dtype == jnp.bfloat16:
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    b = (b + bits16) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(b, jnp.float32).astype(dtype)
  nearest = x.astype(dtype)
  n32 = nearest.astype(jnp.float32)
  # Towards ±max, not ±inf: some float8 formats have no inf.
  big = jnp.asarray(jnp.finfo(dtype).max, dtype)
  other = jnp.where(n32 > x, jnp.nextafter(nearest, -big), jnp.nextafter(nearest, big))
  o32 = other.astype(jnp.float32)
  lo32, hi32 = jnp.minimum(n32, o32), jnp.maximum(n32, o32)
  lo, hi = jnp.where(n32 <= o32, nearest, other), jnp.where(n32 <= o32, other, nearest)
  width = hi32 - lo32
  p_hi = jnp.where(width > 0, (x - lo32) / jnp.where(width > 0, width, 1), 0)
  u = (bits16.astype(jnp.float32) + 0.5) * (1.0 / (1 << 16))
  out = jnp.where(u < p_hi, hi, lo)
  return jnp.where(jnp.isfinite(x) & jnp.isfinite(o32), out, nearest)


class LeafRounder:
  """Stores the moments of one leaf; hashes the leaf's random bits once, and only if needed.

  ``LeafRounder(rounding, count, leaf_index).store(x, dtype, stream)`` is ``x`` (computed in
  float32 or wider) as `dtype`: stochastically rounded when ``rounding == "stochastic"`` and `dtype`
  is narrower than float32, otherwise a plain ``astype`` (so float32 state compiles exactly as
  without it). The moments of a leaf share one 32-bit hash per entry, a half each.
  """

  def __init__(self, rounding: str, count: jax.Array, leaf_index: int):
    self.rounding, self.count, self.leaf_index = rounding, count, leaf_index
    self._bits = None

  def store(self, x: jax.Array, dtype, stream: int) -> jax.Array:
    dtype = jnp.dtype(dtype)
    if self.rounding == "nearest" or not rounds(dtype):
      return x.astype(dtype)
    if self._bits is None or self._bits.shape != x.shape:
      self._bits = random_bits(x.shape, self.count, self.leaf_index)
    return stochastic_round(x, dtype, half_bits(self._bits, stream))


def store(x: jax.Array, dtype, rounding: str, count: jax.Array, leaf_index: int,
          stream: int) -> jax.Array:
  """One value stored as by `LeafRounder` (which shares the hash between a leaf's moments)."""
  return LeafRounder(rounding, count, leaf_index).store(x, dtype, stream)
