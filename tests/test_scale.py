"""SCALE: column normalisation, momentum only on the output layer, convergence."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import spam_optax as spam


def test_columns_have_unit_norm_and_vectors_too():
  g = {"w": jnp.arange(12.0).reshape(3, 4) - 5, "norm": jnp.array([3.0, 4.0]), "s": jnp.float32(2.0)}
  u, _ = spam.scale_by_column_norm().update(g, optax.EmptyState())
  np.testing.assert_allclose(np.linalg.norm(np.asarray(u["w"]), axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(u["norm"]), [0.6, 0.8], rtol=1e-6)
  assert float(u["s"]) == 2.0
  z, _ = spam.scale_by_column_norm().update({"w": jnp.zeros((2, 2))}, optax.EmptyState())
  assert np.isfinite(np.asarray(z["w"])).all()


def test_momentum_state_only_for_the_output_layer():
  p = {"embed": jnp.ones((10, 4)), "layer": {"mlp": jnp.ones((4, 4))}, "lm_head": jnp.ones((4, 10))}
  state = spam.scale(1e-2).init(p)
  sizes = [x.size for x in jax.tree.leaves(state) if x.ndim]
  assert sizes == [40]  # just the LM head's momentum
  g = jax.tree.map(jnp.ones_like, p)
  tx = spam.scale(1.0)
  s = tx.init(p)
  u1, s = tx.update(g, s, p)
  u2, s = tx.update(g, s, p)
  chex.assert_trees_all_close(u1["embed"], u2["embed"])  # no momentum: same step
  np.testing.assert_allclose(np.asarray(u2["lm_head"]), 1.9 * np.asarray(u1["lm_head"]), rtol=1e-6)


def test_scale_decreases_a_least_squares_loss():
  x = jax.random.normal(jax.random.key(0), (64, 8))
  w_true = jax.random.normal(jax.random.key(1), (8, 3))
  y = x @ w_true
  loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
  p = {"w": jnp.zeros((8, 3)), "b": jnp.zeros(3)}
  tx = spam.scale(optax.cosine_decay_schedule(0.1, 300))
  s = tx.init(p)
  first = float(loss(p))
  for _ in range(300):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    p = optax.apply_updates(p, u)
  assert float(loss(p)) < 0.05 * first
