"""Final validation loss of every optimizer on the menu, same model, data, token budget and schedule.

The training runs are the training script's own pieces, called in-process (``train.data`` for the
batches, ``train.optimizers.build_optimizer`` for the optimizer and the paper's schedule -- linear
warmup from 0 over 10% of the steps, then cosine to 10% of the peak --, ``train.step.make_train_step``
and ``make_eval_step`` for the jitted steps, with its spike injection): no checkpoints are written.

Protocol (``python benchmarks/quality.py``):

1. learning-rate grid: every row at every LR of its grid, one seed (seed 0);
2. the best LR of each row (lowest final validation loss) is re-run with more seeds; if the best LR
   is at an edge of the grid, the grid is first extended by one value past that edge (once);
3. reported: final validation loss and perplexity (mean +- sample std over the seeds), the
   optimizer-state bytes, and the median step time (forward + backward + update) of the run.

Rows: adam, adamw (weight decay 0.1), adam_clip_norm (global norm 1.0), adam_clip_value (1e-3),
adafactor, spam (dense), spam_d0.25, stable_spam, galore (rank hidden/4), scale, and the spike
defences of JAX trainers: adamw_clip_norm, adamw_zclip, adamw_skip, spam_clip_norm (issue 12); and
spam_restart_bc (SPAM with the bias correction restarted at each reset), spam_proj_x0.25 and
adamw_proj_x0.25 (dense SPAM / AdamW with the projections' updates x 0.25: sparse SPAM's step sizes
without its sparsity).
``--tokenizer bpe --bpe-vocab N`` and ``--reset-interval`` / ``--reset-warmup`` apply to every run of
a results file (its meta records them; a file holds one setting).

Results are appended to a JSON file after every run; re-running the same command skips finished runs.

Usage::

  python benchmarks/quality.py                                  # tiny, the full protocol
  python benchmarks/quality.py --model 9m --rows adam,spam,stable_spam --steps 1000 --seeds 2
  python benchmarks/quality.py --model 20m --seq-len 256 --tokenizer bpe --bpe-vocab 4096 \
      --reset-interval 150 --reset-warmup 45 --steps 600 \
      --rows adamw,adamw_clip_norm,adamw_zclip,adamw_skip,spam,spam_clip_norm,stable_spam,spam_d0.25 \
      --json benchmarks/results/quality_20m_bpe.json                 # issue 12's setting
  python benchmarks/quality.py --smoke                          # a few steps, for the tests
  python benchmarks/quality.py --report-only                    # tables and plots from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import models  # noqa: E402
from models import quant as quant_lib  # noqa: E402
from benchmarks.common import cpu_name, tree_bytes  # noqa: E402
from train import data as data_lib  # noqa: E402
from train import optimizers  # noqa: E402
from train.config import Config, validate  # noqa: E402
from train.evaluate import mean_nll  # noqa: E402
from train.state import model_config  # noqa: E402
from train.step import make_eval_step, make_train_step  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"

# Row name -> Config overrides. Everything else is the training script's default.
ROWS: dict[str, dict[str, Any]] = {
    "adam": dict(optimizer="adam"),
    "adamw": dict(optimizer="adamw", weight_decay=0.1),
    "adam_clip_norm": dict(optimizer="adam_clip_norm"),
    "adam_clip_value": dict(optimizer="adam_clip_value"),
    "adafactor": dict(optimizer="adafactor"),
    "spam": dict(optimizer="spam"),
    "spam_d0.25": dict(optimizer="spam", density=0.25),
    "stable_spam": dict(optimizer="stable_spam"),
    "galore": dict(optimizer="galore"),
    "scale": dict(optimizer="scale"),
    # The spike defences JAX trainers already have (issue 12), and SPAM behind one of them.
    "adamw_clip_norm": dict(optimizer="adamw_clip_norm"),
    "adamw_zclip": dict(optimizer="adamw_zclip"),
    "adamw_skip": dict(optimizer="adamw_skip"),
    "spam_clip_norm": dict(optimizer="spam_clip_norm"),
    # SPAM with Adam's bias correction restarted at each reset: no larger post-reset steps (issue 12,
    # point 4: does SPAM's gain survive without them?).
    "spam_restart_bc": dict(optimizer="spam", restart_bias_correction=True),
    # Sparse SPAM's controls: dense, projection updates x 0.25 (projections_scaled).
    "spam_proj_x0.25": dict(optimizer="spam"),
    "adamw_proj_x0.25": dict(optimizer="adamw", weight_decay=0.1),
}

# LR grids (3 values each, x3 apart; the paper swept 1e-4..1e-3 for 60M at 10k steps: our models
# are smaller and our runs shorter, so the grids sit higher). SCALE's column-normalised step has
# entries ~1/sqrt(fan-out) of Adam's, so its grid is shifted up.
GRIDS: dict[str, list[float]] = {
    "default": [1e-3, 3e-3, 1e-2],
    "galore": [3e-3, 1e-2, 3e-2],
    "spam_d0.25": [3e-3, 1e-2, 3e-2],
    "spam_proj_x0.25": [3e-3, 1e-2, 3e-2],
    "adamw_proj_x0.25": [3e-3, 1e-2, 3e-2],
    "scale": [3e-3, 1e-2, 3e-2],
}


def grid_for(row: str) -> list[float]:
  return list(GRIDS.get(row, GRIDS["default"]))


# ----------------------------------------------------------------------------- custom optimizers


def spike_filter(mode: str, threshold: float, *, b2: float, reset_interval: int, clip_delay: int):
  """SPAM's spike rule as a standalone transform: ``clip`` (the library's ``spike_clip``) or ``nullify``.

  ``nullify`` is the same detection (``g² > θ v`` against the previous raw ``v``, off during the
  ``clip_delay`` windows, ``v`` zeroed at resets) but sets the spiked entries to 0 instead of
  ``sign(g) sqrt(θ v)``; the zeroed entry then enters both moments as 0 (the paper's Appendix K
  comparison: ``spike_clip(nullify=True)``). It keeps its own ``v``, equal to
  Adam's ``v`` behind it.
  """
  import spam_optax as spam

  if mode not in ("clip", "nullify"):
    raise ValueError(f"unknown spike filter mode {mode!r}")
  return spam.spike_clip(threshold, b2=b2, reset_interval=reset_interval, clip_delay=clip_delay,
                         nullify=mode == "nullify")


def spam_unfused(cfg: Config, mode: str):
  """SPAM as the unfused chain of its documented pieces, with the spike rule ``clip`` or ``nullify``."""
  import spam_optax as spam
  sched = optimizers.lr_schedule(cfg)
  tx = optax.chain(
      spike_filter(mode, cfg.threshold, b2=cfg.b2, reset_interval=cfg.reset_interval,
                   clip_delay=cfg.clip_delay),
      spam.scale_by_adam_with_reset(cfg.b1, cfg.b2, 1e-6, reset_interval=cfg.reset_interval,
                                    restart_bias_correction=cfg.restart_bias_correction),
      optax.scale_by_schedule(spam.reset_warmup_schedule(cfg.reset_interval, cfg.reset_warmup)),
      optax.scale_by_learning_rate(sched))
  return tx, sched


def projections_scaled(cfg: Config, scale: float):
  """The row's optimizer, dense, with its updates of the projection kernels (the leaves sparse SPAM
  makes sparse) multiplied by ``scale`` (weight decay included); embeddings, norms and the head get
  the full step.

  The control for sparse SPAM: at density d an entry of a projection is updated in about a fraction
  d of the reset intervals, so its mean step is about d of dense SPAM's at the same LR, while the
  other leaves stay dense. This row has that split of step sizes without the sparsity.
  """
  tx, sched = optimizers.build_optimizer(cfg.replace(density=1.0))
  return optax.chain(tx, optax.masked(optax.scale(scale), optimizers.projection_mask)), sched


CUSTOM: dict[str, Callable[[Config], tuple[optax.GradientTransformation, optax.Schedule]]] = {
    "spam_unfused_clip": lambda cfg: spam_unfused(cfg, "clip"),
    "spam_nullify": lambda cfg: spam_unfused(cfg, "nullify"),
    "spam_proj_x0.25": lambda cfg: projections_scaled(cfg, 0.25),
    "adamw_proj_x0.25": lambda cfg: projections_scaled(cfg, 0.25),
}
# Custom optimizers that are also rows of the quality table (--rows): the row's Config overrides
# (ROWS) name the optimizer that CUSTOM wraps.
CUSTOM_ROWS = ("spam_proj_x0.25", "adamw_proj_x0.25")


# ----------------------------------------------------------------------------- one run


@dataclasses.dataclass
class RunSpec:
  """One training run. ``overrides`` are Config fields; ``custom`` names a CUSTOM optimizer."""

  model: str
  row: str
  lr: float
  seed: int
  steps: int
  overrides: dict = dataclasses.field(default_factory=dict)
  custom: str | None = None

  def key(self) -> str:
    extra = ",".join(f"{k}={v}" for k, v in sorted(self.overrides.items()))
    return f"{self.model}|{self.row}|lr={self.lr:g}|seed={self.seed}|steps={self.steps}|{extra}"


_DATASETS: dict[tuple, data_lib.Dataset] = {}


def _dataset(cfg: Config) -> data_lib.Dataset:
  key = (cfg.data, cfg.tokenizer, cfg.bpe_vocab, cfg.seq_len, cfg.batch_size, cfg.eval_batches,
         cfg.seed, cfg.val_fraction)
  if key not in _DATASETS:
    with tempfile.TemporaryDirectory() as tmp:
      _DATASETS[key] = data_lib.load_dataset(cfg, Path(tmp))
  return _DATASETS[key]


def run_one(spec: RunSpec, *, batch_size: int, seq_len: int, eval_batches: int, log_every: int,
            num_evals: int, common: dict | None = None) -> dict:
  """Trains one run and returns its record (final val loss/ppl, curves, state bytes, step time)."""
  fields = dict(model=spec.model, lr=spec.lr, seed=spec.seed, steps=spec.steps,
                batch_size=batch_size, seq_len=seq_len, eval_batches=eval_batches, progress=False,
                plot=False)
  fields.update(common or {})
  fields.update(ROWS.get(spec.row, {}))
  fields.update(spec.overrides)
  cfg = Config(**fields)
  if cfg.optimizer == "galore":
    # The paper's GaLore rank is hidden/4 for 60M (128 of 512); keep that ratio.
    cfg = cfg.replace(galore_rank=max(1, models.get_config(cfg.model).hidden_size // 4))
  validate(cfg)
  dataset = _dataset(cfg)
  model_cfg = model_config(cfg, dataset.vocab_size)
  custom = spec.custom or (spec.row if spec.row in CUSTOM_ROWS else None)
  if custom:
    tx, schedule = CUSTOM[custom](cfg)
  else:
    tx, schedule = optimizers.build_optimizer(cfg)

  model = quant_lib.quantize(models.make_model(model_cfg, seed=cfg.seed), cfg.quant,
                             cfg.quant_group_size)  # --quant: a quantized graphdef, float params
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  opt_state = tx.init(params)
  state_bytes = tree_bytes(opt_state)
  param_count = models.count_params(params)
  state = {"step": jnp.zeros([], jnp.int32), "params": params, "opt_state": opt_state}
  train_step = jax.jit(make_train_step(cfg, graphdef, tx, schedule, model_cfg.vocab_size), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef))

  def evaluate(p) -> float:
    return mean_nll(eval_step, p, dataset.val_batches)[0]

  eval_at = sorted({max(1, round(spec.steps * i / num_evals)) for i in range(1, num_evals + 1)})
  train_curve, val_curve, window_times = [], [], []
  spikes = injected = skipped = 0
  injected_steps: list[int] = []  # steps that had a spike injected (whole-gradient / input modes)

  def count(fetched, last_step):
    nonlocal spikes, injected, skipped
    for i, m in enumerate(fetched):
      spikes += int(m.get("spikes", 0))
      skipped += int(m.get("skipped", 0))
      injected += int(m["injected"])
      if int(m["injected"]) and len(injected_steps) < 1000:
        injected_steps.append(last_step - len(fetched) + 1 + i)

  diverged = False
  pending: list = []
  t_window = time.perf_counter()
  compile_s = None
  val_loss = float("nan")
  batches = dataset.train_iterator(0, 1)  # batches from step 0 (grain, prefetched)
  for step in range(spec.steps):
    batch = next(batches)
    state, metrics = train_step(state, batch)
    pending.append(metrics)
    done = step + 1
    if compile_s is None:
      jax.block_until_ready(metrics)
      compile_s = time.perf_counter() - t_window
      pending_losses = jax.device_get(pending)
      pending.clear()
      count(pending_losses, done)
      train_curve.append((done, float(pending_losses[0]["loss"])))
      t_window = time.perf_counter()
      continue
    if done % log_every == 0 or done == spec.steps or done in eval_at:
      fetched = jax.device_get(pending)
      window_times.append((time.perf_counter() - t_window) / len(pending))
      losses = [float(m["loss"]) for m in fetched]
      count(fetched, done)
      pending.clear()
      train_curve.append((done, float(np.mean(losses))))
      if not all(math.isfinite(x) for x in losses):
        diverged = True
        break
      if done in eval_at:
        val_loss = evaluate(state["params"])
        val_curve.append((done, val_loss))
      t_window = time.perf_counter()
  if diverged:
    val_loss = float("nan")
  elif not val_curve or val_curve[-1][0] != spec.steps:
    val_loss = evaluate(state["params"])
    val_curve.append((spec.steps, val_loss))
  finite = math.isfinite(val_loss)
  return {
      "key": spec.key(), "model": spec.model, "row": spec.row, "lr": spec.lr, "seed": spec.seed,
      "steps": spec.steps, "overrides": spec.overrides, "custom": spec.custom,
      "tokens": spec.steps * cfg.batch_size * cfg.seq_len, "params": param_count,
      "val_loss": val_loss if finite else None,
      "val_ppl": math.exp(min(val_loss, 700.0)) if finite else None, "diverged": not finite,
      "state_bytes": state_bytes,
      "step_ms": 1e3 * statistics.median(window_times) if window_times else None,
      "compile_s": compile_s, "spikes_clipped": spikes, "injected": injected,
      "steps_skipped": skipped, "injected_steps": injected_steps,
      "loadavg_1min": os.getloadavg()[0],
      "train_curve": [(s, round(l, 5)) for s, l in train_curve],
      "val_curve": [(s, round(l, 5)) for s, l in val_curve],
  }


# ----------------------------------------------------------------------------- results file


class Store:
  """Run records in a JSON file, keyed by RunSpec.key(); written after every run."""

  def __init__(self, path: Path, meta: dict):
    self.path = Path(path)
    self.data = {"meta": meta, "runs": {}}
    if self.path.exists():
      old = json.loads(self.path.read_text())
      had = old.get("meta", {}).get("common", {})
      if old.get("runs") and had != meta.get("common", {}):
        raise SystemExit(f"{self.path} holds runs with settings {had}, not "
                         f"{meta.get('common', {})}: pass another --json")
      self.data["runs"] = old.get("runs", {})
      self.data["meta"] = {**old.get("meta", {}), **meta}

  def get(self, spec: RunSpec) -> dict | None:
    return self.data["runs"].get(spec.key())

  def put(self, record: dict) -> None:
    self.data["runs"][record["key"]] = record
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(self.data, indent=None, separators=(",", ":")))
    tmp.replace(self.path)

  def runs(self) -> list[dict]:
    return list(self.data["runs"].values())


def machine() -> dict:
  dev = jax.devices()[0]
  return {"device": f"{dev.platform} x{jax.device_count()}", "cpu": cpu_name(), "cores": os.cpu_count(),
          "jax": jax.__version__, "optax": optax.__version__}


def runner_args(parser: argparse.ArgumentParser, *, steps: int) -> None:
  """Flags shared by quality.py, spikes.py and ablations.py."""
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--eval-batches", type=int, default=48, help="validation batches (fixed)")
  parser.add_argument("--log-every", type=int, default=25)
  parser.add_argument("--num-evals", type=int, default=4, help="validation points per run")
  parser.add_argument("--json", help="results file (default: benchmarks/results/<name>.json)")
  parser.add_argument("--smoke", action="store_true", help="a few steps, one seed (for tests)")
  parser.add_argument("--report-only", action="store_true",
                      help="no training: tables and plots from the JSON")
  parser.add_argument("--no-plot", action="store_true")
  # Settings shared by every run of a results file (its meta records them; a file holds one setting).
  parser.add_argument("--tokenizer", default="auto", help="byte (auto) or bpe, trained locally")
  parser.add_argument("--bpe-vocab", type=int, default=4096)
  parser.add_argument("--reset-interval", type=int, help="SPAM's ΔT (default: the script's 500)")
  parser.add_argument("--reset-warmup", type=int, help="SPAM's N (default: the script's 150)")


def common_overrides(args) -> dict[str, Any]:
  """The Config fields every run of this invocation shares, where they differ from the default."""
  out: dict[str, Any] = {}
  if getattr(args, "tokenizer", "auto") != "auto":
    out.update(tokenizer=args.tokenizer, bpe_vocab=args.bpe_vocab)
  for name in ("reset_interval", "reset_warmup"):
    if getattr(args, name, None) is not None:
      out[name] = getattr(args, name)
  return out


def execute(store: Store, spec: RunSpec, args, label: str = "") -> dict:
  done = store.get(spec)
  if done is not None:
    return done
  t0 = time.perf_counter()
  rec = run_one(spec, batch_size=args.batch_size, seq_len=args.seq_len,
                eval_batches=args.eval_batches, log_every=args.log_every,
                num_evals=args.num_evals, common=common_overrides(args))
  rec["wall_s"] = time.perf_counter() - t0
  store.put(rec)
  loss = "diverged" if rec["diverged"] else f"{rec['val_loss']:.4f}"
  print(f"[{time.strftime('%H:%M:%S')}] {label}{spec.key()}: val {loss}, "
        f"{rec['step_ms']:.1f} ms/step, {rec['wall_s']:.1f} s", flush=True)
  return rec


def smoke_defaults(args) -> None:
  """--smoke: a few steps of tiny on short sequences; results to a temporary file."""
  if args.smoke:
    args.model, args.steps, args.seq_len, args.batch_size = "tiny", 6, 32, 4
    args.eval_batches, args.log_every, args.num_evals = 2, 2, 2
    if not args.json:
      args.json = str(Path(tempfile.mkdtemp(prefix="bench-smoke-")) / "results.json")


# ----------------------------------------------------------------------------- summaries


def mean_std(values: list[float]) -> tuple[float, float]:
  if not values:
    return float("nan"), float("nan")
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_mean_std(values: list[float], digits: int = 4) -> str:
  if not values:
    return "-"
  m, s = mean_std(values)
  return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def fmt_bytes(n: int) -> str:
  return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def fmt_lr(lr: float) -> str:
  return f"{lr:.0e}".replace("e-0", "e-")


# ----------------------------------------------------------------------------- quality protocol


def best_lr(runs: list[dict], row: str, seed: int = 0) -> float | None:
  cand = [r for r in runs if r["row"] == row and r["seed"] == seed and not r["overrides"]
          and r["val_loss"] is not None]
  return min(cand, key=lambda r: r["val_loss"])["lr"] if cand else None


def quality_protocol(store: Store, args) -> None:
  rows = args.rows
  for row in rows:  # 1. the grid, seed 0
    grid = grid_for(row) if not args.smoke else grid_for(row)[1:2]
    for lr in grid:
      execute(store, RunSpec(args.model, row, lr, 0, args.steps), args, "grid ")
    if args.smoke or not args.extend_edges or len(grid) < 2:
      continue
    lr = best_lr(store.runs(), row)
    if lr is not None and lr in (grid[0], grid[-1]):  # extend once past the edge it sits on
      step = grid[1] / grid[0]
      extra = lr / step if lr == grid[0] else lr * step
      execute(store, RunSpec(args.model, row, float(f"{extra:.3g}"), 0, args.steps), args, "edge ")
  for row in rows:  # 2. more seeds at the best LR
    lr = best_lr(store.runs(), row)
    if lr is None:
      print(f"{row}: every LR diverged; no seeds run")
      continue
    for seed in range(1, args.seeds):
      execute(store, RunSpec(args.model, row, lr, seed, args.steps), args, "seed ")


def quality_table(runs: list[dict], model: str, steps: int, rows: list[str]) -> str:
  """The table; differences are against ``adam`` when it is a row, else against the first row."""
  runs = [r for r in runs if r["model"] == model and r["steps"] == steps and not r["overrides"]]
  base = baseline_row(rows)
  out = ["| optimizer | LR grid (seed 0: final val loss) | best LR | seeds | val loss | val ppl | "
         f"Δ loss vs {base} (paired by seed) | optimizer state | step ms |",
         "|---|---|---|---|---|---|---|---|---|"]
  adam_lr = best_lr(runs, base)
  adam_by_seed = {r["seed"]: r["val_loss"] for r in runs
                  if r["row"] == base and r["lr"] == adam_lr and not r["diverged"]}
  for row in rows:
    mine = [r for r in runs if r["row"] == row]
    if not mine:
      continue
    grid = sorted((r for r in mine if r["seed"] == 0), key=lambda r: r["lr"])
    grid_txt = ", ".join(f"{fmt_lr(r['lr'])}: " + ("div." if r["diverged"] else f"{r['val_loss']:.3f}")
                         for r in grid)
    lr = best_lr(runs, row)
    best = [r for r in mine if r["lr"] == lr and not r["diverged"]]
    losses = [r["val_loss"] for r in best]
    ppls = [r["val_ppl"] for r in best]
    # Every run of a row costs the same per step whatever its LR; the machine is shared, so the
    # least-loaded run (the lowest of the runs' median step times) is the estimate.
    steps_ms = [r["step_ms"] for r in mine if r["step_ms"]]
    step_txt = f"{min(steps_ms):.1f}" if steps_ms else "-"
    diffs = [r["val_loss"] - adam_by_seed[r["seed"]] for r in best if r["seed"] in adam_by_seed]
    diff_txt = "-" if row == base or not diffs else fmt_mean_std(diffs, 3)
    out.append(f"| {row} | {grid_txt} | {fmt_lr(lr) if lr else '-'} | {len(best)} | "
               f"{fmt_mean_std(losses)} | {fmt_mean_std(ppls, 3)} | {diff_txt} | "
               f"{fmt_bytes(mine[0]['state_bytes'])} | {step_txt} |")
  out += ["", wall_summary([r for r in runs if r["row"] in rows])]
  skipped = {r["row"]: r["steps_skipped"] for r in runs if r.get("steps_skipped")}
  if skipped:
    out.append("Steps skipped (runs that skipped any): " + ", ".join(
        f"{r['row']} {fmt_lr(r['lr'])} seed {r['seed']}: {r['steps_skipped']}"
        for r in runs if r.get("steps_skipped")))
  return "\n".join(out)


def baseline_row(rows: list[str]) -> str:
  """The row that differences are taken against: adam, or the first row when adam is not a row."""
  return "adam" if "adam" in rows else rows[0]


def wall_summary(runs: list[dict]) -> str:
  """Runs and wall time of a table (each run on its own core when two processes share the machine)."""
  walls = [r["wall_s"] for r in runs if r.get("wall_s")]
  if not walls:
    return f"{len(runs)} runs."
  return (f"{len(runs)} runs, wall time {sum(walls) / 3600:.1f} h summed over runs (median "
          f"{statistics.median(walls) / 60:.1f} min per run).")


def plot_quality(runs: list[dict], model: str, steps: int, rows: list[str], path: Path) -> Path | None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = [r for r in runs if r["model"] == model and r["steps"] == steps and not r["overrides"]]
  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2), dpi=72)
  cmap = plt.get_cmap("tab10")

  def best_runs(row):
    lr = best_lr(runs, row)
    return lr, [r for r in runs if r["row"] == row and r["lr"] == lr and not r["diverged"]]

  base = baseline_row(rows)  # as the table's differences
  _, base_runs = best_runs(base)
  base_curve = {r["seed"]: dict(r["train_curve"]) for r in base_runs}
  plotted = False
  for i, row in enumerate(rows):
    lr, best = best_runs(row)
    if not best:
      continue
    plotted = True
    color = cmap(i % 10)
    n = min(len(r["train_curve"]) for r in best)
    xs = [best[0]["train_curve"][j][0] for j in range(n)]
    mean = np.mean([[r["train_curve"][j][1] for j in range(n)] for r in best], axis=0)
    ax1.plot(xs, mean, color=color, lw=1.2, label=f"{row} ({fmt_lr(lr)}, n={len(best)})")
    paired = [r for r in best if r["seed"] in base_curve]
    if paired and row != base:
      diff = np.mean([[l - base_curve[r["seed"]].get(s, np.nan) for s, l in r["train_curve"][:n]]
                      for r in paired], axis=0)
      k = 4  # smooth over 4 windows (100 steps)
      smooth = np.convolve(diff, np.ones(k) / k, mode="valid")
      ax2.plot(xs[k - 1:], smooth, color=color, lw=1.2, label=row)
    m = min(len(r["val_curve"]) for r in best)
    vs = [best[0]["val_curve"][j][0] for j in range(m)]
    vmean = np.mean([[r["val_curve"][j][1] for j in range(m)] for r in best], axis=0)
    ax3.plot(vs, vmean, color=color, marker="o", ms=3, lw=1.2, label=row)
  if not plotted:
    plt.close(fig)
    return None
  ax1.set(xlabel="step", ylabel="train loss (25-step window, seed mean)",
          title=f"{model}: training loss, each optimizer at its best LR")
  ax2.axhline(0, color="k", lw=0.8)
  ax2.set(xlabel="step", ylabel=f"train loss - {base}'s (same seeds, 100-step mean)",
          title=f"difference to {base} (below 0: better)")
  ax2.set_ylim(-0.35, 0.25)
  finals = [r["val_loss"] for r in runs if r["val_loss"] is not None]
  if finals:
    lo = min(finals)
    ax1.set_ylim(lo - 0.1, lo + 1.2)
    ax3.set_ylim(lo - 0.05, lo + 0.6)
  ax3.set(xlabel="step", ylabel="validation loss", title="validation loss (seed mean)")
  ax1.legend(fontsize=7, ncol=2)
  for ax in (ax1, ax2, ax3):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  runner_args(parser, steps=1000)
  parser.add_argument("--rows", default=",".join(ROWS))
  parser.add_argument("--seeds", type=int, default=3, help="seeds at the best LR")
  parser.add_argument("--no-extend-edges", dest="extend_edges", action="store_false",
                      help="do not extend the grid when the best LR is at its edge")
  parser.add_argument("--grid", default="",
                      help="override LR grids: ROW=LR/LR/...,ROW=... (e.g. adam=1e-3/3e-3)")
  parser.add_argument("--plot", help="loss-curve PNG (default: docs/quality_<model>.png)")
  parser.add_argument("--also-json", default="",
                      help="results files (comma-separated) whose runs join the report, read only: "
                      "the same setting run by another process into its own file")
  args = parser.parse_args(argv)
  smoke_defaults(args)
  if args.smoke:
    args.seeds = 1
    if args.rows == parser.get_default("rows"):
      args.rows = "adam,spam,scale"
  args.rows = [r for r in args.rows.split(",") if r]
  unknown = [r for r in args.rows if r not in ROWS]
  if unknown:
    parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
  for item in filter(None, args.grid.split(",")):
    row, _, lrs = item.partition("=")
    if row not in ROWS or not lrs:
      parser.error(f"bad --grid item {item!r}: expected ROW=LR/LR/...")
    GRIDS[row] = sorted(float(x) for x in lrs.split("/"))
  path = Path(args.json or RESULTS / f"quality_{args.model}.json")
  store = Store(path, {"machine": machine(), "common": common_overrides(args),
                       "batch_size": args.batch_size, "seq_len": args.seq_len,
                       "eval_batches": args.eval_batches, "grids": GRIDS})
  if not args.report_only:
    quality_protocol(store, args)
  runs = store.runs()
  for extra in filter(None, args.also_json.split(",")):
    runs += list(Store(Path(extra), {"common": common_overrides(args)}).data["runs"].values())
  print(f"# {args.model}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens = "
        f"{args.steps * args.batch_size * args.seq_len:,} tokens; {machine()}")
  print(quality_table(runs, args.model, args.steps, args.rows))
  if not args.no_plot and not args.smoke:
    png = plot_quality(runs, args.model, args.steps, args.rows,
                       Path(args.plot or DOCS / f"quality_{args.model}.png"))
    if png:
      print(f"wrote {png}")
  print(f"results: {path}")
  return store


if __name__ == "__main__":
  main()
