"""SPAM ablations, small: reset interval, spike threshold, reset warmup, clip vs nullify, bias correction.

The setup of ``benchmarks/quality.py`` (same model, data, token budget, schedule), SPAM at its best
learning rate from the quality grid (``--lr`` when the quality results lack it). One setting changes
at a time from the defaults (ΔT = 500, θ = 5000, N = 150, clipping, global bias correction):

* reset interval ΔT: 100 (N = 50), 250, 500, and no reset within the run (ΔT = 10^6);
* threshold θ: 0 (no clipping), 50, 500, 5000, 50000;
* reset warmup N: 0, 50, 150, 300;
* clip vs nullify: SPAM as the unfused chain of its pieces with the spike rule ``clip`` (the
  library's ``spike_clip``: must match the fused ``spam`` row) or ``nullify`` (spiked entries set
  to 0, implemented in ``benchmarks/quality.py``; the library has no nullify option);
* both off (θ = 0, no reset): Adam as SPAM computes it (HF-style ε = 1e-6 added to the
  un-corrected ``sqrt(v)``), which separates SPAM's mechanisms from that detail of its Adam;
* ``restart_bias_correction`` on (``--restart-bias-correction``) vs off (the authors' code).

Usage::

  python benchmarks/ablations.py                 # 2 seeds
  python benchmarks/ablations.py --smoke
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quality as q  # noqa: E402

NO_RESET = 1_000_000

# group -> [(label, Config overrides, custom optimizer or None)]; the first entry of every group is
# the default SPAM run (shared).
ABLATIONS = {
    "reset interval ΔT": [
        ("ΔT=500 (default)", {}, None),
        ("ΔT=100, N=50", dict(reset_interval=100, reset_warmup=50), None),
        ("ΔT=250", dict(reset_interval=250), None),
        ("no reset", dict(reset_interval=NO_RESET), None),
    ],
    "threshold θ": [
        ("θ=5000 (default)", {}, None),
        ("θ=0 (no clip)", dict(threshold=0.0), None),
        ("θ=50", dict(threshold=50.0), None),
        ("θ=500", dict(threshold=500.0), None),
        ("θ=50000", dict(threshold=50000.0), None),
    ],
    "reset warmup N": [
        ("N=150 (default)", {}, None),
        ("N=0", dict(reset_warmup=0), None),
        ("N=50", dict(reset_warmup=50), None),
        ("N=300", dict(reset_warmup=300), None),
    ],
    "spike rule": [
        ("clip (fused spam, default)", {}, None),
        ("clip (unfused chain)", {}, "spam_unfused_clip"),
        ("nullify (unfused chain)", {}, "spam_nullify"),
    ],
    "both mechanisms off": [
        ("SPAM (default)", {}, None),
        ("θ=0 and no reset (= Adam with SPAM's ε)", dict(threshold=0.0, reset_interval=NO_RESET),
         None),
    ],
    "bias correction after reset": [
        ("global k (authors' code, default)", {}, None),
        ("restarted at each reset", dict(restart_bias_correction=True), None),
    ],
}


def spec_for(args, lr, seed, overrides, custom):
  row = "spam" if custom is None else custom
  return q.RunSpec(args.model, row, lr, seed, args.steps, dict(overrides), custom)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  q.runner_args(parser, steps=1000)
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--groups", default=",".join(ABLATIONS))
  parser.add_argument("--lr", type=float, default=3e-3,
                      help="SPAM LR when the quality results lack it")
  parser.add_argument("--quality-json", help="default: benchmarks/results/quality_<model>.json")
  args = parser.parse_args(argv)
  q.smoke_defaults(args)
  groups = [g for g in args.groups.split(",") if g]
  for g in groups:
    if g not in ABLATIONS:
      parser.error(f"unknown group {g!r}; valid: {', '.join(ABLATIONS)}")
  if args.smoke:
    args.seeds = 1
    groups = ["spike rule", "bias correction after reset"]
  qpath = Path(args.quality_json or q.RESULTS / f"quality_{args.model}.json")
  quality_runs = [] if args.smoke or not qpath.exists() else list(
      json.loads(qpath.read_text())["runs"].values())
  best = q.best_lr([r for r in quality_runs if r["model"] == args.model
                    and r["steps"] == args.steps], "spam")
  lr = best if best is not None else args.lr
  path = Path(args.json or q.RESULTS / f"ablations_{args.model}.json")
  store = q.Store(path, {"machine": q.machine(), "common": q.common_overrides(args),
                         "batch_size": args.batch_size,
                         "seq_len": args.seq_len, "lr": lr,
                         "lr_source": "quality grid" if best is not None else "--lr"})

  def lookup(seed, overrides, custom):
    spec = spec_for(args, lr, seed, overrides, custom)
    rec = store.get(spec)
    if rec is None and not overrides and custom is None:  # the default: maybe in the quality file
      rec = next((r for r in quality_runs if r["key"] == spec.key()), None)
    return spec, rec

  if not args.report_only:
    for seed in range(args.seeds):
      for g in groups:
        entries = ABLATIONS[g][1:2] if args.smoke else ABLATIONS[g]
        for _label, overrides, custom in entries:
          spec, rec = lookup(seed, overrides, custom)
          if rec is None:
            q.execute(store, spec, args, f"{g}: ")

  print(f"# {args.model}, {args.steps} steps x {args.batch_size} x {args.seq_len}; SPAM lr "
        f"{q.fmt_lr(lr)}; final validation loss, mean ± std over seeds (n); Δ = vs default, "
        "paired by seed")
  for g in groups:
    print(f"\n{g}\n")
    print("| setting | n | val loss | Δ vs default | val ppl | entries clipped/nullified |")
    print("|---|---|---|---|---|---|")
    base = {}
    for seed in range(args.seeds):
      _, rec = lookup(seed, {}, None)
      if rec and rec["val_loss"] is not None:
        base[seed] = rec["val_loss"]
    for label, overrides, custom in ABLATIONS[g]:
      recs = [r for r in (lookup(s, overrides, custom)[1] for s in range(args.seeds)) if r]
      ok = [r for r in recs if r["val_loss"] is not None]
      diffs = [r["val_loss"] - base[r["seed"]] for r in ok if r["seed"] in base]
      clipped = [r["spikes_clipped"] for r in ok]
      div = f" ({len(recs) - len(ok)} diverged)" if len(ok) < len(recs) else ""
      clip_txt = f"{sum(clipped) / len(clipped):,.0f}" if clipped else "-"
      print(f"| {label} | {len(recs)} | {q.fmt_mean_std([r['val_loss'] for r in ok])}{div} | "
            f"{q.fmt_mean_std(diffs) if diffs and (overrides or custom) else '-'} | "
            f"{q.fmt_mean_std([r['val_ppl'] for r in ok], 3)} | {clip_txt} |")
    if g == "both mechanisms off":  # the reference: optax.adam runs of the quality grid, same LR
      adam = [r for r in quality_runs if r["row"] == "adam" and r["lr"] == lr and not r["overrides"]
              and r["steps"] == args.steps and r["seed"] < args.seeds and r["val_loss"] is not None]
      if adam:
        diffs = [r["val_loss"] - base[r["seed"]] for r in adam if r["seed"] in base]
        print(f"| optax.adam (ε=1e-8 on the corrected √v; quality runs) | {len(adam)} | "
              f"{q.fmt_mean_std([r['val_loss'] for r in adam])} | "
              f"{q.fmt_mean_std(diffs) if diffs else '-'} | "
              f"{q.fmt_mean_std([r['val_ppl'] for r in adam], 3)} | - |")
  print(f"results: {path}")


if __name__ == "__main__":
  main()
