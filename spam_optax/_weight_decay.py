"""Decoupled weight decay whose state does not depend on the decay's value."""

from __future__ import annotations

import numbers

import optax


def add_decayed_weights(weight_decay) -> optax.GradientTransformation:
  """`optax.add_decayed_weights`, except that a literal 0 is the identity (and needs no params).

  Both have the same (empty) state, so the optimizer state has the same structure for every
  value, a traced one included: ``optax.inject_hyperparams(spam.spam)(...)`` builds the state of
  ``spam.spam(...)``, and a checkpoint of one restores into the other.
  """
  decay = optax.add_decayed_weights(weight_decay)
  if isinstance(weight_decay, numbers.Number) and weight_decay == 0:
    return optax.GradientTransformation(decay.init, lambda updates, state, params=None: (updates, state))
  return decay
