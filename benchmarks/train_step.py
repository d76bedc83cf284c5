"""Training-step time of SPAM against AdamW (and Adam) on the same model, in one process.

Each optimizer gets the full jitted train step of ``python -m train`` (forward, backward, the
optimizer update, the metrics) on the same model and a fixed random batch. The timed blocks of the
optimizers are interleaved, in a rotating order, so that drift of the machine (thermal, other load)
hits every optimizer alike; the per-step time reported is the median over the blocks.

Tokens/s and MFU (model FLOPs utilisation, see ``train/throughput.py``) come with every step time;
MFU needs the device's peak, built in for common GPUs and TPUs, ``--peak-flops`` for others (on CPU
it is left out unless given).

It also times the optimizer update alone (``tx.update`` + ``apply_updates`` on gradient-shaped
inputs), where the difference between optimizers is not diluted by the model.

Usage::

  python benchmarks/train_step.py                       # tiny and 20m, vocab 256, on this machine
  python benchmarks/train_step.py --models 60m --vocab 32000 --batch-size 64 --seq-len 256
  python benchmarks/train_step.py --json results.json

Variants: ``adam``, ``adamw`` (weight decay 0, as every published run), ``spam`` (spam_optax.spam, which
counts the entries it clips in its state), ``spam_d0.25`` (sparse momentum, density 0.25), ``stable_spam``;
``spam_scan`` / ``stable_spam_scan``: the same with ``--scan-layers`` (stacked weights, layers under
``lax.scan``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from train import data as data_lib  # noqa: E402
from train.config import Config  # noqa: E402
from train import throughput  # noqa: E402
from train.mesh import make_mesh  # noqa: E402
from train.state import build_training, model_config  # noqa: E402

VARIANTS = {
    "adam": dict(optimizer="adam"),
    "adamw": dict(optimizer="adamw"),
    "spam": dict(optimizer="spam"),
    "spam_d0.25": dict(optimizer="spam", density=0.25),
    "stable_spam": dict(optimizer="stable_spam"),
    # The same optimizers with the weights stored stacked and the layers under lax.scan.
    "spam_scan": dict(optimizer="spam", scan_layers=True),
    "stable_spam_scan": dict(optimizer="stable_spam", scan_layers=True),
}


def time_blocks(fns: dict, steps: int, repeats: int) -> dict[str, list[float]]:
  """{name: [seconds per call, one per block]}; `fns[name]()` runs one call and returns a tree."""
  times: dict[str, list[float]] = {name: [] for name in fns}
  names = list(fns)
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      out = None
      start = time.perf_counter()
      for _ in range(steps):
        out = fns[name]()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / steps)
  return times


def bench_model(model: str, args) -> list[dict]:
  mesh = make_mesh(None)
  rows = []
  steps_fns, update_fns = {}, {}
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, args.vocab, size=(args.batch_size, args.seq_len + 1)).astype(np.int32)
  local = {"tokens": tokens, "weights": np.ones((args.batch_size, args.seq_len), np.float32)}
  num_params = flops_per_token = None
  peak = throughput.device_peak_flops(args.peak_flops)
  for name in args.variants:
    cfg = Config(model=model, batch_size=args.batch_size, seq_len=args.seq_len, steps=100_000,
                 dtype=args.dtype, progress=False, **VARIANTS[name])
    model_cfg = model_config(cfg, args.vocab)
    flops_per_token = throughput.train_flops_per_token(model_cfg, args.seq_len)
    built = build_training(cfg, model_cfg, mesh)
    batch = data_lib.global_batch(local, built.batch_sharding, args.batch_size)
    holder = {"state": built.init()}
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(holder["state"]["params"]))

    def one_step(built=built, holder=holder, batch=batch):
      holder["state"], metrics = built.train_step(holder["state"], batch)
      return metrics["loss"]

    for _ in range(args.warmup):  # compile and settle
      jax.block_until_ready(one_step())
    steps_fns[name] = one_step

    # The optimizer update alone, on gradient-shaped inputs.
    params = holder["state"]["params"]
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    opt_holder = {"params": params, "opt": built.tx.init(params)}

    @jax.jit
    def update(params, opt, grads, tx=built.tx):
      updates, opt = tx.update(grads, opt, params)
      return optax.apply_updates(params, updates), opt

    def one_update(update=update, h=opt_holder, grads=grads):
      h["params"], h["opt"] = update(h["params"], h["opt"], grads)
      return h["params"]

    for _ in range(args.warmup):
      jax.block_until_ready(one_update())
    update_fns[name] = one_update

  step_times = time_blocks(steps_fns, args.steps, args.repeats)
  update_times = time_blocks(update_fns, args.steps, args.repeats)
  base = statistics.median(step_times.get("adamw", next(iter(step_times.values()))))
  base_update = statistics.median(update_times.get("adamw", next(iter(update_times.values()))))
  for name in args.variants:
    med = statistics.median(step_times[name])
    upd = statistics.median(update_times[name])
    tokens_per_s = args.batch_size * args.seq_len / med
    rows.append({
        "model": model, "vocab": args.vocab, "params": num_params, "variant": name,
        "step_ms": 1e3 * med, "step_ms_min": 1e3 * min(step_times[name]),
        "vs_adamw": med / base, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "mfu": throughput.mfu(tokens_per_s, flops_per_token, peak, jax.device_count()),
        "update_ms": 1e3 * upd, "update_vs_adamw": upd / base_update,
    })
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="tiny,20m")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--vocab", type=int, default=256, help="256 = the byte tokenizer of the "
                      "default run; 32000 = the paper's t5 vocabulary")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--dtype", default="fp32")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=7, help="timed blocks per variant")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--peak-flops", type=float, default=None,
                      help="peak FLOP/s of one device for MFU (default: the built-in table)")
  parser.add_argument("--json", help="also write the rows to this file")
  args = parser.parse_args(argv)
  args.variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    parser.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")

  device = jax.devices()[0]
  print(f"# {device.platform} {getattr(device, 'device_kind', '')} x{jax.device_count()}, "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; jax "
        f"{jax.__version__}; batch {args.batch_size} x seq {args.seq_len}, {args.dtype}; median "
        f"of {args.repeats} blocks of {args.steps} steps")
  rows = []
  for model in args.models.split(","):
    rows += bench_model(model, args)
  print("| model | params | optimizer | step ms | vs AdamW | tokens/s | MFU | update ms | update "
        "vs AdamW |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    print(f"| {r['model']} (vocab {r['vocab']}) | {r['params'] / 1e6:.2f}M | {r['variant']} | "
          f"{r['step_ms']:.1f} | {r['vs_adamw']:.3f}x | {r['tokens_per_s']:,.0f} | {mfu} | "
          f"{r['update_ms']:.2f} | {r['update_vs_adamw']:.2f}x |")
  if args.json:
    Path(args.json).write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
  return rows


if __name__ == "__main__":
  main()
