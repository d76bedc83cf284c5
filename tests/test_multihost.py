"""Multi-host training, on one machine: 2 processes x 2 CPU devices under jax.distributed.

The processes find each other through a coordinator on localhost (gloo collectives on CPU), form a
4-device mesh data=2 x fsdp=2, train past a checkpoint, stop, and resume with 2 processes. Step for
step this must equal one process driving 4 devices. Process 0 alone writes metrics, the plot and
the export; both write the checkpoint's shards.
"""

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import _jax_cache
from models import hf
from train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tiny", "--mesh", "data=2,fsdp=2", "--seq-len", "16", "--batch-size", "8",
        "--eval-batches", "2", "--no-progress", "--log-every", "1", "--eval-every", "5",
        "--checkpoint-every", "2", "--schedule-steps", "5", "--warmup-steps", "1",
        "--clip-delay", "1", "--sample-tokens", "8"]
TIMEOUT = 300


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  return _jax_cache.subprocess_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run_processes(args: list[str], n: int = 2) -> list[subprocess.CompletedProcess]:
  """`python -m train ARGS` as processes 0..n-1 of one job; waits for all, kills all on failure."""
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "train", *args, "--coordinator-address", address,
       "--num-processes", str(n), "--process-id", str(i)],
      cwd=REPO, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(n)]
  try:
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  results = [subprocess.CompletedProcess(p.args, p.returncode, o, e)
             for p, (o, e) in zip(procs, outs)]
  for i, r in enumerate(results):
    assert r.returncode == 0, f"process {i}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
  return results


def test_two_processes_resume_and_match_one_process_with_four_devices(tmp_path):
  ref = subprocess.run([sys.executable, "-m", "train", *ARGS, "--steps", "5",
                        "--workdir", str(tmp_path / "ref"), "--no-plot",
                        "--export-hf", str(tmp_path / "ref_hf")],
                       cwd=REPO, env=env(4), capture_output=True, text=True, timeout=TIMEOUT)
  assert ref.returncode == 0, ref.stderr[-4000:]

  work = tmp_path / "multi"
  first = run_processes(ARGS + ["--steps", "3", "--workdir", str(work)])
  assert ("mesh {'data': 2, 'fsdp': 2, 'tensor': 1} on 4 cpu device(s), 2 process(es)"
          in first[0].stdout)
  assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
  second = run_processes(ARGS + ["--steps", "5", "--workdir", str(work),
                                 "--export-hf", str(tmp_path / "multi_hf")])
  assert "resumed from" in second[0].stdout and "(step 3)" in second[0].stdout
  # Process 0 reports; process 1 prints nothing and writes no metrics of its own.
  assert "final validation (step 5" in second[0].stdout
  assert "final validation" not in second[1].stdout

  records = read_metrics(work / "metrics.jsonl")
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5]  # once each: only process 0 writes
  expected = read_metrics(tmp_path / "ref" / "metrics.jsonl")
  np.testing.assert_allclose([r["loss"] for r in train],
                             [r["loss"] for r in expected if "loss" in r], rtol=1e-5)
  # Validation at the end of each call (steps 3 and 5); the uninterrupted run's at step 5.
  assert [r["step"] for r in records if "val_loss" in r] == [3, 5]
  val = [r for r in records if "val_loss" in r][-1]
  (ref_val,) = [r for r in expected if "val_loss" in r]
  np.testing.assert_allclose(val["val_loss"], ref_val["val_loss"], rtol=1e-6)
  assert (work / "loss_curve.png").exists()

  # The export gathers the sharded weights from both processes.
  ours, theirs = hf.read_tensors(tmp_path / "multi_hf"), hf.read_tensors(tmp_path / "ref_hf")
  assert ours.keys() == theirs.keys()
  for name in ours:
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-7, err_msg=name)
