"""Update time and state size of SPAM vs optax.adamw on LLaMA-60M-shaped parameters.

Each optimizer step is `jax.jit(update + apply_updates)` with parameters and state donated, timed as
the median of interleaved repeats. With --torch it also times torch.optim.AdamW and
pytorch_optimizer.SPAM (CPU, same shapes, same thread count) when those packages are installed.

    python -m benchmarks.optimizer_update --repeats 30
    python -m benchmarks.optimizer_update --only "spam d=0.25" "spam d=0.1"  # and optax.adamw
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import optax

import spam_optax as spam
from benchmarks.common import donated_stepper, interleaved_medians, random_tree, shapes_for


def optimizers():
  return {
      "optax.adamw": optax.adamw(1e-3),
      "spam dense": spam.spam(1e-3),
      "spam d=0.25": spam.spam(1e-3, density=0.25, key=jax.random.key(0)),
      "spam d=0.1": spam.spam(1e-3, density=0.1, key=jax.random.key(0)),
      # bf16 moments (4 bytes/param): stochastic rounding (default) and round-to-nearest
      "spam bf16 stochastic": spam.spam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
      "spam bf16 nearest": spam.spam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16,
                                     rounding="nearest"),
      "spam d=0.25 bf16 stochastic": spam.spam(1e-3, density=0.25, key=jax.random.key(0),
                                               mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
  }


def jax_steppers(params, grads, only=None):
  """name -> (no-arg step callable, state bytes); `only`: the names to keep (optax.adamw always)."""
  return {name: donated_stepper(tx, params, grads) for name, tx in optimizers().items()
          if not only or name in only or name == "optax.adamw"}


def torch_steppers(shapes):
  out = {}
  try:
    import torch
  except ImportError:
    print("torch not installed: skipping the PyTorch peers")
    return out
  torch.set_num_threads(os.cpu_count() or 1)

  def make(opt_factory):
    params = [torch.nn.Parameter(0.02 * torch.randn(s)) for s in shapes.values()]
    for p in params:
      p.grad = 0.02 * torch.randn_like(p)
    opt = opt_factory(params)
    opt.step()
    state_bytes = sum(  # every per-parameter tensor the optimizer keeps (masks included)
        v.numel() * v.element_size() for st in opt.state.values() if isinstance(st, dict)
        for v in st.values() if torch.is_tensor(v) and v.dim() > 0
    )
    return opt.step, state_bytes

  out["torch.optim.AdamW (foreach)"] = make(lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True))
  try:
    from pytorch_optimizer import SPAM
  except ImportError:
    print("pytorch_optimizer not installed: skipping pytorch_optimizer.SPAM")
    return out
  out["pytorch_optimizer.SPAM dense"] = make(lambda ps: SPAM(ps, lr=1e-3, density=1.0))
  out["pytorch_optimizer.SPAM d=0.25"] = make(lambda ps: SPAM(ps, lr=1e-3, density=0.25))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--torch", action="store_true", help="also time the PyTorch peers")
  parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke test)")
  parser.add_argument("--only", nargs="+", metavar="NAME", help="time only these optimizers "
                      "(and optax.adamw, the baseline), e.g. --only 'spam d=0.25' 'spam d=0.1'")
  args = parser.parse_args()
  shapes = shapes_for(args.small)
  n = sum(int(jnp.prod(jnp.array(s))) for s in shapes.values())
  params, grads = random_tree(shapes, 0), random_tree(shapes, 1)
  steppers = jax_steppers(params, grads, args.only)
  if args.torch:
    steppers.update(torch_steppers(shapes))
  medians = interleaved_medians({k: v[0] for k, v in steppers.items()}, args.repeats)
  base = medians["optax.adamw"]
  print(f"{n / 1e6:.2f}M parameters, {jax.devices()[0].device_kind}, {args.repeats} interleaved repeats")
  print("| optimizer | median step (ms) | / optax.adamw | state bytes | bytes / param |")
  print("|---|---|---|---|---|")
  for name, (_, state_bytes) in steppers.items():
    t = medians[name]
    print(f"| {name} | {1e3 * t:.1f} | {t / base:.2f} | {state_bytes:,} | {state_bytes / n:.2f} |")


if __name__ == "__main__":
  main()
