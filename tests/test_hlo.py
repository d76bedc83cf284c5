"""The compiled SPAM step must not copy its moment buffers; the rewrites in spam_optax/_xla_cpu.py
that ensure it (and AdaClip's abs_max) keep doing their job.

XLA inserts a full-size copy of v when the m update (which reads the old v) is not ordered before
the in-place v update. That costs ~10% of a step per leaf and comes back silently with small
rewrites of the update, so this test counts the copies in the optimized HLO.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import spam_optax as spam


def full_size_copies(tx, params):
  state = tx.init(params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()
  shapes = {",".join(map(str, x.shape)) for x in jax.tree.leaves(params)}
  copies = re.findall(r"= f32\[([\d,]+)\]\S* copy\(", hlo)
  return [c for c in copies if c in shapes]


PARAMS = {"embed": jnp.ones((256, 64)), "q": jnp.ones((64, 64)), "up": jnp.ones((64, 160)),
          "norm": jnp.ones(64)}


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1}, {"restart_bias_correction": True}])
def test_dense_spam_step_has_no_moment_copies(kwargs):
  assert full_size_copies(spam.spam(1e-3, **kwargs), PARAMS) == []


def test_the_check_detects_copies():
  """A step that reads the old v after updating it in place does get a copy: the regex works."""

  def naive():
    def update(g, s, p=None):
      v_new = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, s, g)
      u = jax.tree.map(lambda g, v, vn: g / (jnp.sqrt(v) + 1e-6) + 0 * vn, g, s, v_new)
      return u, v_new
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), update)

  assert full_size_copies(naive(), PARAMS) != []


def test_abs_max_does_not_materialise_abs():
  """AdaClip's max|g| (spam_optax._xla_cpu.abs_max): no full-size |g| in the compiled reduction."""
  from spam_optax import _xla_cpu
  hlo = jax.jit(_xla_cpu.abs_max).lower(jnp.ones((256, 64))).compile().as_text()
  assert not re.findall(r"f32\[256,64\]\S* abs\(", hlo)
  naive = jax.jit(lambda g: jnp.max(jnp.abs(g))).lower(jnp.ones((256, 64))).compile().as_text()
  assert re.findall(r"f32\[256,64\]\S* abs\(", naive)  # the check sees the naive form's |g|
