"""benchmarks/device_check.sh --smoke: every stage of the GPU check runs on CPU and reports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import _jax_cache

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~100 s of CPU: six processes, each compiling; its stages' scripts have own tests
def test_device_check_smoke_writes_every_stage_into_one_folder(tmp_path):
  out = tmp_path / "out"
  env = _jax_cache.subprocess_env(PYTHON=sys.executable)
  env.pop("OUT", None)
  proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--smoke", str(out)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  files = sorted(p.name for p in out.iterdir())
  assert files == ["env.txt", "log.txt", "run_adamw.jsonl", "run_spam.jsonl", "summary.md",
                   "train_step.json", "train_step.md", "update.md"]
  assert len(files) <= 8 and all(p.is_file() for p in out.iterdir())  # what the device tool returns
  summary = (out / "summary.md").read_text()
  assert "FAILED" not in summary and "TIMED OUT" not in summary and "skipped" not in summary
  rows = json.loads((out / "train_step.json").read_text())["rows"]
  assert {r["variant"] for r in rows} == {"adamw", "stable_spam"}
  assert all(r["mfu"] is not None and r["tokens_per_s"] > 0 for r in rows)  # --peak-flops given
  assert "| spam | 2 |" in summary and "| adamw | 2 |" in summary and "MFU" in summary
