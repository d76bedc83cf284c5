"""Sparse SPAM on a mesh of 8 CPU devices; prints OK at the end.

Optimizer state is sharded like its parameters by the training script's path rule, which knows
nothing about sparsity. Then the compiled sparse update moves nothing larger than a few scalars
between devices, holds d x dense SPAM's state per device, adds no temporary memory to a training
step, and follows the trajectory of one device.
Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python sparse_sharded.py [--llama60m]
"""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import spam_optax as spam
from benchmarks.sharded_state import collectives, compile_update, llama60m

assert jax.device_count() == 8, jax.devices()
SCALARS = 64  # bytes: what a collective may carry (the ordering scalar of each leaf, counters)


def mesh(fsdp: int, tensor: int) -> Mesh:
  return Mesh(np.array(jax.devices()).reshape(1, fsdp, tensor), ("data", "fsdp", "tensor"))


def bytes_per_device(tree) -> int:
  total = 0
  for x in jax.tree.leaves(tree):
    itemsize = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x.dtype.itemsize
    total += math.prod(x.sharding.shard_shape(x.shape)) * itemsize
  return total


def check_update(params, param_sh, m, density, label, **kwargs):
  """No large collective; per-device state d x dense SPAM's within 2% plus O(leaves)."""
  dense, _ = compile_update(spam.spam(1e-3), params, param_sh, m)
  sparse, compiled = compile_update(
      spam.spam(1e-3, density=density, key=jax.random.key(0), **kwargs), params, param_sh, m)
  large = [c for c in collectives(compiled.as_text()) if c[1] > SCALARS]
  assert not large, (label, density, large[:5])
  got, want = bytes_per_device(sparse["opt_state"]), density * bytes_per_device(dense["opt_state"])
  assert abs(got - want) <= 0.02 * want + 64 * len(jax.tree.leaves(params)), (label, got, want)
  print(f"{label} d={density}: {got:,} state bytes/device (d x dense: {want:,.0f}), no collective "
        f"over {SCALARS} bytes", flush=True)


# One large kernel under every placement of its axes, on fsdp=8 and fsdp=4,tensor=2.
big = {"w": jax.ShapeDtypeStruct((2048, 1024), jnp.float32)}
for fsdp, tensor in ((8, 1), (4, 2)):
  m = mesh(fsdp, tensor)
  for spec in (P("fsdp", None), P("fsdp", "tensor"), P("tensor", "fsdp"), P(None, "fsdp")):
    sh = {"w": NamedSharding(m, spec)}
    # The strata run along the rows: k = 512 at d = 0.25 divides every axis here; k = 205 at
    # d = 0.1 divides none, so it is local only where the rows are not split.
    densities = (0.25, 0.1) if spec[0] is None else (0.25,)
    for density in densities:
      check_update(big, sh, m, density, f"(2048, 1024) {spec} on fsdp={fsdp},tensor={tensor}")
    if 0.1 not in densities:  # k = 208 (a multiple of 8) instead of 205: local again
      check_update(big, sh, m, 0.1, f"(2048, 1024) {spec} on fsdp={fsdp},tensor={tensor}, k % 8 = 0",
                   sparse_row_multiple=8)

if "--llama60m" in sys.argv:  # LLaMA-60M under the model's own annotations (a slow test)
  for fsdp, tensor in ((8, 1), (4, 2)):
    m = mesh(fsdp, tensor)
    params, param_sh = llama60m(m)
    check_update(params, param_sh, m, 0.25, f"LLaMA-60M on fsdp={fsdp},tensor={tensor}")

# The same trajectory on one device and on fsdp=4,tensor=2 (the subsets do not depend on the mesh).
kw = dict(reset_interval=4, warmup_steps=2, clip_delay=2, threshold=5.0)
params = {"w": jnp.linspace(-1, 1, 80 * 40).reshape(80, 40), "b": jnp.linspace(0, 1, 40)}
grads = [jax.tree.map(lambda x, k=k: jnp.sin(x * (k + 1)) * (40.0 if k == 5 else 1.0), params)
         for k in range(9)]
m = mesh(4, 2)
sh = {"w": NamedSharding(m, P("fsdp", "tensor")), "b": NamedSharding(m, P("tensor"))}
for density in (0.25, 0.1):
  tx = spam.spam(1e-2, density=density, key=jax.random.key(0), **kw)
  abstract, sharded_step = compile_update(tx, jax.eval_shape(lambda: params), sh, m)

  @jax.jit
  def step(state, g):
    updates, opt_state = tx.update(g, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}

  one = {"params": params, "opt_state": tx.init(params)}
  on_mesh = jax.device_put(one, jax.tree.map(lambda x: x.sharding, abstract))
  for g in grads:
    one, on_mesh = step(one, g), sharded_step(on_mesh, jax.device_put(g, sh))
  for name in params:
    np.testing.assert_allclose(np.asarray(on_mesh["params"][name]), np.asarray(one["params"][name]),
                               rtol=1e-5, atol=1e-7)
  mu = on_mesh["opt_state"][0].inner_state[0].mu["w"]  # (k, 40): k = 20 or 8, both split by 4
  assert mu.sharding.spec == P("fsdp", "tensor"), mu.sharding
print("trajectory on fsdp=4,tensor=2 == one device", flush=True)

# A training step's temporaries: beyond dense SPAM's, at most the compact update of the sparse
# leaves (XLA does not fuse Adam's sqrt and divide into the broadcasting expansion) and their
# compact gradient (gathered once for its three readers: the two moment updates and the clip
# count, num_clipped). Measured at the commit that added the count: sparse 2,319,248 bytes
# (2,319,504 before it), dense 2,255,504 (2,310,544 before: ordering v's update after the count
# saved a buffer), so the sparse step is no larger than before; the dense baseline shrank.
from train import mesh as mesh_lib, optimizers, state as state_lib  # noqa: E402
from train.config import Config  # noqa: E402

temps = {}
for density in (1.0, 0.25):
  cfg = Config(model="tiny", density=density, batch_size=8, seq_len=32, mesh="fsdp=4,tensor=2")
  training = state_lib.build_training(cfg, state_lib.model_config(cfg, 256),
                                      mesh_lib.make_mesh(cfg.mesh))
  batch = {"tokens": jax.ShapeDtypeStruct((8, 33), jnp.int32, sharding=training.batch_sharding),
           "weights": jax.ShapeDtypeStruct((8, 32), jnp.float32, sharding=training.batch_sharding)}
  compiled = training.train_step.lower(training.abstract_state, batch).compile()
  temps[density] = compiled.memory_analysis().temp_size_in_bytes
params = training.abstract_state["params"]
sparse_leaves = [p for p, sel in zip(jax.tree.leaves(params),
                                     jax.tree.leaves(optimizers.projection_mask(params))) if sel]
compact_update = 0.25 * bytes_per_device(sparse_leaves)
assert temps[0.25] <= temps[1.0] + 2 * compact_update, (temps, compact_update)
print(f"train step temporaries: dense {temps[1.0]:,}, d=0.25 {temps[0.25]:,} "
      f"(compact update {compact_update:,.0f})")
print("OK")
