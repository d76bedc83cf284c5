"""Where the sparse update's time goes on one device: the gather into compact form, the expansion
fused with the parameter update, the offsets alone, against a dense ``p - lr g``.

One leaf shaped like LLaMA-60M's eight gate (or up) kernels stacked, medians of interleaved
repeats (benchmarks/RESULTS.md, section 1).

    python -m benchmarks.sparse_parts [--small] [--repeats 20]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import interleaved_medians
from spam_optax._sparse import Strata, row_size, stratified_axis


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--small", action="store_true", help="a 64 x 172 leaf (a smoke test)")
  args = parser.parse_args()
  shape = (64, 172) if args.small else (8 * 512, 1376)
  g = jax.random.normal(jax.random.key(1), shape)
  p = jax.random.normal(jax.random.key(2), shape)
  key = jax.random.key(0)
  fns = {}
  for d in (0.25, 0.1):
    k = row_size(shape[stratified_axis(shape)], d)
    u = jax.random.normal(jax.random.key(3), Strata.draw(key, shape, k).compact_shape)
    gather = jax.jit(lambda g, k=k: Strata.draw(key, shape, k).gather(g))
    expand = jax.jit(lambda p, u, k=k: p - 1e-3 * Strata.draw(key, shape, k).expand(u))
    offsets = jax.jit(lambda k=k: Strata.draw(key, shape, k).offsets.astype(jnp.int32))
    fns[f"gather d={d}"] = lambda f=gather: f(g).block_until_ready()
    fns[f"expand + apply d={d}"] = lambda f=expand, u=u: f(p, u).block_until_ready()
    fns[f"offsets d={d}"] = lambda f=offsets: f().block_until_ready()
  axpy = jax.jit(lambda p, g: p - 1e-3 * g)
  fns["dense p - lr g"] = lambda: axpy(p, g).block_until_ready()
  for f in fns.values():
    f()  # compile
  medians = interleaved_medians(fns, args.repeats)
  print(f"leaf {shape}, {jax.devices()[0].device_kind}, {args.repeats} interleaved repeats")
  print("| part | median (ms) | / dense p - lr g |")
  print("|---|---|---|")
  for name, t in medians.items():
    print(f"| {name} | {1e3 * t:.2f} | {t / medians['dense p - lr g']:.2f} |")


if __name__ == "__main__":
  main()
