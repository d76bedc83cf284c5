"""Evaluation: the validation loss over the fixed validation batches, and a generated sample."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train import data as data_lib
from train.state import Training

SAMPLE_TEMPERATURE = 0.8
SAMPLE_PROMPT_TOKENS = 32


def mean_nll(eval_step, params, batches) -> tuple[float, int]:
  """(token-weighted mean NLL, number of target tokens) of ``eval_step(params, batch) -> (summed
  NLL, target count)`` over ``batches``: the one definition of a validation loss (the training
  loop's and the benchmarks')."""
  total, count = 0.0, 0.0
  for batch in batches:
    s, c = eval_step(params, batch)
    total += float(s)
    count += float(c)
  return total / max(count, 1.0), int(count)


def validation_loss(training: Training, params, val_batches, batch_size: int):
  """(mean token NLL, perplexity, number of target tokens) over this process's validation rows."""
  loss, count = mean_nll(
      lambda p, local: training.eval_step(p, data_lib.global_batch(
          local, training.batch_sharding, batch_size)), params, val_batches)
  return loss, math.exp(min(loss, 700.0)), count


def sample(training: Training, params, prompt: np.ndarray, num_tokens: int, context: int,
           seed: int) -> np.ndarray:
  """`num_tokens` ids drawn after `prompt` (temperature 0.8), each from the last `context` ids.

  Every step runs the model on a fixed window of `context` ids (one compiled shape, no cache):
  simple and cheap for the few hundred tokens printed at the end of a run. All processes call it
  with the same prompt; the rows of the batch axes each draw a sample and the first is returned.
  """
  mesh = training.batch_sharding.mesh
  rows = math.prod(mesh.shape[a] for a in training.batch_sharding.spec[0])
  prompt = np.asarray(prompt, np.int32)[-context:]
  length = len(prompt) + num_tokens
  start = np.zeros((rows, length), np.int32)
  start[:, :len(prompt)] = prompt
  buffer = jax.make_array_from_callback(start.shape, training.batch_sharding,
                                        lambda index: start[index])

  @jax.jit
  def generate(params, buffer, key):
    model = nnx.merge(training.graphdef, params)

    def one(i, carry):
      buffer, key = carry
      lo = jnp.maximum(i - context, 0)
      window = jax.lax.dynamic_slice_in_dim(buffer, lo, min(context, length), axis=1)
      logits = model(window)[:, i - lo - 1].astype(jnp.float32)
      key, draw = jax.random.split(key)
      token = jax.random.categorical(draw, logits / SAMPLE_TEMPERATURE, axis=-1)
      return jax.lax.dynamic_update_slice_in_dim(buffer, token[:, None].astype(jnp.int32), i,
                                                 axis=1), key

    buffer, _ = jax.lax.fori_loop(len(prompt), length, one, (buffer, key))
    return buffer

  out = generate(params, buffer, jax.random.key(seed))
  first = jax.device_get(out.addressable_shards[0].data)[0]  # row 0 on process 0
  return np.asarray(first[len(prompt):])
