"""The training run, top to bottom: :func:`run`.

In order: check the config and build the optimizer (every user error is raised here, before
anything compiles); start ``jax.distributed`` on a multi-host job; build the mesh; load the data;
lay out the sharded train state; restore the workdir's latest checkpoint (state and data position)
or initialise; train, evaluating and checkpointing on schedule; evaluate, print a sample, export.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import jax
import optax

from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import evaluate, mesh as mesh_lib, metrics as metrics_lib, optimizers, spike_report
from train import state as state_lib
from train import throughput, weights
from train.config import Config, ConfigError, validate
from train.progress import StepLog, log


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
  sample: str | None = None  # the text generated at the end (--sample-tokens)


def run(cfg: Config) -> RunResult:
  """Trains (or resumes) as configured; returns the final validation loss and perplexity."""
  validate(cfg)
  optimizer = optimizers.build_optimizer(cfg)  # the library checks its hyper-parameters here
  mesh_lib.maybe_initialize_distributed(cfg)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  mesh_lib.check_batch(cfg, mesh)
  data_lib.local_batch_size(cfg.batch_size, jax.process_count())  # before any tokenizing
  workdir = Path(cfg.workdir)
  dataset = data_lib.load_dataset(cfg, workdir)
  training = state_lib.build_training(cfg, state_lib.model_config(cfg, dataset.vocab_size), mesh,
                                      optimizer)
  _describe(cfg, training, mesh, dataset)
  meta = {"compat": state_lib.compat_record(cfg, training.model_cfg, dataset.fingerprint),
          "config": cfg.to_dict(), "versions": _versions()}
  writer = metrics_lib.MetricsWriter(workdir / "metrics.jsonl", enabled=jax.process_index() == 0,
                                     tensorboard=workdir / "tensorboard")
  with contextlib.ExitStack() as cleanup:
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    cleanup.callback(checkpointer.close)
    batches = dataset.train_iterator()
    cleanup.callback(batches.close)  # stops grain's prefetch threads
    state, start = _restore_or_init(cfg, training, checkpointer, batches, dataset, meta["compat"],
                                    writer, workdir)
    steps = StepLog(cfg, writer, workdir, start, cfg.batch_size * cfg.seq_len,
                    throughput.train_flops_per_token(training.model_cfg, cfg.seq_len))
    cleanup.callback(steps.close)
    cleanup.callback(checkpointer.wait)
    train_step = _explain_oom(training.train_step, cfg)
    val = None
    for step in range(start, cfg.steps):
      local = next(batches)
      state, step_metrics = train_step(
          state, data_lib.global_batch(local, training.batch_sharding, cfg.batch_size))
      done = step + 1
      steps.step(done, step_metrics, state["opt_state"])
      if done % cfg.eval_every == 0 or done == cfg.steps:
        steps.flush(state["opt_state"])
        val = (done, *evaluate.validation_loss(training, state["params"], dataset.val_batches,
                                               cfg.batch_size))
        steps.validation(*val[:3])
        steps.restart_clock()
      if done % cfg.checkpoint_every == 0 or done == cfg.steps:
        checkpointer.save(done, state, dict(meta, data_position={
            "kind": dataset.kind, "step": done, "iterator": batches.get_state()}))
    steps.flush(state["opt_state"])
  final_step = max(start, cfg.steps)
  if val is None or val[0] != final_step:
    val = (final_step, *evaluate.validation_loss(training, state["params"], dataset.val_batches,
                                                 cfg.batch_size))
  _, val_loss, val_ppl, _ = val
  n_tokens = sum(int(b["weights"].sum()) for b in dataset.val_batches) * jax.process_count()
  log(f"final validation (step {final_step}, {n_tokens:,} tokens): loss {val_loss:.4f}, "
      f"perplexity {val_ppl:.3f}")
  text = _print_sample(cfg, training, state["params"], dataset)
  _write_outputs(cfg, training, state, workdir, writer)
  trained = final_step - start
  rate = steps.tokens_per_second(trained)
  return RunResult(start_step=start, final_step=final_step, val_loss=val_loss, val_ppl=val_ppl,
                   losses=steps.losses, train_seconds=steps.train_seconds, tokens_per_second=rate,
                   num_params=training.num_params, workdir=workdir, sample=text,
                   mfu=throughput.mfu(rate, steps.flops_per_token, steps.peak,
                                      jax.device_count()) if trained else None)


def _restore_or_init(cfg, training, checkpointer, batches, dataset, compat, writer, workdir):
  """(state, start step): the latest checkpoint with its data position, or a fresh start."""
  latest = checkpointer.latest_step()
  if latest is None:
    if cfg.init_from:
      params = weights.load_params(cfg.init_from, training.abstract_state["params"])
      log(f"initialised from {cfg.init_from} ({weights.kind(cfg.init_from)}), fresh optimizer "
          "state")
      return training.fresh_state(params), 0
    return _explain_oom(training.init, cfg)(), 0
  state, saved = checkpointer.restore(latest, training.abstract_state, compat)
  position = saved.get("data_position", {}).get("iterator")
  if position is not None:
    batches.set_state(position)
  else:  # written before the data position was grain's iterator state
    dataset.seek(batches, latest)
  writer.truncate_after(latest)
  if jax.process_index() == 0:
    spike_report.truncate_after(workdir / "spike_layers.jsonl", latest)
  log(f"resumed from {checkpointer.path(latest)} (step {latest})")
  old_schedule = saved.get("config", {}).get("schedule_steps") or saved.get("config", {}).get(
      "steps")
  if old_schedule not in (None, cfg.total_schedule_steps) and latest < cfg.steps:
    log(f"note: the LR schedule now spans {cfg.total_schedule_steps} steps (the checkpointed run "
        f"planned {old_schedule}); pass --schedule-steps {old_schedule} to keep it unchanged")
  return state, int(latest)


def _explain_oom(fn, cfg: Config):
  """`fn`, with running out of device memory turned into a ConfigError that says what to change.

  The first call is waited for (dispatch is asynchronous: an allocation failure would otherwise
  surface later, at whichever call first reads a result).
  """
  first = True

  def call(*args):
    nonlocal first
    try:
      out = fn(*args)
      if first:
        jax.block_until_ready(out)
        first = False
      return out
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
        raise
      raise ConfigError(
          f"out of device memory with --batch-size {cfg.batch_size} and --seq-len {cfg.seq_len} "
          f"(model {cfg.model}, {jax.device_count()} device(s)): lower --batch-size or --seq-len, "
          f"or recompute activations with --remat block (XLA: {str(e).splitlines()[0][:300]})"
      ) from None

  return call


def _describe(cfg: Config, training: state_lib.Training, mesh, dataset) -> None:
  model_name = f"from {cfg.init_from}" if cfg.init_from else cfg.model
  log(f"model {model_name}: {training.num_params:,} parameters ({cfg.dtype}); optimizer "
      f"{cfg.optimizer}; mesh {dict(mesh.shape)} on {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es)")
  if cfg.quant != "none":
    log(f"fake-quantized {cfg.quant} weights and activations in q/k/v/o/gate/up/down "
        f"(groups of up to {cfg.quant_group_size} along the input dimension)")
  log(f"data {dataset.description}")


def _print_sample(cfg: Config, training, params, dataset) -> str | None:
  """--sample-tokens: a continuation of the first validation sequence's opening, printed."""
  if cfg.sample_tokens == 0:
    return None
  prompt = dataset.val_batches[0]["tokens"][0][:min(evaluate.SAMPLE_PROMPT_TOKENS, cfg.seq_len)]
  ids = evaluate.sample(training, params, prompt, cfg.sample_tokens, cfg.seq_len, cfg.seed)
  text = dataset.tokenizer.decode(ids)
  log(f"sample ({cfg.sample_tokens} tokens after the prompt "
      f"{dataset.tokenizer.decode(prompt)!r}):\n{text}")
  return text


def _write_outputs(cfg: Config, training, state, workdir: Path, writer) -> None:
  """--export-hf, the loss-curve plot and the spike report."""
  if cfg.export_hf:
    weights.export_hf(state["params"], training.model_cfg, cfg.export_hf)
    log(f"exported the weights to {cfg.export_hf} (Hugging Face LlamaForCausalLM)")
  if jax.process_index() != 0:
    return
  if cfg.plot:
    png = metrics_lib.plot_loss_curves(writer.path, workdir / "loss_curve.png",
                                       title=f"{cfg.model} / {cfg.optimizer}")
    if png is not None:
      log(f"wrote {writer.path}, {png} and TensorBoard events in {workdir / 'tensorboard'}")
  if cfg.spike_monitor > 0:
    written = spike_report.write_report(workdir, state["params"], cfg.spike_monitor)
    if written is not None:
      log("wrote " + " and ".join(str(p) for p in written if p is not None))


def _versions() -> dict[str, str]:
  from importlib.metadata import version
  return {"jax": jax.__version__, "flax": version("flax"), "optax": optax.__version__}
