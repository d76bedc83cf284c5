"""The jitted training step against the PyTorch peer, back to back in one process.

JAX: the training step of ``python -m train`` (forward, loss, backward, SPAM update; the spike
counter off), built by ``train.state.build_training``. PyTorch: Hugging Face ``LlamaForCausalLM`` of
the same shape (SDPA attention, untied head, no biases) with ``torch.optim.AdamW`` (foreach), the
same batch and the same next-token cross-entropy. Blocks of steps of the two alternate, in a
rotating order, and each reports its median; the ratio is JAX / torch (below 1: JAX is faster).

``fwd+bwd`` rows time the loss and gradients alone (no optimizer) on both sides, which splits a gap
into model and optimizer. Other modes:

* ``--memory``: peak memory of the compiled train step (``compiled.memory_analysis()``) for every
  ``--remat`` policy, layers scanned and unrolled, on 60m and 130m (compiles only);
* ``--compile-depth``: compile time of the 60M-width train step at 8, 24 and 48 layers, scanned and
  unrolled.

Usage (about 8 minutes on 2 quiet CPU cores, all modes)::

  python benchmarks/vs_torch.py --all --json benchmarks/results/vs_torch.json
  python benchmarks/vs_torch.py --models tiny,20m --dtype bf16   # bf16 compute on both sides
  python benchmarks/vs_torch.py --smoke                          # seconds; what the test runs

Needs the ``bench`` extra (torch CPU wheel, transformers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import cpu_name  # noqa: E402
from models import get_config  # noqa: E402
from models.llama import REMAT  # noqa: E402
from models.hf import config_to_hf  # noqa: E402
from train import data as data_lib  # noqa: E402
from train.config import Config  # noqa: E402
from train.mesh import make_mesh  # noqa: E402
from train.state import build_training, model_config  # noqa: E402
from train.step import token_nll  # noqa: E402
from flax import nnx  # noqa: E402

# model -> (vocab, batch, seq): the shapes; 60m with the paper's vocabulary.
SHAPES = {"tiny": (256, 16, 128), "20m": (256, 16, 128), "60m": (32000, 8, 256)}
SMOKE = {"tiny": (64, 2, 16)}


# ----------------------------------------------------------------------------- JAX


def jax_step(model: str, vocab: int, batch: int, seq: int, dtype: str, **changes):
  """(one train step as a no-arg callable, one fwd+bwd as one, compile seconds of the step)."""
  cfg = Config(model=model, batch_size=batch, seq_len=seq, steps=100_000, dtype=dtype,
               optimizer="spam", progress=False, **changes)
  mesh = make_mesh(None)
  built = build_training(cfg, model_config(cfg, vocab), mesh)
  tokens = np.random.default_rng(0).integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
  local = {"tokens": tokens, "weights": np.ones((batch, seq), np.float32)}
  data = data_lib.global_batch(local, built.batch_sharding, batch)
  box = {"state": built.init()}
  start = time.perf_counter()
  compiled = built.train_step.lower(box["state"], data).compile()
  compile_s = time.perf_counter() - start

  def step():
    box["state"], metrics = compiled(box["state"], data)
    jax.block_until_ready(metrics["loss"])

  @jax.jit
  def fwd_bwd(params, tokens):
    def loss(p):
      return jnp.mean(token_nll(nnx.merge(built.graphdef, p)(tokens[:, :-1]), tokens[:, 1:]))
    return jax.value_and_grad(loss)(params)

  def grads():
    jax.block_until_ready(fwd_bwd(box["state"]["params"], data["tokens"]))

  return step, grads, compile_s


# ----------------------------------------------------------------------------- torch


def torch_step(model: str, vocab: int, batch: int, seq: int, dtype: str):
  """(one HF LlamaForCausalLM + AdamW step, one fwd+bwd), as no-arg callables."""
  import torch
  import transformers

  cfg = get_config(model).replace(vocab_size=vocab, max_seq_len=max(seq, 1024))
  hf = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(cfg, "float32").items()
                                   if k not in ("architectures", "model_type")})
  torch.manual_seed(0)
  net = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="sdpa",
                                                   dtype=torch.float32)
  net.train()
  opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
  tokens = torch.from_numpy(
      np.random.default_rng(0).integers(0, vocab, size=(batch, seq + 1)).astype(np.int64))
  inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)
  autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

  def loss():
    with autocast:
      logits = net(input_ids=inputs).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), targets)

  def grads():
    loss().backward()
    net.zero_grad(set_to_none=True)

  def step():
    loss().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return step, grads


# ----------------------------------------------------------------------------- timing


def interleaved(fns: dict, steps: int, repeats: int) -> dict[str, float]:
  """Median seconds per call of each no-arg callable; blocks of `steps` calls, rotating order."""
  times = {name: [] for name in fns}
  names = list(fns)
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      for _ in range(steps):
        fns[name]()
      times[name].append((time.perf_counter() - start) / steps)
  return {name: statistics.median(ts) for name, ts in times.items()}


def speed(args) -> list[dict]:
  import torch
  torch.set_num_threads(args.threads)
  rows = []
  for model in args.models:
    vocab, batch, seq = (SMOKE if args.smoke else SHAPES).get(model, SHAPES["60m"])
    if args.batch:
      batch, seq = args.batch
    j_step, j_grads, compile_s = jax_step(model, vocab, batch, seq, args.dtype, **args.changes)
    t_step, t_grads = torch_step(model, vocab, batch, seq, args.dtype)
    fns = {"jax step": j_step, "torch step": t_step, "jax fwd+bwd": j_grads,
           "torch fwd+bwd": t_grads}
    for fn in fns.values():  # compile, allocate, settle
      for _ in range(args.warmup):
        fn()
    med = interleaved(fns, args.steps, args.repeats)
    for part in ("step", "fwd+bwd"):
      j, t = med[f"jax {part}"], med[f"torch {part}"]
      rows.append({"model": model, "vocab": vocab, "batch": batch, "seq": seq, "dtype": args.dtype,
                   "part": part, "jax_ms": 1e3 * j, "torch_ms": 1e3 * t, "ratio": j / t,
                   "jax_compile_s": compile_s, "changes": args.changes})
    print(f"| {model} (vocab {vocab}) | {batch}x{seq} | {args.dtype} | {rows[-2]['jax_ms']:.1f} | "
          f"{rows[-2]['torch_ms']:.1f} | {rows[-2]['ratio']:.2f}x | {rows[-1]['jax_ms']:.1f} | "
          f"{rows[-1]['torch_ms']:.1f} | {rows[-1]['ratio']:.2f}x |", flush=True)
  return rows


def memory(args) -> list[dict]:
  """Peak memory of the compiled train step per remat policy (no step is run)."""
  rows = []
  for model in (["tiny"] if args.smoke else ["60m", "130m"]):
    vocab, batch, seq = (64, 2, 16) if args.smoke else (32000, 16, 256)
    for scan, remat in itertools.product((True,) if args.smoke else (True, False),
                                         ("none", "block") if args.smoke else REMAT):
      cfg = Config(model=model, batch_size=batch, seq_len=seq, optimizer="spam",
                   progress=False, dtype=args.dtype,
                   **dict(args.changes, remat=remat, scan_layers=scan))
      built = build_training(cfg, model_config(cfg, vocab), make_mesh(None))
      batch_spec = {"tokens": jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32),
                    "weights": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}
      mem = built.train_step.lower(built.abstract_state, batch_spec).compile().memory_analysis()
      row = {"model": model, "batch": batch, "seq": seq, "scan_layers": scan, "remat": remat,
             "temp_mb": mem.temp_size_in_bytes / 2**20,
             "args_mb": mem.argument_size_in_bytes / 2**20,
             "peak_mb": (mem.temp_size_in_bytes + mem.argument_size_in_bytes +
                         mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**20}
      rows.append(row)
      print(f"| {model} | {batch}x{seq} | {'scan' if scan else 'unrolled'} | {remat} | "
            f"{row['temp_mb']:.0f} | {row['args_mb']:.0f} | "
            f"{row['peak_mb']:.0f} |", flush=True)
  return rows


def compile_depth(args) -> list[dict]:
  """Compile seconds of the 60M-width train step by depth, scanned and unrolled."""
  rows = []
  depths = (1, 2) if args.smoke else (8, 24, 48)
  base = "tiny" if args.smoke else "60m"
  for scan in (True,) if args.smoke else (True, False):
    for layers in depths:
      cfg = Config(model=base, batch_size=2, seq_len=16 if args.smoke else 256, optimizer="spam",
                   progress=False, scan_layers=scan)
      model_cfg = model_config(cfg, 64 if args.smoke else 32000).replace(num_layers=layers)
      built = build_training(cfg, model_cfg, make_mesh(None))
      batch_spec = {"tokens": jax.ShapeDtypeStruct((2, cfg.seq_len + 1), jnp.int32),
                    "weights": jax.ShapeDtypeStruct((2, cfg.seq_len), jnp.float32)}
      start = time.perf_counter()
      built.train_step.lower(built.abstract_state, batch_spec).compile()
      seconds = time.perf_counter() - start
      rows.append({"scan_layers": scan, "layers": layers, "compile_s": seconds})
      print(f"| {'scan' if scan else 'unrolled'} | {layers} | {seconds:.1f} |", flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="tiny,20m,60m")
  parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
  parser.add_argument("--batch", help="BxT for every model (default: the issue's shapes)")
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--scan-layers", default="false", choices=("true", "false"))
  parser.add_argument("--remat", default="none")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=9, help="timed blocks per side")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--memory", action="store_true", help="remat peak-memory table")
  parser.add_argument("--compile-depth", action="store_true", help="compile time by depth")
  parser.add_argument("--all", action="store_true", help="speed, --memory and --compile-depth")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, one of everything")
  parser.add_argument("--json", help="also write the rows to this file")
  args = parser.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  if args.batch:
    args.batch = tuple(int(x) for x in args.batch.lower().split("x"))
  args.changes = dict(attention=args.attention, scan_layers=args.scan_layers == "true",
                      remat=args.remat)
  if args.smoke:
    args.models, args.steps, args.repeats, args.warmup = ["tiny"], 1, 2, 1

  print(f"# {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPU cores, "
        f"{cpu_name()}; jax {jax.__version__}; torch threads "
        f"{args.threads}; {args.changes}; median of {args.repeats} blocks of {args.steps} steps")
  out = {}
  print("| model | batch | dtype | JAX step ms | torch step ms | ratio | JAX fwd+bwd ms | "
        "torch fwd+bwd ms | ratio |\n|---|---|---|---|---|---|---|---|---|")
  out["speed"] = speed(args)
  if args.memory or args.all or args.smoke:
    print("\n| model | batch | layers run | remat | temp MiB | arguments MiB | peak MiB |\n"
          "|---|---|---|---|---|---|---|")
    out["memory"] = memory(args)
  if args.compile_depth or args.all or args.smoke:
    print("\n| layers run | depth | compile s |\n|---|---|---|")
    out["compile_depth"] = compile_depth(args)
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  main()
