"""Sharded jit and pmap on 8 CPU devices, in a subprocess (the device count is fixed at JAX start)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_on_8_devices(script: str, *args: str) -> str:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice" / script), *args], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout


def test_spam_sharded_and_pmap_match_single_device():
  assert run_on_8_devices("spam_sharded.py").strip().endswith("OK")


def test_bf16_stochastic_rounding_sharded_matches_single_device():
  assert run_on_8_devices("rounding_sharded.py").strip().endswith("OK")


def test_sparse_spam_on_a_mesh_is_shard_local():
  """State sharded like its parameters; no large collective; d x the state; mesh == one device."""
  assert run_on_8_devices("sparse_sharded.py").strip().endswith("OK")


@pytest.mark.slow
def test_sparse_spam_on_llama60m_under_the_model_annotations_is_shard_local():
  assert run_on_8_devices("sparse_sharded.py", "--llama60m").strip().endswith("OK")
