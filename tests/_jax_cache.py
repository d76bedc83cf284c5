"""A persistent XLA compilation cache for the training tests.

The training tests run the same tiny programs many times (a run, its resume, a comparison run...).
Caching the compiled executables on disk turns every compile after the first into a load, in this
process and in the subprocesses the tests start (via the environment). Loaded and fresh executables
are the same binary, so numerics are unchanged.
"""

import os
import tempfile

import jax

CACHE_DIR = os.path.join(tempfile.gettempdir(), "spam-optax-tests-jax-cache")
ENV = {
    "JAX_COMPILATION_CACHE_DIR": CACHE_DIR,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def enable() -> None:
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def subprocess_env(**extra) -> dict:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, **ENV, **extra)
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  return env
