"""4-bit training at small scale: Adam, SPAM and Stable-SPAM with INT4 and FP4 fake-quantized
projections (``--quant``, models/quant.py) over a learning-rate grid, fp32 Adam beside them.

The Stable-SPAM paper's claim: in 4 bits Adam becomes unstable at higher learning rates and
Stable-SPAM stays stable. The runs are benchmarks/quality.py's (``run_one``: the training script's
data, optimizers, schedule and jitted steps, in-process, no checkpoints).

Protocol (``python benchmarks/quant_quality.py``):

1. every row at every LR of the grid, seed 0 (default grid 3e-4, 1e-3, 3e-3, 1e-2: fp32 Adam's best
   on ``tiny`` is 1e-3, benchmarks/QUALITY.md, so the grid reaches 10x past it);
2. each row's best LR (lowest final validation loss, seed 0) re-run with seeds 1 and 2;
3. reported per row: the grid's final validation losses, the best LR's loss (mean +- std over the
   seeds) and the number of diverged runs: NaN, or a final validation loss above the initial loss.

Stable-SPAM runs with the authors' 4-bit settings, gammas (0.7, 0.9, 0.999) and update_proj_gap
(our ``--stable-reset-interval``) 500, as their INT4_scripts / FP4_scripts.

Usage::

  python benchmarks/quant_quality.py                     # tiny, 1000 steps, the full protocol
  python benchmarks/quant_quality.py --model 9m --grid 1e-3/3e-3/1e-2/3e-2
  python benchmarks/quant_quality.py --smoke             # a few steps, for the tests
  python benchmarks/quant_quality.py --report-only       # the table from the JSON
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import quality as q  # noqa: E402

STABLE_SPAM_4BIT = dict(optimizer="stable_spam", gamma1=0.7, gamma2=0.9, gamma3=0.999,
                        stable_reset_interval=500)
OPTIMIZERS = {"adam": dict(optimizer="adam"), "spam": dict(optimizer="spam"),
              "stable_spam": STABLE_SPAM_4BIT}
# Row -> Config overrides: fp32 Adam, then each optimizer in INT4 and FP4.
ROWS = {"fp32/adam": OPTIMIZERS["adam"]}
ROWS.update({f"{quant}/{name}": dict(opt, quant=quant)
             for quant in ("int4", "fp4") for name, opt in OPTIMIZERS.items()})
GRID = [3e-4, 1e-3, 3e-3, 1e-2]


def spec(args, row: str, lr: float, seed: int) -> q.RunSpec:
  overrides = dict(ROWS[row], quant_group_size=args.group_size)
  return q.RunSpec(args.model, row, lr, seed, args.steps, overrides)


def diverged(rec: dict) -> bool:
  """NaN, or a final validation loss above the first training loss (the initial loss)."""
  initial = rec["train_curve"][0][1] if rec["train_curve"] else math.inf
  return rec["diverged"] or rec["val_loss"] is None or rec["val_loss"] > initial


def row_runs(store: q.Store, args, row: str) -> list[dict]:
  keys = {spec(args, row, lr, s).key() for lr in args.grid for s in range(args.seeds)}
  return [r for r in store.runs() if r["key"] in keys]


def best_lr(runs: list[dict]) -> float | None:
  ok = [r for r in runs if r["seed"] == 0 and not diverged(r)]
  return min(ok, key=lambda r: r["val_loss"])["lr"] if ok else None


def protocol(store: q.Store, args) -> None:
  for row in args.rows:  # 1. the grid, seed 0
    for lr in args.grid:
      q.execute(store, spec(args, row, lr, 0), args, "grid ")
  for row in args.rows:  # 2. more seeds at the best LR
    lr = best_lr(row_runs(store, args, row))
    if lr is None:
      print(f"{row}: every LR diverged; no seeds run")
      continue
    for seed in range(1, args.seeds):
      q.execute(store, spec(args, row, lr, seed), args, "seed ")


def table(store: q.Store, args) -> str:
  out = ["| row | quant | optimizer | LR grid (seed 0: final val loss) | best LR | seeds | "
         "val loss at best LR | diverged runs |", "|---|---|---|---|---|---|---|---|"]
  for row in args.rows:
    runs = row_runs(store, args, row)
    if not runs:
      continue
    grid = sorted((r for r in runs if r["seed"] == 0), key=lambda r: r["lr"])
    grid_txt = ", ".join(f"{q.fmt_lr(r['lr'])}: " + ("div." if diverged(r) else
                                                    f"{r['val_loss']:.3f}") for r in grid)
    lr = best_lr(runs)
    best = [r["val_loss"] for r in runs if r["lr"] == lr and not diverged(r)]
    quant, _, name = row.partition("/")
    out.append(f"| {row} | {quant} | {name} | {grid_txt} | {q.fmt_lr(lr) if lr else '-'} | "
               f"{len(best)} | {q.fmt_mean_std(best)} | {sum(map(diverged, runs))} / {len(runs)} |")
  return "\n".join(out)


def plot(store: q.Store, args, path: Path) -> Path | None:
  """Final validation loss against the LR, one line per row (seed 0); diverged runs as x on top."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=72)
  styles = {"fp32": "-", "int4": "--", "fp4": ":"}
  colors = {"adam": "tab:blue", "spam": "tab:orange", "stable_spam": "tab:green"}
  finite = [r["val_loss"] for row in args.rows for r in row_runs(store, args, row)
            if not diverged(r)]
  if not finite:
    plt.close(fig)
    return None
  top = min(max(finite), min(finite) + 1.5) + 0.1
  for row in args.rows:
    quant, _, name = row.partition("/")
    grid = sorted((r for r in row_runs(store, args, row) if r["seed"] == 0), key=lambda r: r["lr"])
    ok = [r for r in grid if not diverged(r)]
    ax.plot([r["lr"] for r in ok], [min(r["val_loss"], top) for r in ok], styles[quant],
            color=colors[name], marker="o", ms=4, label=row)
    bad = [r["lr"] for r in grid if diverged(r)]
    ax.plot(bad, [top] * len(bad), "x", color=colors[name], ms=9)
  ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss (seed 0)",
         title=f"{args.model}, {args.steps} steps: 4-bit fake quantization (x: diverged)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def main(argv=None) -> q.Store:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  q.runner_args(parser, steps=1000)
  parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {', '.join(ROWS)}")
  parser.add_argument("--grid", default="/".join(f"{lr:g}" for lr in GRID), help="LRs, a/b/c")
  parser.add_argument("--seeds", type=int, default=3, help="seeds at each row's best LR")
  parser.add_argument("--group-size", type=int, default=256, help="--quant-group-size")
  args = parser.parse_args(argv)
  q.smoke_defaults(args)
  args.grid = sorted(float(x) for x in args.grid.split("/") if x)
  args.rows = [r for r in args.rows.split(",") if r]
  if args.smoke:  # one quantized run (the float rows are quality.py's, smoke-tested there)
    args.seeds, args.grid = 1, [1e-3]
    if args.rows == list(ROWS):
      args.rows = ["int4/stable_spam"]
  unknown = [r for r in args.rows if r not in ROWS]
  if unknown:
    parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
  path = Path(args.json or q.RESULTS / f"quant_quality_{args.model}.json")
  store = q.Store(path, {"machine": q.machine(), "common": q.common_overrides(args),
                         "batch_size": args.batch_size,
                         "seq_len": args.seq_len, "eval_batches": args.eval_batches,
                         "grid": args.grid, "group_size": args.group_size})
  if not args.report_only:
    protocol(store, args)
  print(f"# {args.model}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, "
        f"groups of {args.group_size}; diverged: NaN or final val loss above the initial loss")
  print(table(store, args))
  if not args.no_plot and not args.smoke:
    png = plot(store, args, q.DOCS / f"quant_quality_{args.model}.png")
    if png:
      print(f"wrote {png}")
  print(f"results: {path}")
  return store


if __name__ == "__main__":
  main()
