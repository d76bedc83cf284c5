"""The train state and its layout: the model config, the optimizer, shardings, the jitted steps.

The state is ``{"step": int32, "params": ..., "opt_state": ...}``. Parameters carry the model's
sharding annotations; optimizer leaves follow the parameter they belong to (:func:`state_shardings`),
so FSDP and tensor parallelism are a matter of shardings alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import models
from models import quant as quant_lib
from models.llama import BATCH_AXES, FSDP, Llama, fit_spec
from train import optimizers, weights
from train.config import Config, ConfigError
from train.step import make_eval_step, make_train_step

# Model fields that change how the step is computed, not the state: a checkpoint restores across them.
# (scan_layers changes the state's layout: it is recorded as weights.STACKED_STORAGE below.)
COMPUTE_ONLY = ("max_seq_len", "remat", "attention", "scan_layers")


def model_config(cfg: Config, vocab_size: int) -> models.LlamaConfig:
  """The named model (or --init-from's) with the data's vocabulary and the run's precision."""
  if cfg.init_from:
    base = weights.source_config(cfg.init_from)
    if vocab_size > base.vocab_size:  # a pretrained model keeps its vocabulary: ids must fit in it
      raise ConfigError(f"the data has token ids up to {vocab_size - 1} but --init-from "
                        f"{cfg.init_from} has a vocabulary of {base.vocab_size}; tokenize the data "
                        "with that model's tokenizer")
    vocab_size = base.vocab_size
  else:
    base = models.get_config(cfg.model)
  return base.replace(vocab_size=vocab_size, remat=cfg.remat, attention=cfg.attention,
                      scan_layers=cfg.scan_layers,
                      max_seq_len=max(base.max_seq_len, cfg.seq_len)).with_precision(cfg.dtype)


def compat_record(cfg: Config, model_cfg: models.LlamaConfig, data_fingerprint: dict) -> dict:
  """What a checkpoint must share with the run that restores it."""
  model = {k: (str(jnp.dtype(v)) if k in ("dtype", "param_dtype") else v)
           for k, v in dataclasses.asdict(model_cfg).items() if k not in COMPUTE_ONLY}
  if model_cfg.scan_layers:
    model.update(weights.STACKED_STORAGE)
  opt = {k: getattr(cfg, k) for k in ("optimizer", "opt_state_dtype")}
  opt["spike_monitor"] = cfg.spike_monitor > 0  # it adds a state to the chain
  if cfg.optimizer == "spam":
    opt.update(density=cfg.density, reset_interval=cfg.reset_interval)
    if cfg.density < 1:  # strata along the rows; checkpoints of the older last-axis layout lack it
      opt["sparse_layout"] = "rows"
  quant = {"type": cfg.quant, "group_size": cfg.quant_group_size if cfg.quant != "none" else None}
  return {"model": model, "optimizer": opt, "data": data_fingerprint,
          "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed, "quant": quant}


def _names(path) -> tuple[str, ...]:
  return tuple(jax.tree_util.keystr((entry,), simple=True) for entry in path)


def state_shardings(abstract_state, param_sh: dict, mesh: Mesh):
  """Shardings for the whole train state: optimizer leaves of a parameter's rank follow it.

  An optimizer-state leaf whose key path ends with a parameter's path and has its rank gets that
  parameter's PartitionSpec (less the axes its shape does not divide): Adam's and SPAM's moments,
  and sparse SPAM's compact moments, whose layout keeps the parameter's rank and every dimension
  but the rows for exactly this. Other large leaves (GaLore's projections) are split over ``fsdp``
  along their first dimension when it divides; scalars and keys are replicated.
  """
  by_path = {_names(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}
  ranks = {_names(p): l.ndim for p, l in
           jax.tree_util.tree_flatten_with_path(abstract_state["params"])[0]}
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    names = _names(path)
    for start in range(len(names)):
      tail = names[start:]
      if tail in by_path and ranks[tail] == leaf.ndim:
        return NamedSharding(mesh, fit_spec(by_path[tail], leaf.shape, mesh))
    is_key = jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    if getattr(leaf, "ndim", 0) >= 1 and not is_key and leaf.size >= 1 << 14:
      return NamedSharding(mesh, fit_spec(P(FSDP), leaf.shape, mesh))
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_state)


@dataclasses.dataclass
class Training:
  """Everything compiled for a run: the sharded state's layout and the jitted functions."""

  model_cfg: models.LlamaConfig
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings
  shardings: Any
  batch_sharding: NamedSharding
  init: Callable[[], Any]  # -> a freshly initialised, sharded state
  train_step: Callable  # (state, batch) -> (state, metrics); the state is donated
  eval_step: Callable  # (params, batch) -> (sum of NLL, number of tokens)

  @property
  def num_params(self) -> int:
    return models.count_params(self.abstract_state["params"])

  def fresh_state(self, params) -> Any:
    """Step 0, the given (placed) parameters and a freshly initialised optimizer state."""
    init_opt = jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])
    step = jax.device_put(jnp.zeros([], jnp.int32), self.shardings["step"])
    state = {"step": step, "params": params, "opt_state": init_opt(params)}
    if jax.tree.structure(state) != jax.tree.structure(self.abstract_state):
      raise RuntimeError("fresh_state no longer matches build_training's train state; update it")
    return state


def build_training(cfg: Config, model_cfg: models.LlamaConfig, mesh: Mesh,
                   optimizer: tuple[optax.GradientTransformation, optax.Schedule] | None = None
                   ) -> Training:
  """The optimizer, the abstract train state with its shardings, and the jitted steps.

  `optimizer` is ``optimizers.build_optimizer(cfg)``'s result when the caller has built it already.
  Nothing is allocated or compiled here: that happens on the first call of ``init`` / the steps.
  """
  tx, schedule = optimizer or optimizers.build_optimizer(cfg)
  # --quant: the graphdef carries qwix's interception; the parameters are the float ones.
  abstract = quant_lib.quantize(models.abstract_model(model_cfg, mesh=mesh), cfg.quant,
                                cfg.quant_group_size)
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  param_sh = models.param_shardings(abstract_params, mesh)

  def init_state():
    with nnx.use_eager_sharding(False):
      model = Llama(model_cfg, rngs=nnx.Rngs(cfg.seed), mesh=mesh)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros([], jnp.int32), "params": params, "opt_state": tx.init(params)}

  abstract_state = jax.eval_shape(init_state)
  shardings = state_shardings(abstract_state, param_sh, mesh)
  abstract_state = jax.tree.map(lambda l, s: jax.ShapeDtypeStruct(l.shape, l.dtype, sharding=s),
                                abstract_state, shardings)
  batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
  replicated = NamedSharding(mesh, P())
  train_step = jax.jit(
      make_train_step(cfg, graphdef, tx, schedule, model_cfg.vocab_size),
      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
      donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(shardings["params"], batch_sharding),
                      out_shardings=replicated)
  return Training(model_cfg=model_cfg, graphdef=graphdef, tx=tx, schedule=schedule,
                  abstract_state=abstract_state, shardings=shardings,
                  batch_sharding=batch_sharding, init=jax.jit(init_state, out_shardings=shardings),
                  train_step=train_step, eval_step=eval_step)
