"""Shared pieces of the benchmarks: LLaMA-60M-shaped parameters and interleaved median timing."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax


def cpu_name() -> str:
  """The CPU's model name (``/proc/cpuinfo``), so that a timing names the machine it ran on."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def llama60m_shapes(vocab: int = 32000, hidden: int = 512, inter: int = 1376, layers: int = 8):
  """Parameter shapes of the paper's LLaMA-60M: 58.07M floats with vocab 32000."""
  shapes = {"embed": (vocab, hidden), "lm_head": (hidden, vocab), "final_norm": (hidden,)}
  for i in range(layers):
    for name in ("q", "k", "v", "o"):
      shapes[f"layer{i}/attn/{name}"] = (hidden, hidden)
    shapes[f"layer{i}/mlp/gate"] = (hidden, inter)
    shapes[f"layer{i}/mlp/up"] = (hidden, inter)
    shapes[f"layer{i}/mlp/down"] = (inter, hidden)
    shapes[f"layer{i}/attn_norm"] = (hidden,)
    shapes[f"layer{i}/mlp_norm"] = (hidden,)
  return shapes


def random_tree(shapes, seed: int = 0, scale: float = 0.02, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {n: (scale * jax.random.normal(k, s)).astype(dtype) for k, (n, s) in zip(keys, shapes.items())}


def tree_bytes(tree) -> int:
  """Bytes of all array leaves (typed PRNG keys count their raw key data)."""
  total = 0
  for x in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    total += x.size * x.dtype.itemsize
  return total


def interleaved_medians(fns: dict, repeats: int, inner: int = 1) -> dict:
  """Times each no-arg callable `repeats` times in round-robin order; returns median seconds.

  Each callable must block until its work is done. Interleaving spreads machine noise evenly.
  """
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(inner):
        fn()
      times[name].append((time.perf_counter() - t0) / inner)
  return {name: statistics.median(ts) for name, ts in times.items()}


def donated_stepper(tx: optax.GradientTransformation, params, grads):
  """A no-arg callable doing one jitted update + apply_updates (params and state donated), already
  compiled and run once, and the optimizer state's size in bytes."""

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  jitted = jax.jit(step, donate_argnums=(0, 1))
  box = {"p": jax.tree.map(jnp.copy, params)}
  box["s"] = tx.init(box["p"])
  state_bytes = tree_bytes(box["s"])

  def run():
    box["p"], box["s"] = jitted(box["p"], box["s"], grads)
    jax.block_until_ready(box["p"])

  run()  # compile
  return run, state_bytes


def shapes_for(small: bool):
  """LLaMA-60M shapes, or a small stand-in for smoke tests."""
  return llama60m_shapes(vocab=256, hidden=64, inter=160, layers=2) if small else llama60m_shapes()
