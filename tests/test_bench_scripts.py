"""Each speed/memory/diagnostics benchmark script runs end to end on small shapes (a smoke test).

The figures themselves are claimed in benchmarks/RESULTS.md, not asserted here.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [
    ["-m", "benchmarks.optimizer_update", "--small", "--repeats", "1"],
    ["-m", "benchmarks.spike_monitor_overhead", "--small", "--repeats", "1"],
    ["-m", "benchmarks.sparse_parts", "--small", "--repeats", "1"],
    ["benchmarks/train_step.py", "--models", "tiny", "--variants", "adamw,spam", "--steps", "1",
     "--repeats", "1", "--warmup", "1", "--batch-size", "2", "--seq-len", "16",
     "--peak-flops", "1e12"],
    ["-m", "benchmarks.gss_analysis", "--steps", "3", "--batch-size", "2", "--seq-len", "16"],
], ids=["optimizer_update", "spike_monitor_overhead", "sparse_parts", "train_step", "gss_analysis"])
def test_benchmark_script_runs(args, tmp_path):
  if "gss_analysis" in args[1]:
    args = args + ["--out", str(tmp_path)]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "|" in out.stdout or (tmp_path / "results.json").exists()
  if "train_step" in args[0]:  # tokens/s and MFU columns, MFU from --peak-flops
    assert "| tokens/s | MFU |" in out.stdout and "| n/a |" not in out.stdout
