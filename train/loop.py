"""The training run: mesh, sharded state, jitted steps, evaluation, checkpoints, metrics.

:func:`run` does, in order: validate the config; start ``jax.distributed`` on a multi-host job; build
the mesh; load and check the data -- every user error is raised here, before anything compiles --;
then restore the latest checkpoint of the workdir (or initialise), and train with a progress bar.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import models
from models.llama import BATCH_AXES, FSDP, MESH_AXES, Llama, fit_spec
from models import quant as quant_lib
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import init_from as init_lib
from train import metrics as metrics_lib
from train import optimizers
from train import spike_report
from train import throughput
from train.config import Config, ConfigError, validate

# ----------------------------------------------------------------------------- scale


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
  split = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if cfg.batch_size % split:
    raise ConfigError(
        f"--batch-size {cfg.batch_size} does not divide over the mesh: the batch is split over "
        f"{' x '.join(f'{a}={mesh.shape[a]}' for a in BATCH_AXES)} = {split} devices")
  if cfg.batch_size % jax.process_count():
    raise ConfigError(f"--batch-size {cfg.batch_size} does not divide over "
                      f"{jax.process_count()} processes")


def _names(path) -> tuple[str, ...]:
  return tuple(jax.tree_util.keystr((entry,), simple=True) for entry in path)


def state_shardings(abstract_state, param_sh: dict, mesh: Mesh):
  """Shardings for the whole train state: optimizer leaves of a parameter's rank follow it.

  An optimizer-state leaf whose key path ends with a parameter's path and has its rank gets that
  parameter's PartitionSpec (less the axes its shape does not divide): Adam's and SPAM's moments,
  and sparse SPAM's compact moments, whose layout keeps the parameter's rank and leading
  dimensions for exactly this. Other large leaves (GaLore's projections) are split over ``fsdp``
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


# ----------------------------------------------------------------------------- steps


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def inject_spikes(cfg: Config, key: jax.Array, grads=None, tokens=None, vocab_size: int = 0):
  """Spike injection for experiments; returns (grads or tokens, number of injected spikes)."""
  p, scale = cfg.spike_prob, cfg.spike_scale
  if cfg.spike_mode == "grad":
    hit = jax.random.bernoulli(key, p)
    factor = jnp.where(hit, scale, 1.0)
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads), hit.astype(jnp.int32)
  if cfg.spike_mode == "grad_entries":
    leaves, treedef = jax.tree.flatten(grads)
    keys = jax.random.split(key, len(leaves))
    out, count = [], jnp.zeros([], jnp.int32)
    for k, g in zip(keys, leaves):
      hit = jax.random.bernoulli(k, p, g.shape)
      out.append(jnp.where(hit, g * scale, g).astype(g.dtype))
      count += jnp.sum(hit, dtype=jnp.int32)
    return treedef.unflatten(out), count
  # input: a sequence is hit with probability p; a fraction `scale` of its inputs become random.
  k_seq, k_pos, k_tok = jax.random.split(key, 3)
  inputs = tokens[:, :-1]
  seq_hit = jax.random.bernoulli(k_seq, p, (inputs.shape[0], 1))
  pos_hit = jax.random.bernoulli(k_pos, scale, inputs.shape) & seq_hit
  noise = jax.random.randint(k_tok, inputs.shape, 0, vocab_size, dtype=inputs.dtype)
  corrupted = jnp.where(pos_hit, noise, inputs)
  return tokens.at[:, :-1].set(corrupted), jnp.sum(pos_hit, dtype=jnp.int32)


def make_train_step(cfg: Config, graphdef, tx: optax.GradientTransformation, schedule,
                    vocab_size: int):
  """``step(state, batch) -> (state, metrics)``: one optimizer update on one global batch."""
  spike_key = jax.random.fold_in(jax.random.key(cfg.seed), 0x5B1CE)

  def loss_fn(params, tokens, weights):
    model = nnx.merge(graphdef, params)
    nll = token_nll(model(tokens[:, :-1]), tokens[:, 1:])
    total, count = jnp.sum(nll * weights), jnp.sum(weights)
    return total / jnp.maximum(count, 1.0)

  def step(state, batch):
    tokens, weights = batch["tokens"], batch["weights"]
    key = jax.random.fold_in(spike_key, state["step"])
    injected = jnp.zeros([], jnp.int32)
    if cfg.spike_prob > 0 and cfg.spike_mode == "input":
      tokens, injected = inject_spikes(cfg, key, tokens=tokens, vocab_size=vocab_size)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], tokens, weights)
    if cfg.spike_prob > 0 and cfg.spike_mode != "input":
      grads, injected = inject_spikes(cfg, key, grads=grads)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state["step"]), "injected": injected}
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    metrics.update(spike_report.step_metrics(opt_state))  # what the optimizer reports
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return step


def make_eval_step(graphdef):
  """``eval(params, batch) -> (sum of token NLL, number of target tokens)``."""

  def step(params, batch):
    model = nnx.merge(graphdef, params)
    tokens, weights = batch["tokens"], batch["weights"]
    nll = token_nll(model(tokens[:, :-1]), tokens[:, 1:])
    return jnp.sum(nll * weights), jnp.sum(weights)

  return step


# ----------------------------------------------------------------------------- run


@dataclasses.dataclass
class RunResult:
  start_step: int
  final_step: int
  val_loss: float
  val_ppl: float
  losses: dict[int, float]  # step -> train loss, for the steps trained by this call
  train_seconds: float
  tokens_per_second: float
  num_params: int
  workdir: Path
  mfu: float | None = None  # over the whole call's training time; None without a device peak


# Model fields that change how the step is computed, not the state: a checkpoint restores across them.
COMPUTE_ONLY = ("max_seq_len", "remat", "attention", "scan_layers")


def compat_record(cfg: Config, model_cfg: models.LlamaConfig, dataset: data_lib.Dataset) -> dict:
  """What a checkpoint must share with the run that restores it."""
  model = {k: (str(jnp.dtype(v)) if k in ("dtype", "param_dtype") else v)
           for k, v in dataclasses.asdict(model_cfg).items() if k not in COMPUTE_ONLY}
  opt = {k: getattr(cfg, k) for k in ("optimizer", "opt_state_dtype")}
  opt["spike_monitor"] = cfg.spike_monitor > 0  # it adds a state to the chain
  if cfg.optimizer == "spam":
    opt.update(density=cfg.density, reset_interval=cfg.reset_interval)
  quant = {"type": cfg.quant, "group_size": cfg.quant_group_size if cfg.quant != "none" else None}
  return {"model": model, "optimizer": opt, "data": dataset.fingerprint,
          "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed, "quant": quant}


def _log(*args) -> None:
  if jax.process_index() == 0:
    print(*args, flush=True)


def model_config(cfg: Config, vocab_size: int) -> models.LlamaConfig:
  """The named model (or --init-from's) with the data's vocabulary and the run's precision."""
  if cfg.init_from:
    base = init_lib.source_config(cfg.init_from)
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


@dataclasses.dataclass
class Training:
  """Everything compiled for a run: the sharded state's layout and the jitted functions."""

  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings
  shardings: Any
  batch_sharding: NamedSharding
  init: Callable[[], Any]  # -> a freshly initialised, sharded state
  train_step: Callable  # (state, batch) -> (state, metrics); the state is donated
  eval_step: Callable  # (params, batch) -> (sum of NLL, number of tokens)


def build_training(cfg: Config, model_cfg: models.LlamaConfig, mesh: Mesh) -> Training:
  """The optimizer, the abstract train state with its shardings, and the jitted steps.

  Nothing is allocated or compiled here: that happens on the first call of ``init`` / the steps.
  """
  tx, schedule = optimizers.build_optimizer(cfg)
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
  return Training(graphdef=graphdef, tx=tx, schedule=schedule, abstract_state=abstract_state,
                  shardings=shardings, batch_sharding=batch_sharding,
                  init=jax.jit(init_state, out_shardings=shardings), train_step=train_step,
                  eval_step=eval_step)


def run(cfg: Config) -> RunResult:
  """Trains (or resumes) as configured; returns the final validation loss and perplexity."""
  validate(cfg)
  maybe_initialize_distributed(cfg)
  mesh = make_mesh(cfg.mesh)
  check_batch(cfg, mesh)
  workdir = Path(cfg.workdir)
  dataset = data_lib.load_dataset(cfg, workdir)
  model_cfg = model_config(cfg, dataset.vocab_size)
  pi, pc = jax.process_index(), jax.process_count()
  built = build_training(cfg, model_cfg, mesh)
  abstract_state = built.abstract_state
  batch_sharding = built.batch_sharding
  train_step, eval_step = built.train_step, built.eval_step
  num_params = models.count_params(abstract_state["params"])

  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
  try:
    compat = compat_record(cfg, model_cfg, dataset)
    meta = {"compat": compat, "config": cfg.to_dict(),
            "versions": {"jax": jax.__version__, "flax": _version("flax"),
                         "optax": optax.__version__}}
    writer = metrics_lib.MetricsWriter(workdir / "metrics.jsonl", enabled=pi == 0)

    model_name = f"from {cfg.init_from}" if cfg.init_from else cfg.model
    _log(f"model {model_name}: {num_params:,} parameters ({cfg.dtype}); optimizer {cfg.optimizer}; "
         f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
         f"{pc} process(es)")
    if cfg.quant != "none":
      _log(f"fake-quantized {cfg.quant} weights and activations in q/k/v/o/gate/up/down "
           f"(groups of up to {cfg.quant_group_size} along the input dimension)")
    _log(f"data {dataset.description}")

    latest = checkpointer.latest_step()
    if latest is not None:
      state, saved = checkpointer.restore(latest, abstract_state, compat)
      start = int(latest)
      writer.truncate_after(start)
      if pi == 0:
        spike_report.truncate_after(workdir / "spike_layers.jsonl", start)
      saved_cfg = saved.get("config", {})
      old_sched = saved_cfg.get("schedule_steps") or saved_cfg.get("steps")
      _log(f"resumed from {checkpointer.path(latest)} (step {start})")
      if old_sched is not None and old_sched != cfg.total_schedule_steps and start < cfg.steps:
        _log(f"note: the LR schedule now spans {cfg.total_schedule_steps} steps (the checkpointed "
             f"run planned {old_sched}); pass --schedule-steps {old_sched} to keep it unchanged")
    elif cfg.init_from:
      state = fresh_state(built, init_lib.load_params(cfg.init_from, abstract_state["params"]))
      start = 0
      _log(f"initialised from {cfg.init_from} ({init_lib.kind(cfg.init_from)}), fresh optimizer "
           "state")
    else:
      state = built.init()
      start = 0

    def evaluate(params) -> tuple[float, float, int]:
      total, count = 0.0, 0.0
      for local in dataset.val_batches:
        s, c = eval_step(params, data_lib.global_batch(local, batch_sharding, cfg.batch_size))
        total += float(s)
        count += float(c)
      loss = total / max(count, 1.0)
      return loss, math.exp(min(loss, 700.0)), int(count)

    def save(step: int) -> None:
      checkpointer.save(step, state, dict(meta, data_position={
          "kind": dataset.kind, "step": step, "sequences": step * cfg.batch_size}))

    losses: dict[int, float] = {}
    pending: list[tuple[int, dict]] = []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    flops_per_token = throughput.train_flops_per_token(model_cfg, cfg.seq_len)
    peak = throughput.device_peak_flops(cfg.peak_flops)
    spikes_total = 0
    window_start, window_steps = time.perf_counter(), 0
    train_time, rate = 0.0, 0.0
    bar = _progress_bar(cfg, start)

    def flush(extra: dict | None = None) -> None:
      nonlocal window_start, window_steps, spikes_total, train_time, rate
      if not pending:
        return
      fetched = jax.device_get([m for _, m in pending])
      elapsed = time.perf_counter() - window_start
      train_time += elapsed
      rate = window_steps * tokens_per_step / max(elapsed, 1e-9)
      records = []
      for (s, _), m in zip(pending, fetched):
        record = {"step": s, **{k: v.item() for k, v in m.items()}}
        records.append(record)
        losses[s] = record["loss"]
        spikes_total += int(record.get("spikes", 0))
      records[-1]["tokens_per_s"] = rate
      window_mfu = throughput.mfu(rate, flops_per_token, peak, jax.device_count())
      if window_mfu is not None:
        records[-1]["mfu"] = window_mfu
      if extra:
        records[-1].update(extra)
      writer.write(records)
      last = records[-1]
      if cfg.spike_monitor > 0 and pi == 0:
        spike_report.append_totals(workdir / "spike_layers.jsonl", last["step"],
                                   spike_report.per_tensor_totals(state["opt_state"]))
      if bar is not None:
        postfix = {"tok/s": f"{rate:,.0f}",
                   **({} if window_mfu is None else {"mfu": f"{window_mfu:.1%}"}),
                   "loss": f"{last['loss']:.4f}", "lr": f"{last['lr']:.2e}"}
        if "spikes" in last:
          postfix["spikes"] = spikes_total
        if cfg.spike_monitor > 0:  # this window's spikes per layer type: embedding, attention ...
          by_type = {k[len("spikes_"):]: sum(r[k] for r in records)
                     for k in last if k.startswith("spikes_")}
          postfix["gss"] = " ".join(f"{t[:4]}:{n}" for t, n in by_type.items())
        bar.set_postfix(postfix, refresh=False)
      pending.clear()
      window_start, window_steps = time.perf_counter(), 0

    val_loss = val_ppl = float("nan")
    val_step = None
    try:
      for step in range(start, cfg.steps):
        local = dataset.train.batch(step, cfg.batch_size, pi, pc)
        batch = data_lib.global_batch(local, batch_sharding, cfg.batch_size)
        state, step_metrics = train_step(state, batch)
        done = step + 1
        pending.append((done, step_metrics))
        window_steps += 1
        if bar is not None:
          bar.update(1)
        is_eval = done % cfg.eval_every == 0 or done == cfg.steps
        if is_eval:
          flush()  # the train records, then time the evaluation separately
          val_loss, val_ppl, _ = evaluate(state["params"])
          val_step = done
          writer.write([{"step": done, "val_loss": val_loss, "val_ppl": val_ppl}])
          window_start = time.perf_counter()
          line = f"step {done}: val loss {val_loss:.4f}, ppl {val_ppl:.3f}"
          if bar is not None:
            bar.write(line, file=sys.stdout)
          else:
            _log(line)
        elif done % cfg.log_every == 0:
          flush()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
          save(done)
      flush()
    finally:
      if bar is not None:
        bar.close()
      checkpointer.wait()

    final_step = max(start, cfg.steps)
    if val_step != final_step:
      val_loss, val_ppl, _ = evaluate(state["params"])
    n_tokens = sum(int(b["weights"].sum()) for b in dataset.val_batches) * pc
    _log(f"final validation (step {final_step}, {n_tokens:,} tokens): loss {val_loss:.4f}, "
         f"perplexity {val_ppl:.3f}")
    if cfg.export_hf:
      export_hf(state["params"], model_cfg, cfg.export_hf)
    if cfg.plot and pi == 0:
      png = metrics_lib.plot_loss_curves(workdir / "metrics.jsonl", workdir / "loss_curve.png",
                                         title=f"{cfg.model} / {cfg.optimizer}")
      if png is not None:
        _log(f"wrote {writer.path} and {png}")
    if cfg.spike_monitor > 0 and pi == 0:
      written = spike_report.write_report(workdir, state["params"], cfg.spike_monitor)
      if written is not None:
        _log("wrote " + " and ".join(str(p) for p in written if p is not None))
    trained = final_step - start
    tokens_per_second = trained * tokens_per_step / train_time if train_time else 0.0
    return RunResult(start_step=start, final_step=final_step, val_loss=val_loss, val_ppl=val_ppl,
                     losses=losses, train_seconds=train_time, tokens_per_second=tokens_per_second,
                     num_params=num_params, workdir=workdir,
                     mfu=throughput.mfu(tokens_per_second, flops_per_token, peak,
                                        jax.device_count()) if trained else None)
  finally:
    checkpointer.close()


def fresh_state(built: Training, params) -> Any:
  """Step 0, the given (placed) parameters and a freshly initialised optimizer state."""
  init_opt = jax.jit(built.tx.init, out_shardings=built.shardings["opt_state"])
  step = jax.device_put(jnp.zeros([], jnp.int32), built.shardings["step"])
  state = {"step": step, "params": params, "opt_state": init_opt(params)}
  if jax.tree.structure(state) != jax.tree.structure(built.abstract_state):
    raise RuntimeError("fresh_state no longer matches build_training's train state; update it")
  return state


def export_hf(params, model_cfg: models.LlamaConfig, path: str) -> None:
  """Writes the parameters as a Hugging Face Llama directory (process 0; all must call it)."""
  from jax.experimental import multihost_utils
  from models import hf
  # Every process takes part in gathering the sharded parameters; process 0 writes them.
  host = (jax.device_get(params) if jax.process_count() == 1 else
          multihost_utils.process_allgather(params, tiled=True))
  if jax.process_index() == 0:
    hf.to_pretrained(host, path, config=model_cfg)
    _log(f"exported the weights to {path} (Hugging Face LlamaForCausalLM)")


def _progress_bar(cfg: Config, start: int):
  if not cfg.progress or jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
              mininterval=0.5, smoothing=0.1)


def _version(package: str) -> str:
  try:
    from importlib.metadata import version
    return version(package)
  except Exception:  # pragma: no cover
    return "unknown"
