"""Synthetic spikes for experiments (``--spike-prob``, ``--spike-scale``, ``--spike-mode``).

Inside the jitted step, keyed by (seed, step) so that a resumed run injects the same spikes:

* ``grad``: with probability p the whole gradient is multiplied by ``scale``;
* ``grad_entries``: each gradient entry independently, with probability p;
* ``input``: each sequence with probability p has a fraction ``scale`` of its input tokens replaced
  by random tokens (the targets stay), a corrupted-data spike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from train.config import Config


def inject_spikes(cfg: Config, key: jax.Array, grads=None, tokens=None, vocab_size: int = 0):
  """Returns (grads or tokens with spikes, number of injected spikes as int32)."""
  p, scale = cfg.spike_prob, cfg.spike_scale
  if cfg.spike_mode == "grad":
    hit = jax.random.bernoulli(key, p)
    factor = jnp.where(hit, scale, 1.0)
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads), hit.astype(jnp.int32)
  if cfg.spike_mode == "grad_entries":
    leaves, treedef = jax.tree.flatten(grads)
    keys = jax.random.split(key, len(leaves))
    out, count = [], jnp.zeros([], jnp.int32)
    for k, g in zip(keys, leaves):
      hit = jax.random.bernoulli(k, p, g.shape)
      out.append(jnp.where(hit, g * scale, g).astype(g.dtype))
      count += jnp.sum(hit, dtype=jnp.int32)
    return treedef.unflatten(out), count
  k_seq, k_pos, k_tok = jax.random.split(key, 3)
  inputs = tokens[:, :-1]
  seq_hit = jax.random.bernoulli(k_seq, p, (inputs.shape[0], 1))
  pos_hit = jax.random.bernoulli(k_pos, scale, inputs.shape) & seq_hit
  noise = jax.random.randint(k_tok, inputs.shape, 0, vocab_size, dtype=inputs.dtype)
  corrupted = jnp.where(pos_hit, noise, inputs)
  return tokens.at[:, :-1].set(corrupted), jnp.sum(pos_hit, dtype=jnp.int32)
