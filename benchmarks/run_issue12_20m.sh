#!/usr/bin/env bash
# Issue 12's protocol at 20m (benchmarks/QUALITY.md sections 9 and 10): two processes, one pinned
# to each core, each with its own results files. Every script appends to its JSON after every run
# and skips finished runs, so this can be stopped at any point and started again; the order below
# is the order of priority (what a shorter session gets done first). About 11 minutes a run on the
# 2-core host of 2026-12-06 (7 on the host of 2026-12-02); the whole of it is ~14 hours there.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON="--model 20m --seq-len 256 --tokenizer bpe --bpe-vocab 4096 --reset-interval 150
        --reset-warmup 45 --steps 500 --no-plot"
R=benchmarks/results
QJ=$R/quality_20m_bpe.json,$R/quality_20m_bpe_b.json

# $1 core, $2 quality rows, $3 quality file, $4 spike rows, $5 spike file, $6 controls ROW=LR,...
# (seed 0 at one LR: sparse SPAM's best for the _proj_x0.25 controls, SPAM's for spam_restart_bc).
half() {
  local run="taskset -c $1 python -u benchmarks"
  $run/quality.py $COMMON --rows "$2" --json "$3"           # LR grid (seed 0) + edge, 3 seeds
  for control in ${6//,/ }; do
    $run/quality.py $COMMON --rows "${control%%=*}" --grid "$control" --no-extend-edges --seeds 1 \
        --json "$3"
  done
  for seeds in 1 2 3; do  # seed-major: every row and sweep gets seed 0 before any gets seed 1
    for sweep in grad=1000 grad=100 grad_entries=100/1000 input=0.5/1; do
      $run/spikes.py $COMMON --log-every 1 --modes "${sweep%%=*}" --severities "$sweep" \
          --rows "$4" --seeds $seeds --quality-json $QJ --json "$5"
    done
  done
}
half 1 adamw,spam,adamw_clip_norm,adamw_zclip,adamw_skip,spam_clip_norm $R/quality_20m_bpe.json \
    adamw,adamw_clip_norm,adamw_zclip,adamw_skip $R/spikes_20m_bpe.json spam_proj_x0.25=3e-3 &
half 0 stable_spam,spam_d0.25 $R/quality_20m_bpe_b.json \
    spam,spam_clip_norm,stable_spam,spam_d0.25 $R/spikes_20m_bpe_b.json adamw_proj_x0.25=3e-3,spam_restart_bc=1e-3 &
wait

# The tables of QUALITY.md sections 9 and 10 (and the figures: drop --no-plot).
ALL=adamw,spam,adamw_clip_norm,adamw_zclip,adamw_skip,spam_clip_norm,stable_spam,spam_d0.25
python benchmarks/quality.py $COMMON --report-only --rows $ALL,spam_proj_x0.25,adamw_proj_x0.25,spam_restart_bc \
    --json $R/quality_20m_bpe.json --also-json $R/quality_20m_bpe_b.json
SPIKES="python benchmarks/spikes.py $COMMON --report-only --rows $ALL --seeds 3 --quality-json $QJ
        --json $R/spikes_20m_bpe.json --also-json $R/spikes_20m_bpe_b.json"
$SPIKES --modes grad --severities grad=100/1000                                    # section 10
$SPIKES --modes grad_entries,input --severities grad_entries=100/1000,input=0.5/1 \
    --figure-tag _entries_inputs                                                    # section 10b
