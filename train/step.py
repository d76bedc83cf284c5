"""The loss (one function for training and evaluation) and the jitted step bodies.

A batch is ``{"tokens": int32 [B, T + 1], "weights": float32 [B, T]}``: the model reads
``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``; a weight is 1 for a real target token and 0 for
padding. The train state is ``{"step", "params", "opt_state"}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train import spike_report
from train.config import Config
from train.spike_injection import inject_spikes


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def summed_nll(graphdef, params, batch) -> tuple[jax.Array, jax.Array]:
  """(sum of the target tokens' negative log-likelihood, number of target tokens)."""
  model = nnx.merge(graphdef, params)
  tokens, weights = batch["tokens"], batch["weights"]
  nll = token_nll(model(tokens[:, :-1]), tokens[:, 1:])
  return jnp.sum(nll * weights), jnp.sum(weights)


def mean_loss(graphdef, params, batch) -> jax.Array:
  total, count = summed_nll(graphdef, params, batch)
  return total / jnp.maximum(count, 1.0)


def make_train_step(cfg: Config, graphdef, tx: optax.GradientTransformation, schedule,
                    vocab_size: int):
  """``step(state, batch) -> (state, metrics)``: one optimizer update on one global batch."""
  spike_key = jax.random.fold_in(jax.random.key(cfg.seed), 0x5B1CE)
  inject = cfg.spike_prob > 0

  def step(state, batch):
    key = jax.random.fold_in(spike_key, state["step"])
    injected = jnp.zeros([], jnp.int32)
    if inject and cfg.spike_mode == "input":
      tokens, injected = inject_spikes(cfg, key, tokens=batch["tokens"], vocab_size=vocab_size)
      batch = dict(batch, tokens=tokens)
    loss, grads = jax.value_and_grad(lambda p: mean_loss(graphdef, p, batch))(state["params"])
    if inject and cfg.spike_mode != "input":
      grads, injected = inject_spikes(cfg, key, grads=grads)
    # The loss goes to the optimizer as an extra argument (optax's convention): the step-skip
    # rule (adamw_skip) tests it as MaxText does; every other transform ignores it.
    updates, opt_state = optax.with_extra_args_support(tx).update(
        grads, state["opt_state"], state["params"], loss=loss)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
               "injected": injected, **spike_report.step_metrics(opt_state)}
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return step


def make_eval_step(graphdef):
  """``eval(params, batch) -> (sum of token NLL, number of target tokens)``."""
  return lambda params, batch: summed_nll(graphdef, params, batch)
