#!/usr/bin/env bash
# The runs behind benchmarks/QUALITY.md, in the order they ran (about 70 minutes on 2 CPU cores).
# Each script appends to its JSON under benchmarks/results/ after every run and skips finished
# runs, so the suite can be interrupted and restarted.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/quality.py                    # tiny: 10 rows, LR grid (seed 0), best LR x 3 seeds
python benchmarks/spikes.py                     # tiny: grad_entries and input sweeps, seed 0
python benchmarks/ablations.py --seeds 1        # tiny: SPAM ablations, seed 0
# 9m (4 layers): fewer rows, a 2-point grid {best tiny LR / 3, best tiny LR} (+ one edge extension).
GRID=$(python - <<'PY'
import json
runs = json.load(open("benchmarks/results/quality_tiny.json"))["runs"].values()
out = []
for row in ("adam", "spam", "stable_spam"):
  cand = [r for r in runs if r["row"] == row and r["seed"] == 0 and not r["overrides"]
          and r["val_loss"] is not None and r["steps"] == 1000]
  best = min(cand, key=lambda r: r["val_loss"])["lr"]
  out.append(f"{row}={best / 3:.3g}/{best:.3g}")
print(",".join(out))
PY
)
python benchmarks/quality.py --model 9m --rows adam,spam,stable_spam --seeds 2 --grid "$GRID"
python benchmarks/spikes.py --modes grad        # tiny: whole-gradient spikes, seed 0
# tiny: a second seed for the clip-vs-nullify and bias-correction ablations
python benchmarks/ablations.py --seeds 2 --groups "spike rule,bias correction after reset"
python benchmarks/ablations.py --seeds 2 --groups "both mechanisms off"
