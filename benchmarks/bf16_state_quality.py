"""bf16 optimizer state: SPAM with float32 moments vs bfloat16 moments stored with stochastic or
round-to-nearest rounding, pure-bf16 parameters (issue 9, part 2, "Quality").

In bf16, ``0.999 * v`` rounds back to ``v`` (docs/SPEC.md §4): with round-to-nearest storage
(``--state-rounding nearest``, the authors' pure-bf16 behaviour) Adam's second moment stops decaying;
with stochastic rounding (the default of ``--opt-state-dtype bfloat16``) the expected stored value
follows the float32 recursion. This script measures what that does to the final validation loss.

The runs are benchmarks/quality.py's (``run_one``: the training script's data, optimizers,
schedule and jitted steps, in-process, no checkpoints), all with ``--dtype pure_bf16`` (bf16
parameters and compute) and SPAM at tiny's best LR (1e-3, benchmarks/QUALITY.md section 1):

- ``fp32_state``: ``--opt-state-dtype float32``;
- ``bf16_stochastic``: ``--opt-state-dtype bfloat16 --state-rounding stochastic``;
- ``bf16_nearest``: ``--opt-state-dtype bfloat16 --state-rounding nearest``.

Reported: final validation loss per row (mean +- std over the seeds) and its difference to the
float32-state run of the same seed (same initialisation, same batches).

Usage::

  python benchmarks/bf16_state_quality.py                 # tiny, 1000 steps, 3 seeds per row
  python benchmarks/bf16_state_quality.py --smoke         # a few steps, for the tests
  python benchmarks/bf16_state_quality.py --report-only   # the table from the JSON
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import quality as q  # noqa: E402

BASE = dict(optimizer="spam", dtype="pure_bf16")
# Row -> Config overrides.
ROWS = {
    "fp32_state": dict(BASE, opt_state_dtype="float32"),
    "bf16_stochastic": dict(BASE, opt_state_dtype="bfloat16", state_rounding="stochastic"),
    "bf16_nearest": dict(BASE, opt_state_dtype="bfloat16", state_rounding="nearest"),
}
REFERENCE = "fp32_state"
LR = 1e-3  # SPAM's best LR on tiny (fp32, benchmarks/QUALITY.md section 1)


def spec(args, row: str, seed: int) -> q.RunSpec:
  return q.RunSpec(args.model, row, args.lr, seed, args.steps, dict(ROWS[row]))


def rows_runs(store: q.Store, args, row: str) -> list[dict]:
  recs = [store.get(spec(args, row, s)) for s in range(args.seeds)]
  return [r for r in recs if r is not None]


def signed(values: list[float]) -> str:
  m, s = q.mean_std(values)
  return f"{m:+.4f} ± {s:.4f}" if len(values) > 1 else f"{m:+.4f}"


def table(store: q.Store, args) -> str:
  ref = {r["seed"]: r["val_loss"] for r in rows_runs(store, args, REFERENCE)
         if r["val_loss"] is not None}
  out = ["| parameters | optimizer state | rounding | seeds | val loss per seed | val loss | "
         f"Δ vs {REFERENCE} (paired by seed) | diverged | optimizer state bytes | step ms |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for row in args.rows:
    runs = sorted(rows_runs(store, args, row), key=lambda r: r["seed"])
    if not runs:
      continue
    ok = [r for r in runs if r["val_loss"] is not None]
    per_seed = ", ".join(f"{r['seed']}: " + ("div." if r["val_loss"] is None else
                                            f"{r['val_loss']:.4f}") for r in runs)
    diffs = [r["val_loss"] - ref[r["seed"]] for r in ok if r["seed"] in ref]
    diff_txt = "-" if row == REFERENCE or not diffs else signed(diffs)
    ov = ROWS[row]
    rounding = ov.get("state_rounding", "-") if ov["opt_state_dtype"] != "float32" else "-"
    steps_ms = [r["step_ms"] for r in runs if r["step_ms"]]
    out.append(f"| bf16 | {ov['opt_state_dtype']} | {rounding} | {len(ok)} | {per_seed} | "
               f"{q.fmt_mean_std([r['val_loss'] for r in ok])} | {diff_txt} | "
               f"{sum(r['val_loss'] is None for r in runs)} / {len(runs)} | "
               f"{q.fmt_bytes(runs[0]['state_bytes'])} | "
               f"{f'{min(steps_ms):.1f}' if steps_ms else '-'} |")
  return "\n".join(out)


def main(argv=None) -> q.Store:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  q.runner_args(parser, steps=1000)
  parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {', '.join(ROWS)}")
  parser.add_argument("--seeds", type=int, default=3, help="seeds per row (0..N-1)")
  parser.add_argument("--lr", type=float, default=LR, help="peak learning rate")
  args = parser.parse_args(argv)
  q.smoke_defaults(args)
  if args.smoke:
    args.seeds = 1
  args.rows = [r for r in args.rows.split(",") if r]
  unknown = [r for r in args.rows if r not in ROWS]
  if unknown:
    parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
  path = Path(args.json or q.RESULTS / f"bf16_state_quality_{args.model}.json")
  store = q.Store(path, {"machine": q.machine(), "common": q.common_overrides(args),
                         "batch_size": args.batch_size,
                         "seq_len": args.seq_len, "eval_batches": args.eval_batches})
  if not args.report_only:
    for seed in range(args.seeds):  # seed-major: an interrupted run leaves complete pairs
      for row in args.rows:
        q.execute(store, spec(args, row, seed), args, "")
  print(f"# {args.model}, SPAM, LR {q.fmt_lr(args.lr)}, --dtype pure_bf16, {args.steps} steps x "
        f"{args.batch_size} x {args.seq_len} tokens = "
        f"{args.steps * args.batch_size * args.seq_len:,} tokens")
  print(table(store, args))
  print(f"results: {path}")
  return store


if __name__ == "__main__":
  main()
