"""SPAM's state reports the gradient entries it clipped: ``optax.tree.get(state, "num_clipped")``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spam_optax as spam

SMALL = dict(reset_interval=40, warmup_steps=5, clip_delay=3)
PARAMS = {"embed": jnp.zeros((10, 8)), "q": jnp.zeros((8, 16)), "norm": jnp.ones(8)}


def grads_sequence(n=30, seed=1):
  rng = np.random.default_rng(seed)
  out = []
  for step in range(n):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), PARAMS)
    if step in (10, 20):  # spikes: a few huge entries in every leaf
      g = jax.tree.map(lambda x: x.at[(0,) * x.ndim].multiply(1e3), g)
    out.append(g)
  return out


def nu_leaves(state):
  return [x for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
          if any(getattr(k, "name", None) == "nu" for k in path)]


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_spam_counts_exactly_the_entries_it_clips(density):
  """Truth: the entries whose clipped g² changed v, against the same update with θ = 0."""
  kw = dict(SMALL, density=density, key=jax.random.key(0))
  tx, no_clip = spam.spam(1e-2, threshold=50.0, count_clipped=True, **kw), spam.spam(1e-2, threshold=0.0, count_clipped=True, **kw)
  state = tx.init(PARAMS)
  update, no_clip_update = jax.jit(tx.update), jax.jit(no_clip.update)
  counted, truth = [], []
  for g in grads_sequence():
    _, new = update(g, state, PARAMS)
    _, unclipped = no_clip_update(g, state, PARAMS)
    truth.append(sum(int(jnp.sum(a != b)) for a, b in zip(nu_leaves(new), nu_leaves(unclipped))))
    counted.append(int(optax.tree.get(new, "num_clipped")))
    assert optax.tree.get(new, "num_clipped").dtype == jnp.int32
    state = new
  assert counted == truth
  assert truth[10] > 0 and truth[20] > 0 and sum(truth[:2]) == 0  # none while k < clip_delay


def test_standalone_spike_clip_in_a_chain_counts_the_same():
  fused = spam.spam(1e-2, threshold=50.0, count_clipped=True, **SMALL)
  chain = optax.chain(
      spam.spike_clip(50.0, reset_interval=40, clip_delay=3),
      spam.scale_by_adam_with_reset(reset_interval=40, eps=1e-6),
      optax.scale_by_learning_rate(1e-2))
  s1, s2 = fused.init(PARAMS), chain.init(PARAMS)
  assert optax.tree.get(s2, "num_clipped") is not None  # exactly one: the clip's
  for g in grads_sequence():
    _, s1 = fused.update(g, s1, PARAMS)
    _, s2 = chain.update(g, s2, PARAMS)
    assert int(optax.tree.get(s1, "num_clipped")) == int(optax.tree.get(s2, "num_clipped"))


def test_readable_through_multisteps_and_inject_hyperparams():
  grads = grads_sequence(24)
  ref = spam.spam(1e-2, threshold=50.0, count_clipped=True, **SMALL)
  rs = ref.init(PARAMS)
  ms = optax.MultiSteps(spam.spam(1e-2, threshold=50.0, count_clipped=True, **SMALL), every_k_schedule=2)
  s = ms.init(PARAMS)
  for i, g in enumerate(grads):
    _, s = ms.update(g, s, PARAMS)
    if i % 2:  # a real update on the mean of the last two gradients
      mean = jax.tree.map(lambda a, b: (a + b) / 2, grads[i - 1], g)
      _, rs = ref.update(mean, rs, PARAMS)
    assert int(optax.tree.get(s, "num_clipped")) == int(optax.tree.get(rs, "num_clipped"))
  inj = optax.inject_hyperparams(spam.spam, static_args=("warmup_steps",))(
      learning_rate=1e-2, threshold=50.0, count_clipped=True, **SMALL)
  si, sp = inj.init(PARAMS), ref.init(PARAMS)
  for g in grads:
    _, si = jax.jit(inj.update)(g, si, PARAMS)
    _, sp = ref.update(g, sp, PARAMS)
    assert int(optax.tree.get(si, "num_clipped")) == int(optax.tree.get(sp, "num_clipped"))


def test_no_count_unless_asked_for():
  assert optax.tree.get(spam.scale_by_adam_with_reset().init(PARAMS), "num_clipped") is None
  assert optax.tree.get(spam.spam(1e-2).init(PARAMS), "num_clipped") is None
