"""The optax battery's jit check, shared by the tests of every optimizer: updates under jax.jit
trace once and leave every state dtype as init made it."""

import chex
import jax
import optax


def jitted_steps(tx, params, steps: int):
  """`steps` jitted updates + apply_updates; returns (params, state, last updates)."""
  chex.clear_trace_counter()  # the counter is keyed by code location, shared by every caller
  state = tx.init(params)
  dtypes = jax.tree.map(lambda x: x.dtype, state)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, state):
    u, state = tx.update(p, state, p)
    return optax.apply_updates(p, u), state, u

  for _ in range(steps):
    params, state, updates = step(params, state)
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x.dtype, state), dtypes)
  return params, state, updates
