"""Final validation loss as injected spikes grow: Adam, clipping baselines, SPAM and Stable-SPAM.

The training script's spike injection (``--spike-mode``, ``--spike-prob``, ``--spike-scale``), on the
setup of ``benchmarks/quality.py`` (same model, data, token budget, schedule), each optimizer at its
best learning rate from the quality grid (seed 0; read from ``benchmarks/results/quality_<model>.json``,
or ``--lr`` when that file lacks the row). Severity 0 is the clean run of the quality benchmark when
it is in that file (all its seeds), else it is run here.

Sweeps (``--modes``):

* ``grad_entries``: every gradient entry is multiplied by ``severity`` with probability ``p`` per step
  (default p = 1e-4, i.e. ~50 entries of the tiny model's 0.47M per step): sparse element-wise
  spikes, the kind SPAM's clip targets.
* ``grad``: with probability ``p`` per step (default 0.02, ~20 steps of 1000) the whole gradient is
  multiplied by ``severity`` (100 or 1000).
* ``input``: each sequence is corrupted with probability ``p`` (default 0.1, as the paper's
  time-series experiment corrupts 10% of inputs); a fraction ``severity`` of its tokens become random.

Usage::

  python benchmarks/spikes.py                       # grad_entries and input sweeps, 1 seed
  python benchmarks/spikes.py --modes grad --seeds 2
  python benchmarks/spikes.py --smoke
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import quality as q  # noqa: E402

SWEEPS = {
    "grad_entries": dict(prob=1e-4, severities=[10.0, 100.0, 1000.0]),
    "grad": dict(prob=0.02, severities=[100.0, 1000.0]),
    "input": dict(prob=0.1, severities=[0.25, 0.5, 1.0]),
}
DEFAULT_ROWS = "adam,adam_clip_norm,spam,stable_spam"


def clean_runs(quality_runs: list[dict], model: str, steps: int, row: str, lr: float) -> list[dict]:
  return [r for r in quality_runs if r["model"] == model and r["steps"] == steps and r["row"] == row
          and r["lr"] == lr and not r["overrides"] and not r.get("custom")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  q.runner_args(parser, steps=1000)
  parser.add_argument("--rows", default=DEFAULT_ROWS)
  parser.add_argument("--modes", default="grad_entries,input")
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--lr", type=float, default=3e-3,
                      help="LR for a row missing from the quality results")
  parser.add_argument("--quality-json", help="quality results, comma-separated when the quality "
                      "sweep ran in several processes (default: benchmarks/results/quality_<model>.json)")
  parser.add_argument("--also-json", default="",
                      help="spike results files (comma-separated) whose runs join the report, read "
                      "only: other rows of the same setting run by another process")
  parser.add_argument("--severities", default="",
                      help="override a sweep's severities: MODE=S/S/...,MODE=... (e.g. grad=100/1000)")
  parser.add_argument("--paired-against", default="",
                      help="also print each row's change minus this row's change, paired by seed")
  parser.add_argument("--figure-tag", default="",
                      help="appended to the figures' names, so that reports of other modes of the "
                      "same model do not overwrite them (e.g. _entries_inputs)")
  args = parser.parse_args(argv)
  sweeps = {m: dict(v) for m, v in SWEEPS.items()}
  for item in filter(None, args.severities.split(",")):
    mode, _, values = item.partition("=")
    if mode not in sweeps or not values:
      parser.error(f"--severities {item!r}: expected MODE=S/S/... with MODE in {', '.join(SWEEPS)}")
    sweeps[mode]["severities"] = [float(v) for v in values.split("/")]
  q.smoke_defaults(args)
  if args.smoke:
    args.seeds = 1
    if args.rows == DEFAULT_ROWS:
      args.rows = "spam"
    if args.modes == parser.get_default("modes"):
      args.modes = "input"
  rows = [r for r in args.rows.split(",") if r]
  modes = [m for m in args.modes.split(",") if m]
  for m in modes:
    if m not in SWEEPS:
      parser.error(f"unknown mode {m!r}; valid: {', '.join(SWEEPS)}")
  qpaths = [Path(p) for p in (args.quality_json or str(q.RESULTS / f"quality_{args.model}.json"))
            .split(",") if p]
  quality_runs = [] if args.smoke else [
      r for p in qpaths if p.exists() for r in json.loads(p.read_text())["runs"].values()]
  lrs, lr_source = {}, {}
  for row in rows:
    best = q.best_lr([r for r in quality_runs if r["model"] == args.model
                      and r["steps"] == args.steps], row)
    lrs[row] = best if best is not None else args.lr
    lr_source[row] = "quality grid" if best is not None else "--lr"
  path = Path(args.json or q.RESULTS / f"spikes_{args.model}.json")
  store = q.Store(path, {"machine": q.machine(), "common": q.common_overrides(args),
                         "batch_size": args.batch_size,
                         "seq_len": args.seq_len, "sweeps": sweeps, "lrs": lrs,
                         "lr_source": lr_source})

  def severities(mode):
    sev = sweeps[mode]["severities"]
    return sev[-1:] if args.smoke else sev

  if not args.report_only:
    for row in rows:  # clean runs missing from the quality results
      if not clean_runs(quality_runs, args.model, args.steps, row, lrs[row]):
        for seed in range(args.seeds):
          q.execute(store, q.RunSpec(args.model, row, lrs[row], seed, args.steps), args, "clean ")
    for mode in modes:
      for sev in severities(mode):
        for row in rows:
          for seed in range(args.seeds):
            over = dict(spike_mode=mode, spike_prob=sweeps[mode]["prob"], spike_scale=sev)
            q.execute(store, q.RunSpec(args.model, row, lrs[row], seed, args.steps, over), args,
                      f"{mode} ")

  runs = store.runs()
  for extra in filter(None, args.also_json.split(",")):
    runs += q.Store(Path(extra), {"common": q.common_overrides(args)}).runs()
  # (mode, row) -> {severity: {seed: loss}}; a diverged run counts as None. The clean column uses
  # the same seeds as the spiked runs (seeds 0 .. --seeds - 1), so each Δ is paired by seed.
  table, tabled = {}, []
  for row in rows:
    clean = clean_runs(quality_runs, args.model, args.steps, row, lrs[row]) or clean_runs(
        runs, args.model, args.steps, row, lrs[row])
    for mode in modes:
      d = table.setdefault((mode, row), {})
      d[0.0] = {r["seed"]: r["val_loss"] for r in clean if r["seed"] < args.seeds}
      for r in runs:
        o = r["overrides"]
        if r["row"] == row and o.get("spike_mode") == mode and r["lr"] == lrs[row] \
           and r["steps"] == args.steps and o.get("spike_prob") == sweeps[mode]["prob"] \
           and r["seed"] < args.seeds:
          d.setdefault(o["spike_scale"], {})[r["seed"]] = r["val_loss"]
          if o["spike_scale"] in severities(mode):
            tabled.append(r)
  print(f"# {args.model}, {args.steps} steps x {args.batch_size} x {args.seq_len}; LRs {lrs} "
        f"({lr_source})")
  for mode in modes:
    sev = [0.0] + severities(mode)
    print(f"\n{mode} (p = {sweeps[mode]['prob']:g}): final validation loss, mean ± std over "
          f"seeds 0..{args.seeds - 1} where run (in brackets: change vs the clean run of the same "
          f"seed, mean ± std over the n seeds)\n")
    print("| optimizer | LR | " + " | ".join("clean" if s == 0 else f"severity {s:g}" for s in sev)
          + " |")
    print("|---|---|" + "---|" * len(sev))
    for row in rows:
      d = table[(mode, row)]
      clean = d.get(0.0, {})
      cells = []
      for s in sev:
        vals = d.get(s, {})
        ok = [v for v in vals.values() if v is not None]
        cell = q.fmt_mean_std(ok, 3) if ok else "-"
        diffs = [v - clean[k] for k, v in vals.items()
                 if v is not None and clean.get(k) is not None]
        if s != 0 and diffs:  # paired by seed, with its n (severities may have different seeds)
          m, sd = q.mean_std(diffs)
          cell += f" ({m:+.3f} ± {sd:.3f}, n = {len(diffs)})" if len(diffs) > 1 else \
              f" ({m:+.3f}, n = 1)"
        if len(ok) < len(vals):
          cell += f" ({len(vals) - len(ok)} diverged)"
        cells.append(cell)
      print(f"| {row} | {q.fmt_lr(lrs[row])} | " + " | ".join(cells) + " |")
    if args.paired_against in rows:
      print_paired(table, mode, rows, sev[1:], args.paired_against)
    for row in rows:  # SPAM's diagnostic: how many gradient entries its clip caught
      counts = []
      for s in sev[1:]:
        mine = [r for r in runs if r["row"] == row and r["overrides"].get("spike_mode") == mode
                and r["overrides"].get("spike_scale") == s and r["lr"] == lrs[row]
                and r["seed"] == 0 and r["steps"] == args.steps and r["spikes_clipped"]]
        if mine:
          counts.append(f"severity {s:g}: {mine[0]['spikes_clipped']:,} clipped, "
                        f"{mine[0]['injected']:,} injected")
      if counts:
        unit = {"grad": "spiked steps", "grad_entries": "spiked entries",
                "input": "corrupted tokens"}[mode]
        print(f"\n{row} (seed 0): gradient entries clipped over the run, and {unit} injected "
              f"(clean run: see the quality results) -- " + "; ".join(counts))
  print("\n" + q.wall_summary(tabled))  # the spiked runs of these tables
  args._quality_runs = quality_runs
  if not args.no_plot and not args.smoke:
    for png in plot(runs, table, rows, modes, lrs, args, sweeps):
      print(f"wrote {png}")
  print(f"results: {path}")


def print_paired(table, mode, rows, sev, ref):
  """Each row's change vs its clean run minus ``ref``'s change, seed by seed (mean ± std, n)."""
  def change(row, s):
    d = table[(mode, row)]
    return {k: v - d[0.0][k] for k, v in d.get(s, {}).items()
            if v is not None and d[0.0].get(k) is not None}
  print(f"\n{mode}: change minus {ref}'s change, paired by seed\n")
  print("| optimizer | " + " | ".join(f"severity {s:g}" for s in sev) + " |")
  print("|---|" + "---|" * len(sev))
  for row in rows:
    cells = []
    for s in sev:
      mine, theirs = change(row, s), change(ref, s)
      diffs = [mine[k] - theirs[k] for k in mine if k in theirs]
      m, sd = q.mean_std(diffs)
      cells.append("-" if not diffs or row == ref else
                   f"{m:+.3f} ± {sd:.3f} (n = {len(diffs)})" if len(diffs) > 1 else
                   f"{m:+.3f} (n = 1)")
    print(f"| {row} | " + " | ".join(cells) + " |")


def plot(runs, table, rows, modes, lrs, args, sweeps) -> list[Path]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cmap = plt.get_cmap("tab10")
  out = []
  fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4), dpi=80, squeeze=False)
  for ax, mode in zip(axes[0], modes):
    sev = sweeps[mode]["severities"]
    xs = list(range(len(sev) + 1))
    for i, row in enumerate(rows):
      d = table[(mode, row)]
      vals = [[v for v in d.get(s, {}).values() if v is not None] for s in [0.0] + sev]
      means = [np.mean(v) if v else np.nan for v in vals]
      stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]  # over seeds
      ax.errorbar(np.asarray(xs) + 0.04 * (i - len(rows) / 2), means, yerr=stds, marker="o",
                  capsize=3, color=cmap(i), label=f"{row} ({q.fmt_lr(lrs[row])})")
    ax.set_xticks(xs, ["clean"] + [f"{s:g}" for s in sev])
    kind = "x gradient" if mode.startswith("grad") else "fraction of tokens"
    ax.set(xlabel=f"severity ({kind}), p = {sweeps[mode]['prob']:g}",
           ylabel="final val loss (mean ± std over seeds)",
           title=f"{args.model}: spikes injected ({mode})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  path = q.DOCS / f"spikes_severity_{args.model}{args.figure_tag}.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  out.append(path)

  # Training loss minus the first row's clean run (seed 0, same batches; the injected corruption is a
  # function of seed and step only, so every optimizer sees the same one), smoothed over 4 windows.
  quality_runs = getattr(args, "_quality_runs", [])
  base = rows[0]
  adam_clean = clean_runs(quality_runs, args.model, args.steps, base, lrs.get(base)) or \
      clean_runs(runs, args.model, args.steps, base, lrs.get(base))
  adam_clean = dict(next((r["train_curve"] for r in adam_clean if r["seed"] == 0), []))
  fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4), dpi=80, squeeze=False)
  k = 4
  for ax, mode in zip(axes[0], modes):
    sev = sweeps[mode]["severities"][-1]
    for i, row in enumerate(rows):
      mine = [r for r in runs if r["row"] == row and r["overrides"].get("spike_mode") == mode
              and r["overrides"].get("spike_scale") == sev and r["lr"] == lrs[row]
              and r["seed"] == 0 and r["steps"] == args.steps]
      if not mine or not adam_clean:
        continue
      c = [(s, l - adam_clean[s]) for s, l in mine[0]["train_curve"] if s in adam_clean]
      smooth = np.convolve([d for _, d in c], np.ones(k) / k, mode="valid")
      ax.plot([s for s, _ in c][k - 1:], smooth, color=cmap(i), lw=1.2, label=row)
    ax.axhline(0, color="k", lw=0.8)
    title = f"{mode}, severity {sev:g}, p = {sweeps[mode]['prob']:g} (seed 0)"
    if mode == "input":  # the training loss includes the corrupted tokens: far above clean
      title += "\n(train loss includes the corrupted tokens)"
    elif mode == "grad_entries":
      ax.set_ylim(-0.15, 0.4)
    ax.set(xlabel="step", ylabel=f"train loss - clean {base}'s ({k}-window mean)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  path = q.DOCS / f"spikes_curves_{args.model}{args.figure_tag}.png"
  fig.savefig(path)
  plt.close(fig)
  out.append(path)
  zoom = plot_around_spike(runs, rows, lrs, args, sweeps, plt, cmap)
  return out + ([zoom] if zoom else [])


def plot_around_spike(runs, rows, lrs, args, sweeps, plt, cmap, before=5, after=45):
  """Per-step training loss around the first whole-gradient spike after the warmup (seed 0, top
  severity; every row sees it at the same step). Needs runs logged every step (--log-every 1)."""
  if "grad" not in sweeps:
    return None
  sev = sweeps["grad"]["severities"][-1]
  mine = {r["row"]: r for r in runs if r["overrides"].get("spike_mode") == "grad"
          and r["overrides"].get("spike_scale") == sev and r["seed"] == 0
          and r["steps"] == args.steps and r["row"] in rows and r["lr"] == lrs[r["row"]]}
  first = [s for r in mine.values() for s in r.get("injected_steps") or [] if s > before + 50]
  if not first:
    return None
  spike = min(first)
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=80)
  for i, row in enumerate(rows):
    curve = dict(mine[row]["train_curve"]) if row in mine else {}
    xs = [t for t in range(spike - before, spike + after + 1) if t in curve]
    if len(xs) > before + after // 2:  # per-step curve
      ax.plot(xs, [curve[t] for t in xs], color=cmap(i), lw=1.2, label=row)
  ax.axvline(spike, color="k", lw=0.8, ls=":")
  ax.set(xlabel="step", ylabel="train loss (per step)", yscale="log",
         title=f"{args.model}: whole gradient x{sev:g} at step {spike} (seed 0)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = q.DOCS / f"spikes_zoom_{args.model}{args.figure_tag}.png"
  fig.savefig(path)
  plt.close(fig)
  return path


if __name__ == "__main__":
  main()
