"""Sharded jit and pmap on 8 CPU devices, in a subprocess (the device count is fixed at JAX start)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_on_8_devices(script: str) -> str:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice" / script)], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout


def test_spam_sharded_and_pmap_match_single_device():
  assert run_on_8_devices("spam_sharded.py").strip().endswith("OK")


def test_bf16_stochastic_rounding_sharded_matches_single_device():
  assert run_on_8_devices("rounding_sharded.py").strip().endswith("OK")
