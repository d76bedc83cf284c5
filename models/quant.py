"""4-bit fake-quantized training of the LLaMA projections, as Stable-SPAM ran it (docs/QUANTIZATION.md).

The weights and the input activations of the q, k, v, o, gate, up and down projections are
quantized then dequantized in the forward pass, in groups along the contraction (input) dimension;
the matmul itself runs in the compute dtype. The embedding, the output head, the norms and
attention's score/value products stay in high precision. Gradients are straight-through: the
backward pass of the matmul uses the quantized operands (``dx = g Q(W)ᵀ``, ``dW = Q(x)ᵀ g``) and
passes through the quantizers as the identity; gradients themselves are not quantized. That is the
authors' ``QLinear`` / ``A8Linear`` (repository TianjinYellow/StableSPAM, ``utils/``).

* ``int4``: weights asymmetric min-max with a zero point (levels 0..15), activations symmetric
  (levels -8..7, scale max|x| / 7) with the 2 largest |x| of each group kept unquantized.
* ``fp4``: the authors' "E1M2" code, weights and activations, top-2 kept. As written it rounds to
  multiples of a quarter of the group's max |x| (9 levels); docs/QUANTIZATION.md shows why.
* ``fp4_e2m1`` (not in the paper): the standard FP4 (E2M1) with an abs-max scale per group.

qwix applies it from outside the model: a ``qwix.QuantizationProvider`` whose rule matches the
seven projection modules by path intercepts the ``jax.lax.dot_general`` calls made inside them and
quantizes their operands with the functions below. qwix's own quantizers are not used: they cannot
keep the activations' top-k outliers, their grouped backward uses the unquantized operands, they
tell the weight from the activation by shape (ambiguous for the 2-D matmuls of
:class:`models.llama.Dense`), and their int4 matmul fails to compile on XLA:CPU for those matmuls.

Example:
  >>> import jax.numpy as jnp
  >>> from models import CONFIGS, make_model
  >>> from models.quant import quantize
  >>> model = quantize(make_model(CONFIGS["tiny"].replace(vocab_size=256)), "int4", 256)
  >>> model(jnp.zeros((2, 16), jnp.int32)).shape
  (2, 16, 256)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

QUANTS = ("none", "int4", "fp4", "fp4_e2m1")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROJECTION_PATH = rf"(.*/)?({'|'.join(PROJECTIONS)})"  # a qwix module_path regex (full match)
TOPK = 2  # the authors keep the 2 largest |x| of each group (INT4 activations, FP4) unquantized


# ----------------------------------------------------------------------------- groups


def group_tile(dim: int, group_size: int) -> int:
  """The group length along a contraction dimension of size `dim`.

  The authors view a tensor as rows of 256 consecutive elements, so when a row is not a multiple
  of 256 their groups run across rows (tokens, output channels). We keep groups inside a row: the
  largest divisor of `dim` not above `group_size` (512 -> 256, 352 -> 176, 1376 -> 172, 128 -> 128).
  """
  if group_size < 1:
    raise ValueError(f"group size must be >= 1, got {group_size}")
  return max(t for t in range(1, min(dim, group_size) + 1) if dim % t == 0)


def _grouped(fn, x: jax.Array, axis: int, group_size: int) -> jax.Array:
  """`fn` applied to groups of `group_tile` consecutive entries along `axis`, in float32."""
  moved = jnp.moveaxis(x, axis, -1)
  tile = group_tile(moved.shape[-1], group_size)
  groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // tile, tile).astype(jnp.float32)
  out = fn(groups).reshape(moved.shape).astype(x.dtype)
  return jnp.moveaxis(out, -1, axis)


def _top_k_mask(g: jax.Array, k: int) -> jax.Array:
  """True at the k largest |g| of each group (last axis)."""
  if k == 0:
    return jnp.zeros(g.shape, bool)
  _, idx = jax.lax.top_k(jnp.abs(g), k)
  return jnp.any(jax.nn.one_hot(idx, g.shape[-1], dtype=bool), axis=-2)


# ----------------------------------------------------------------------------- the authors' quantizers


def int4_weight_groups(g: jax.Array) -> jax.Array:
  """Asymmetric min-max 4-bit with a zero point, per group (last axis): ``_quantize_tensor``."""
  lo, hi = jnp.min(g, -1, keepdims=True), jnp.max(g, -1, keepdims=True)
  scale = jnp.maximum(hi - lo, 1e-5) / 15.0
  zero = jnp.clip(-jnp.round(lo / scale), 0.0, 15.0)
  q = jnp.clip(jnp.round(g / scale) + zero, 0.0, 15.0)
  return (q - zero) * scale


def int4_act_groups(g: jax.Array, topk: int = TOPK) -> jax.Array:
  """Symmetric 4-bit per group (last axis), its top-k |g| kept: ``fake_topk_quantize``."""
  keep = _top_k_mask(g, topk)
  rest = jnp.where(keep, 0.0, g)
  scale = jnp.maximum(jnp.max(jnp.abs(rest), -1, keepdims=True), 1e-6)
  q = jnp.clip(jnp.round(rest * (7.0 / scale)), -8.0, 7.0)
  return jnp.where(keep, g, q * scale / 7.0)


def fp4_groups(g: jax.Array, topk: int = TOPK, e: int = 1, m: int = 2, b: int = 1) -> jax.Array:
  """The authors' ``fp4_fake_quantize`` ("E1M2"), per group (last axis), its top-k |g| kept.

  Written as theirs; with ``alpha`` the group's max |g| (outliers excluded), ``log_v <= 1`` for
  every ``|g| <= alpha``, so the step ``alpha_hat * v`` is always ``alpha / 4``.
  """
  keep = _top_k_mask(g, topk)
  rest = jnp.where(keep, 0.0, g)
  alpha = jnp.maximum(jnp.max(jnp.abs(rest), -1, keepdims=True), 1e-6)
  clamped = jnp.clip(rest, -alpha, alpha)
  alpha_hat = alpha * 2.0 ** -b
  b_hat = 2.0 ** e - jnp.log2(alpha) + jnp.log2(2.0 - 2.0 ** -m) - 1.0
  log_v = jnp.floor(jnp.log2(jnp.abs(clamped) + 1e-8) + b_hat)
  step = alpha_hat * 2.0 ** jnp.maximum(log_v - m, 1.0 - m)
  return jnp.where(keep, g, step * jnp.round(clamped / step + 1e-12))


def e2m1_groups(g: jax.Array) -> jax.Array:
  """OCP FP4 (E2M1: 0, .5, 1, 1.5, 2, 3, 4, 6) with an abs-max scale per group (last axis).

  Not the authors' format: the standard 4-bit float of MXFP4/NVFP4 hardware (without their
  power-of-two / FP8 scales), round to nearest even, no outliers kept.
  """
  scale = jnp.maximum(jnp.max(jnp.abs(g), -1, keepdims=True), 1e-30) / 6.0
  q = jnp.clip(g / scale, -6.0, 6.0).astype(jnp.float4_e2m1fn).astype(jnp.float32)
  return q * scale


SCHEMES = {  # quant -> (weight quantizer, activation quantizer), on groups along the last axis
    "int4": (int4_weight_groups, int4_act_groups),
    "fp4": (fp4_groups, fp4_groups),
    "fp4_e2m1": (e2m1_groups, e2m1_groups),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def fake_quant(x: jax.Array, groups_fn, axis: int, group_size: int) -> jax.Array:
  """``groups_fn`` on groups along `axis`, with an identity (straight-through) gradient."""
  return _grouped(groups_fn, x, axis, group_size)


fake_quant.defvjp(lambda x, fn, axis, size: (fake_quant(x, fn, axis, size), None),
                  lambda fn, axis, size, _, g: (g,))


# ----------------------------------------------------------------------------- qwix


def _current_module() -> tuple[str, list[tuple[int, ...]]]:
  """Path and parameter shapes of the nnx module being called (qwix's frame walk finds it)."""
  from qwix._src.utils import flax_util

  module = flax_util.get_current_module()
  shapes = [tuple(v.shape) for v in vars(module).values() if isinstance(v, nnx.Param)]
  return "/".join(map(str, flax_util.get_current_module_path())), shapes


def make_provider(quant: str, group_size: int = 256):
  """A qwix provider fake-quantizing the matmuls of the seven projection modules."""
  import qwix

  if quant not in SCHEMES:
    raise ValueError(f"unknown quantization {quant!r}; valid: {', '.join(QUANTS)}")
  weight_fn, act_fn = SCHEMES[quant]

  class FakeQuantProvider(qwix.QuantizationProvider):
    """qwix's interception and module-path rules; the authors' quantizers on the operands."""

    def __init__(self):
      # disable_jit: qwix patches lax.dot_general while the model is traced; left jitted, jnp.dot's
      # own jit cache could hand a quantized model a float trace of the same shapes, or the
      # reverse. So nested jits are inlined (and lax.scan unrolled) while the model is traced.
      super().__init__([qwix.QuantizationRule(module_path=PROJECTION_PATH)], disable_jit=True)
      self.quant, self.group_size = quant, group_size
      self.quantized_paths: set[str] = set()  # module paths whose matmuls were quantized (traced)

    def get_intercept_map(self):
      return super().get_intercept_map() | {"jax.lax.dot_general": self.dot_general}

    def dot_general(self, lhs, rhs, dimension_numbers, *args, **kwargs):
      rule, _ = self._get_current_rule_and_op_id("dot_general", only_rule=True)
      if rule is not None:
        lhs, rhs = self._quantize_operands(lhs, rhs, dimension_numbers)
      return jax.lax.dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)

    def _quantize_operands(self, lhs, rhs, dimension_numbers):
      (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
      if len(lhs_c) != 1 or lhs_b or rhs_b:
        raise ValueError(f"--quant expects x @ kernel in a projection, got a dot_general with "
                         f"dimension numbers {dimension_numbers}")
      # The weight is the operand shaped like the module's parameter (x @ kernel: the right one).
      path, shapes = _current_module()
      if tuple(rhs.shape) in shapes:
        weight_is_rhs = True
      elif tuple(lhs.shape) in shapes:
        weight_is_rhs = False
      else:
        raise ValueError(f"--quant: neither operand {lhs.shape} / {rhs.shape} of a projection's "
                         f"matmul is one of its parameters {shapes}")
      self.quantized_paths.add(path)
      lhs_fn, rhs_fn = (act_fn, weight_fn) if weight_is_rhs else (weight_fn, act_fn)
      return (fake_quant(lhs, lhs_fn, lhs_c[0], self.group_size),
              fake_quant(rhs, rhs_fn, rhs_c[0], self.group_size))

  return FakeQuantProvider()


def quantize(model: nnx.Module, quant: str, group_size: int = 256, provider=None) -> nnx.Module:
  """A copy of the Llama `model` whose projections run fake-quantized (`quant` "none": `model`).

  Works on abstract models too (nothing is run): the returned module's graphdef carries the
  interception, so ``nnx.merge(graphdef, params)`` inside a jitted step is quantized; the
  parameters are unchanged (same tree, same values), so the train state is the float one.
  """
  if quant == "none":
    return model
  import qwix

  provider = provider or make_provider(quant, group_size)
  sample = jnp.zeros((1, 1), jnp.int32)  # required by the API; never run (skip_nnx_init)
  return qwix.quantize_model(model, provider, sample, skip_nnx_init=True)
