"""Scale: ``jax.distributed`` start-up, the device mesh from ``--mesh``, and the batch's split.

The mesh axes are the model's (``models.llama.MESH_AXES``: data, fsdp, tensor); FSDP and tensor
parallelism come from the parameters' sharding annotations alone.
"""

from __future__ import annotations

import math
import os

import jax
from jax.sharding import AxisType, Mesh

from models.llama import BATCH_AXES, MESH_AXES
from train.config import Config, ConfigError


def multihost_environment() -> str | None:
  """A description of the multi-host launcher found in the environment, or None."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return f"SLURM ({env['SLURM_NTASKS']} tasks)"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return f"TPU pod ({len(hosts)} hosts)"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  return None


def maybe_initialize_distributed(cfg: Config) -> None:
  """``jax.distributed.initialize()`` with explicit flags, or when a launcher is detected."""
  if jax.distributed.is_initialized():
    return
  if cfg.coordinator_address or cfg.num_processes or cfg.process_id is not None:
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                               num_processes=cfg.num_processes, process_id=cfg.process_id)
  elif multihost_environment():
    jax.distributed.initialize()


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
  """``"data=2,fsdp=4"`` -> {data: 2, fsdp: 4, tensor: 1}; default: every device on data."""
  if not spec:
    return {"data": num_devices, "fsdp": 1, "tensor": 1}
  sizes = {axis: 1 for axis in MESH_AXES}
  seen = set()
  for item in spec.split(","):
    name, sep, value = item.strip().partition("=")
    name = name.strip()
    if not sep or name not in MESH_AXES:
      raise ConfigError(f"bad --mesh item {item!r}: expected AXIS=SIZE with AXIS one of "
                        f"{', '.join(MESH_AXES)} (e.g. --mesh data=2,fsdp=4)")
    if name in seen:
      raise ConfigError(f"--mesh names axis {name!r} twice")
    seen.add(name)
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ConfigError(
          f"bad --mesh size {value!r} for axis {name}: expected a positive integer") from None
    if sizes[name] < 1:
      raise ConfigError(f"--mesh axis {name} must have size >= 1, got {sizes[name]}")
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ConfigError(f"--mesh {spec} spans {total} devices but {num_devices} are available; the "
                      "axis sizes must multiply to the device count")
  return sizes


def make_mesh(spec: str | None) -> Mesh:
  sizes = parse_mesh(spec, jax.device_count())
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_batch(cfg: Config, mesh: Mesh) -> None:
  """The global batch must split evenly over the batch axes (over processes: data.local_batch_size)."""
  split = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if cfg.batch_size % split:
    raise ConfigError(
        f"--batch-size {cfg.batch_size} does not divide over the mesh: the batch is split over "
        f"{' x '.join(f'{a}={mesh.shape[a]}' for a in BATCH_AXES)} = {split} devices")
