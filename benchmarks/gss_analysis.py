"""Offline Gradient Spike Score (SPAM paper, Appendix P) per layer type, on a short tiny-model run.

The paper's definition, for one parameter entry over a run of gradients g_0 .. g_T:

    GSS(g_i) = |g_i| / ( (1 / (T + 1)) * sum_j |g_j| )

and g_i is a spike when GSS(g_i) > 50. Its Table 4 counts such (step, entry) pairs per layer type
(embedding, attention, FFN, LayerNorm, LM head) over the first 1000 steps of LLaMA-60M on C4 with
Adam, and divides by the number of parameters of that type.

This script trains the repository's tiny LLaMA (models/llama.py, byte vocabulary) on the embedded
Shakespeare corpus with Adam for ``--steps`` updates, records every gradient entry's magnitude (as
bfloat16, in a memory-mapped file: 2 bytes per entry per step), then computes the run means and the
spike counts exactly as defined above. Note that GSS <= T + 1: with T + 1 recorded steps an entry can
only spike if it is non-zero in fewer than (T + 1) / 50 of them, so counts grow with the run length.
For comparison it also reports the online counts of ``spam_optax.spike_monitor`` (g^2 over its EMA of
g^2, threshold 50) chained in front of the optimizer on the same run.

    python -m benchmarks.gss_analysis --steps 1000 --out /tmp/gss
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx

import spam_optax as spam
from spam_optax._spike_monitor import LAYER_TYPES
from models.llama import CONFIGS, make_model
from train.data import window_batches
from train.sources import read_embedded_corpus
from train.tokenizers import ByteTokenizer

TABLE4 = {  # the paper's Table 4 (LLaMA-60M, C4, Adam, 1000 steps): spikes, params
    "embedding": (11954001, 16384000),
    "attention": (86302, 8388608),
    "ffn": (105415, 16908288),
    "norm": (949302, 8704),
    "lm_head": (13893, 16384000),
}


def build(args):
  cfg = CONFIGS[args.model].replace(vocab_size=ByteTokenizer.vocab_size, max_seq_len=args.seq_len)
  model = make_model(cfg, seed=args.seed)
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = ByteTokenizer().encode(read_embedded_corpus())
  batches = window_batches(tokens, args.seq_len, args.seed, args.batch_size)  # [s]: step s

  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params)(batch[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  lr = optax.join_schedules(
      [optax.linear_schedule(0.0, args.lr, args.warmup), optax.cosine_decay_schedule(
          args.lr, max(args.steps - args.warmup, 1), alpha=0.1)], [args.warmup])
  tx = optax.chain(spam.spike_monitor(threshold=50.0), optax.adam(lr))
  return cfg, params, batches, loss_fn, tx


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--warmup", type=int, default=100)
  parser.add_argument("--threshold", type=float, default=50.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=Path, default=None, help="directory for results.json")
  parser.add_argument("--scratch", type=Path, default=None,
                      help="directory for the recorded gradients (default: a temp dir, removed)")
  args = parser.parse_args()

  cfg, params, batches, loss_fn, tx = build(args)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  sizes = [int(x.size) for _, x in flat]
  types = [spam.layer_type(path) for path, _ in flat]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  n_params, n_steps = int(offsets[-1]), args.steps

  scratch = tempfile.TemporaryDirectory(dir=args.scratch)
  record = np.memmap(os.path.join(scratch.name, "abs_grads.bf16"), mode="w+",
                     dtype=ml_dtypes.bfloat16, shape=(n_steps, n_params))

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    flat_abs = jnp.concatenate([jnp.abs(g).ravel() for g in jax.tree.leaves(grads)])
    return optax.apply_updates(params, updates), opt_state, loss, flat_abs.astype(jnp.bfloat16)

  opt_state = tx.init(params)
  t0, losses = time.time(), []
  for s in range(n_steps):
    batch = jnp.asarray(batches[s]["tokens"])
    params, opt_state, loss, flat_abs = step(params, opt_state, batch)
    record[s] = np.asarray(flat_abs)
    losses.append(float(loss))
    if (s + 1) % max(n_steps // 10, 1) == 0:
      print(f"step {s + 1}/{n_steps}  loss {np.mean(losses[-20:]):.3f}  "
            f"({time.time() - t0:.0f} s)", flush=True)
  record.flush()

  # Offline GSS (Appendix P): mean |g| of every entry over the run, then count |g| > threshold *
  # mean. Also a per-tensor variant (the mean over all entries of the tensor and all steps), since
  # the per-entry definition bounds the spikes of one entry by (T + 1) / threshold (see the report).
  # Column blocks keep memory bounded.
  per_leaf, per_leaf_tensor = [], []
  per_step = {t: np.zeros(n_steps, np.int64) for t in set(types)}  # per-entry GSS spikes per step
  block_cols = max(1, (64 << 20) // (4 * n_steps))
  for i in range(len(sizes)):
    lo, hi = int(offsets[i]), int(offsets[i + 1])
    total = 0.0
    for b in range(lo, hi, block_cols):
      total += float(np.asarray(record[:, b:min(b + block_cols, hi)], np.float64).sum())
    tensor_mean = total / (n_steps * (hi - lo))
    n_entry = n_tensor = 0
    for b in range(lo, hi, block_cols):
      a = np.asarray(record[:, b:min(b + block_cols, hi)], np.float32)
      mean = a.mean(axis=0)
      spiked = (a > args.threshold * mean) & (mean > 0)
      n_entry += int(spiked.sum())
      per_step[types[i]] += spiked.sum(axis=1)
      n_tensor += int(np.sum(a > args.threshold * tensor_mean)) if tensor_mean > 0 else 0
    per_leaf.append(n_entry)
    per_leaf_tensor.append(n_tensor)

  offline = {t: {"spikes": 0, "spikes_tensor_mean": 0, "params": 0} for t in LAYER_TYPES}
  for t, n_spk, n_spk_t, n_par in zip(types, per_leaf, per_leaf_tensor, sizes):
    row = offline.setdefault(t, {"spikes": 0, "spikes_tensor_mean": 0, "params": 0})
    row["spikes"] += n_spk
    row["spikes_tensor_mean"] += n_spk_t
    row["params"] += n_par
  online = spam.group_by_layer_type(spam.spike_counts(opt_state))
  max_score = spam.group_by_layer_type(spam.spike_counts(opt_state, "max_score"), "max")

  print(f"\n{cfg.num_layers}-layer d={cfg.hidden_size} LLaMA ({n_params:,} params, byte vocab), "
        f"Adam lr {args.lr}, {n_steps} steps of {args.batch_size}x{args.seq_len} tokens, final loss "
        f"{np.mean(losses[-20:]):.3f}; GSS threshold {args.threshold}\n")
  print("| layer type | #params | GSS spikes (per-entry mean, App. P) | per param "
        "| GSS spikes (per-tensor mean) | per param | paper Table 4 per param "
        "| online spike_monitor spikes | per param | largest online score |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for t, row in offline.items():
    paper = TABLE4.get(t)
    paper_ratio = f"{paper[0] / paper[1]:.4g}" if paper else "-"
    n = row["params"] or float("nan")
    print(f"| {t} | {row['params']:,} | {row['spikes']:,} | {row['spikes'] / n:.4g} | "
          f"{row['spikes_tensor_mean']:,} | {row['spikes_tensor_mean'] / n:.4g} | {paper_ratio} | "
          f"{online.get(t, 0):,} | {online.get(t, 0) / n:.4g} | {max_score.get(t, 0):.3g} |")
  print(f"\n(per-entry GSS <= T + 1 = {n_steps}, so one entry spikes at most "
        f"{int(np.ceil(n_steps / args.threshold)) - 1} times: at most that many spikes per param)")
  tenth = max(n_steps // 10, 1)
  print(f"\nWhen the per-entry GSS spikes happen (share in each tenth of the run, {tenth} steps):")
  for t, counts in sorted(per_step.items()):
    if counts.sum():
      shares = [counts[k:k + tenth].sum() / counts.sum() for k in range(0, n_steps, tenth)]
      print(f"  {t}: " + " ".join(f"{x:.2f}" for x in shares))

  if args.out:
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(args={k: str(v) for k, v in vars(args).items()}, n_params=n_params,
                  losses=losses, offline=offline,
                  per_step_spikes={t: c.tolist() for t, c in per_step.items()}, online=online, online_max_score=max_score,
                  per_leaf={jax.tree_util.keystr(p): {"type": t, "params": n, "spikes": k,
                                                      "spikes_tensor_mean": kt}
                            for (p, _), t, n, k, kt in zip(flat, types, sizes, per_leaf,
                                                           per_leaf_tensor)})
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out / 'results.json'}")
  del record
  scratch.cleanup()


if __name__ == "__main__":
  main()
