#!/usr/bin/env bash
# The GPU check: what SPAM costs and does on one accelerator, in under 8 minutes.
#
#   benchmarks/device_check.sh [--smoke] [OUT_DIR]
#
# Stages, each under its own time limit inside an overall 470 s budget (a stage that fails or runs
# out of time is recorded in summary.md and the next one still runs):
#   1. environment: accelerator, driver, versions, JAX devices                  -> env.txt
#   2. optimizer update alone on 60m-shaped parameters: optax.adamw vs SPAM      -> update.md
#   3. train step, 60m and 130m, bf16, vocab 32000, batch 64 x 256: adamw, spam, spam d=0.25,
#      stable_spam, with tokens/s and MFU                              -> train_step.md/.json
#   4. 60m SPAM vs AdamW, bf16, the embedded Shakespeare corpus (byte level), each about 60 s of
#      training (steps sized from stage 3's step time)                          -> run_*.jsonl
# All output lands in OUT_DIR (default: $OUT when set, else ./device_check_out) as at most 8 files
# and no subfolders, so the device tool brings it all back; summary.md has the figures.
#
# On the machine nothing is downloaded: its python3 already has jax with the CUDA plugin, flax,
# optax, orbax, chex, tqdm, matplotlib (and safetensors). Anything else travels as wheels in .whl/
# (see the device tool's README); they are installed to /tmp/site when present.
#
# --smoke: the same stages on CPU with tiny shapes and a few steps (tests/test_device_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
OUTDIR="${1:-${OUT:-device_check_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
LOG="$OUTDIR/log.txt"
SUMMARY="$OUTDIR/summary.md"
WORK="$(mktemp -d /tmp/spam-device-check.XXXXXX)"  # checkpoints stay out of OUTDIR
BUDGET=470
: >"$LOG"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 &&
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR="$WORK/jax-cache"

if [[ $SMOKE == 1 ]]; then
  export JAX_PLATFORMS=cpu
  UPDATE_ARGS=(--small --repeats 1)
  BENCH_ARGS=(--models tiny --vocab 256 --batch-size 2 --seq-len 16 --steps 1 --repeats 1
              --warmup 1 --peak-flops 1e12)
  VARIANTS=adamw,stable_spam  # the plumbing, not the figures: two compiles instead of four
  MODEL=tiny
  RUN_ARGS=(--batch-size 8 --seq-len 16 --eval-batches 1 --peak-flops 1e12)
  RUN_SECONDS=2; MIN_STEPS=2; MAX_STEPS=2
  LIMITS=(env=60 update=120 bench=240 run=120)
else
  UPDATE_ARGS=(--repeats 20)
  BENCH_ARGS=(--models 60m,130m --vocab 32000 --batch-size 64 --seq-len 256 --steps 10
              --repeats 5 --warmup 2)
  VARIANTS=adamw,spam,spam_d0.25,stable_spam
  MODEL=60m
  RUN_ARGS=(--batch-size 64 --seq-len 256 --eval-batches 16)
  RUN_SECONDS=60; MIN_STEPS=100; MAX_STEPS=20000
  LIMITS=(env=30 update=60 bench=180 run=100)
fi
limit() { local kv; for kv in "${LIMITS[@]}"; do [[ ${kv%%=*} == "$1" ]] && echo "${kv#*=}"; done; }

echo "# device check $(date -u +%FT%TZ)$([[ $SMOKE == 1 ]] && echo ' (smoke, CPU)')" >"$SUMMARY"
echo >>"$SUMMARY"

# stage NAME LIMIT_NAME OUTFILE CMD...: runs CMD under min(its limit, what is left of the budget).
stage() {
  local name=$1 lim; lim=$(limit "$2"); local out=$3; shift 3
  local left=$((BUDGET - SECONDS))
  ((lim > left)) && lim=$left
  if ((lim < 10)); then
    echo "- $name: skipped (time budget spent)" >>"$SUMMARY"; return 1
  fi
  echo "== $name (limit ${lim}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout -k 10 "$lim" "$@" >"$out" 2>>"$LOG"
  local rc=$?
  cat "$out"
  local how="ok"
  ((rc == 124 || rc == 137)) && how="TIMED OUT after ${lim}s"
  ((rc != 0 && rc != 124 && rc != 137)) && how="FAILED (exit $rc, see log.txt)"
  echo "- $name: $how in $((SECONDS - t0)) s" >>"$SUMMARY"
  return $rc
}

stage environment env "$OUTDIR/env.txt" bash -c '
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$0" -c "
import jax, flax, optax, orbax.checkpoint as ocp, platform
print(\"python\", platform.python_version(), \"jax\", jax.__version__, \"flax\", flax.__version__,
      \"optax\", optax.__version__, \"orbax\", ocp.__version__)
print(\"devices:\", jax.devices())
from train import throughput
d = jax.devices()[0]
print(\"device_kind:\", getattr(d, \"device_kind\", \"?\"), \"| peak bf16 FLOP/s in the table:\",
      throughput.device_peak_flops(device=d))
"' "$PY"

stage "optimizer update (60m shapes)" update "$OUTDIR/update.md" \
  "$PY" -m benchmarks.optimizer_update "${UPDATE_ARGS[@]}"

stage "train step (bf16)" bench "$OUTDIR/train_step.md" \
  "$PY" benchmarks/train_step.py "${BENCH_ARGS[@]}" --dtype bf16 \
  --variants "$VARIANTS" --json "$OUTDIR/train_step.json"

# Steps for about RUN_SECONDS of training each, from the slower of SPAM's and AdamW's step time.
STEPS=$("$PY" - "$OUTDIR/train_step.json" "$RUN_SECONDS" "$MIN_STEPS" "$MAX_STEPS" <<'EOF' 2>>"$LOG"
import json, sys
path, seconds, lo, hi = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
try:
  rows = json.load(open(path))["rows"]
  ms = max(r["step_ms"] for r in rows
           if r["variant"] in ("adamw", "spam") and r["model"] in ("60m", "tiny"))
  steps = int(seconds * 1000 / (1.3 * ms))  # 1.3: the loop's data feeding and metrics
except Exception:
  steps = 500
print(min(hi, max(lo, steps)))
EOF
)
echo "$MODEL runs: $STEPS steps each" | tee -a "$LOG"
EVERY=$(((STEPS + 3) / 4))
for OPT in spam adamw; do
  stage "$MODEL $OPT run, $STEPS steps" run "$WORK/$OPT.out" \
    "$PY" -m train --model "$MODEL" "${RUN_ARGS[@]}" --optimizer "$OPT" --dtype bf16 \
    --steps "$STEPS" \
    --eval-every "$EVERY" --log-every 10 --checkpoint-every "$STEPS" --keep-checkpoints 1 \
    --no-progress --no-plot --workdir "$WORK/run_$OPT"
  cp "$WORK/run_$OPT/metrics.jsonl" "$OUTDIR/run_$OPT.jsonl" 2>/dev/null
done

# The figures, in one table per stage.
"$PY" - "$OUTDIR" "$MODEL" >>"$SUMMARY" 2>>"$LOG" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print()
env = out / "env.txt"
if env.exists():
  print("## Environment\n\n```\n" + env.read_text().strip() + "\n```\n")
bench = out / "train_step.md"
if bench.exists():
  print("## Train step (bf16)\n\n" + bench.read_text().strip() + "\n")
update = out / "update.md"
if update.exists():
  print("## Optimizer update alone\n\n" + update.read_text().strip() + "\n")
print(f"## {sys.argv[2]} SPAM vs AdamW (bf16, Shakespeare bytes)\n")
print("| optimizer | steps | final train loss | final val loss | tokens/s | MFU |")
print("|---|---|---|---|---|---|")
for opt in ("spam", "adamw"):
  path = out / f"run_{opt}.jsonl"
  if not path.exists():
    print(f"| {opt} | (no metrics) | | | | |")
    continue
  recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  train = [r for r in recs if "loss" in r]
  val = [r for r in recs if "val_loss" in r]
  rates = [r for r in train if "tokens_per_s" in r][1:] or [r for r in train if "tokens_per_s" in r]
  tps = sum(r["tokens_per_s"] for r in rates) / max(len(rates), 1)  # first window holds the compile
  mfus = [r["mfu"] for r in rates if "mfu" in r]
  mfu = f"{sum(mfus) / len(mfus):.1%}" if mfus else "n/a"
  print(f"| {opt} | {train[-1]['step'] if train else 0} | "
        f"{train[-1]['loss'] if train else float('nan'):.4f} | "
        f"{val[-1]['val_loss'] if val else float('nan'):.4f} | {tps:,.0f} | {mfu} |")
EOF
echo "- total: $SECONDS s" >>"$SUMMARY"
rm -rf "$WORK"
cat "$SUMMARY"
