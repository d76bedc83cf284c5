"""Cost of spike_monitor (vs an identity transform) and of stable_spam (vs optax.adamw).

LLaMA-60M-shaped float32 parameters (embedding and head 32000x512, 8 layers of q/k/v/o 512x512,
gate/up 512x1376, down 1376x512, RMSNorm scales; 58.07M floats). Each variant is one
`jax.jit(update + apply_updates)` with parameters and optimizer state donated, fed the same
(non-donated) gradients; times are medians of interleaved repeats (see benchmarks/common.py).

    python -m benchmarks.spike_monitor_overhead --repeats 20
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import optax

import spam_optax as spam
from benchmarks.common import donated_stepper, interleaved_medians, random_tree, shapes_for


def variants():
  """name -> (transform, baseline name)."""
  return {
      "optax.identity()": (optax.identity(), None),
      "spike_monitor()": (spam.spike_monitor(), "optax.identity()"),
      "optax.adamw": (optax.adamw(1e-3), None),
      "chain(spike_monitor(), optax.adamw)": (
          optax.chain(spam.spike_monitor(), optax.adamw(1e-3)), "optax.adamw"),
      "stable_spam": (spam.stable_spam(1e-3), "optax.adamw"),
      "stable_spam(corrected_reset=True)": (
          spam.stable_spam(1e-3, corrected_reset=True), "optax.adamw"),
      "chain(adaptive_spike_clip(), optax.adamw)": (
          optax.chain(spam.adaptive_spike_clip(), optax.adamw(1e-3)), "optax.adamw"),
      "chain(adaptive_grad_norm(), optax.adamw)": (
          optax.chain(spam.adaptive_grad_norm(), optax.adamw(1e-3)), "optax.adamw"),
      "scale_by_stable_spam_adam + lr": (
          optax.chain(spam.scale_by_stable_spam_adam(), optax.scale_by_learning_rate(1e-3)),
          "optax.adamw"),
  }


def steppers(params, grads, names=None):
  return {name: donated_stepper(tx, params, grads) for name, (tx, _) in variants().items()
          if not names or name in names}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
  parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke test)")
  args = parser.parse_args()

  shapes = shapes_for(args.small)
  params = random_tree(shapes, seed=0)
  grads = random_tree(shapes, seed=1)
  n = sum(x.size for x in jax.tree.leaves(params))
  runs = steppers(params, grads, args.only)
  med = interleaved_medians({k: r for k, (r, _) in runs.items()}, repeats=args.repeats)

  print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform} x "
        f"{jax.device_count()}, {os.cpu_count()} CPU cores ({platform.machine()}); "
        f"{n / 1e6:.2f}M float32 params; median of {args.repeats} interleaved repeats, "
        "params and state donated\n")
  print("| variant | ms / step | vs baseline | optimizer state, bytes / param |")
  print("|---|---|---|---|")
  table = variants()
  for name, t in med.items():
    base = table[name][1]
    ratio = f"{t / med[base]:.2f}x {base}" if base in med else "-"
    print(f"| {name} | {t * 1e3:.1f} | {ratio} | {runs[name][1] / n:.2f} |")


if __name__ == "__main__":
  main()
