"""Sparse SPAM on a device mesh: per-device state, collective traffic and temporaries per update.

For dense Adam, dense SPAM and SPAM at d = 0.25 and 0.1 on LLaMA-60M (the model's own sharding
annotations, optimizer state sharded like its parameters by the training script's rule), on 8 CPU
devices as ``fsdp=8`` and ``fsdp=4,tensor=2``, it compiles one donated update + apply step and
reports, from what XLA compiled:

* per-device optimizer-state bytes (the state's ``addressable_shards`` on device 0);
* the bytes every collective of the step produces (all-gather, all-reduce, reduce-scatter,
  all-to-all, collective-permute; summed over the optimized HLO), and the largest one;
* temporary bytes (``compiled.memory_analysis()``).

    python -m benchmarks.sharded_state            # sets 8 host devices itself
"""

from __future__ import annotations

import dataclasses
import os
import re

if __name__ == "__main__":  # before jax starts: 8 CPU devices unless the caller chose
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
import optax
from jax.sharding import Mesh

_COLLECTIVE = re.compile(
    r"=\s*(\S+|\([^=]*?\))\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


def _array_bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    size = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    total += size * _BYTES.get(dtype, int(dtype[1:]) // 8)
  return total


def collectives(hlo_text: str) -> list[tuple[str, int]]:
  """(kind, result bytes) of every collective in an optimized HLO module's text."""
  return [(m.group(2), _array_bytes(m.group(1))) for m in _COLLECTIVE.finditer(hlo_text)]


def per_device_bytes(tree, device=None) -> int:
  """Bytes of all array leaves held on one device (typed PRNG keys count their key data)."""
  device = device or jax.devices()[0]
  total = 0
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      if shard.device == device:
        data = shard.data
        if jax.dtypes.issubdtype(data.dtype, jax.dtypes.prng_key):
          data = jax.random.key_data(data)
        total += data.size * data.dtype.itemsize
  return total


def compile_update(tx, abstract_params, param_sh, mesh):
  """The abstract sharded train state {params, opt_state} (optimizer state sharded like its
  parameters by the training script's rule) and the compiled donated update + apply step."""
  from train.state import state_shardings  # the training script's rule, not a second copy of it

  def init(params):
    return {"params": params, "opt_state": tx.init(params)}

  abstract = jax.eval_shape(init, abstract_params)
  shardings = state_shardings(abstract, param_sh, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)

  def step(state, grads):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}

  compiled = jax.jit(step, in_shardings=(shardings, param_sh), out_shardings=shardings,
                     donate_argnums=0).lower(abstract, abstract["params"]).compile()
  return abstract, compiled


def init_state(tx, abstract_state, param_sh):
  """The real sharded state: parameters of 0.01, the optimizer's init on them."""
  params = jax.tree.map(lambda a, s: jax.device_put(np.full(a.shape, 0.01, a.dtype), s),
                        abstract_state["params"], param_sh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  return jax.jit(lambda p: {"params": p, "opt_state": tx.init(p)}, out_shardings=shardings)(params)


def llama60m(mesh):
  """Abstract LLaMA-60M parameters (vocabulary 32000) and their shardings on `mesh`."""
  import models
  from flax import nnx

  cfg = dataclasses.replace(models.get_config("60m"), vocab_size=32000)
  _, abstract = nnx.split(models.abstract_model(cfg, mesh=mesh), nnx.Param)
  params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(abstract))
  return params, models.param_shardings(abstract, mesh)


def optimizers():
  """The rows. Sparse SPAM makes every matrix sparse here (embedding and head included, as in
  optimizer_update.py), so that its state is d x the dense state; the training script makes only
  the projections sparse (SPEC §2)."""
  import spam_optax as spam

  sparse = dict(key=jax.random.key(0))
  return {
      "adam (dense)": optax.adam(1e-3),
      "spam (dense)": spam.spam(1e-3),
      "spam d=0.25": spam.spam(1e-3, density=0.25, **sparse),
      "spam d=0.1": spam.spam(1e-3, density=0.1, **sparse),
      # k a multiple of the 8 devices (48 of 512 entries, 136 of 1376): shard-local again.
      "spam d=0.1, k % 8 = 0": spam.spam(1e-3, density=0.1, sparse_row_multiple=8, **sparse),
  }


MESHES = {"fsdp=8": (8, 1), "fsdp=4,tensor=2": (4, 2)}


def measure(mesh_name: str, name: str, tx):
  fsdp, tensor = MESHES[mesh_name]
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, fsdp, tensor), ("data", "fsdp", "tensor"))
  params, param_sh = llama60m(mesh)
  abstract, compiled = compile_update(tx, params, param_sh, mesh)
  state = init_state(tx, abstract, param_sh)
  coll = collectives(compiled.as_text())
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return {
      "mesh": mesh_name, "optimizer": name, "params": n_params,
      "state_bytes_per_device": per_device_bytes(state["opt_state"]),
      "collectives": len(coll), "collective_bytes": sum(b for _, b in coll),
      "largest_collective_bytes": max((b for _, b in coll), default=0),
      "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
  }


def main():
  assert jax.device_count() >= 8, "needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
  rows = [measure(m, name, tx) for m in MESHES for name, tx in optimizers().items()]
  print(f"LLaMA-60M ({rows[0]['params'] / 1e6:.2f}M parameters), {jax.devices()[0].device_kind}, "
        "optimizer update + apply, donated")
  print("| mesh | optimizer | state bytes / device | vs dense SPAM | collectives | bytes moved "
        "by collectives | largest | temp bytes |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    dense = next(x for x in rows if x["mesh"] == r["mesh"] and x["optimizer"] == "spam (dense)")
    print(f"| {r['mesh']} | {r['optimizer']} | {r['state_bytes_per_device']:,} | "
          f"{r['state_bytes_per_device'] / dense['state_bytes_per_device']:.3f} | {r['collectives']} | "
          f"{r['collective_bytes']:,} | {r['largest_collective_bytes']:,} | {r['temp_bytes']:,} |")


if __name__ == "__main__":
  main()
