"""Run with 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8); prints OK at the end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import spam_optax as spam

assert jax.device_count() == 8, jax.devices()
kw = dict(reset_interval=4, warmup_steps=2, clip_delay=2, threshold=5.0)
params = {"w": jnp.linspace(-1, 1, 64 * 32).reshape(64, 32), "b": jnp.linspace(0, 1, 32)}
grads = [jax.tree.map(lambda x, k=k: jnp.sin(x * (k + 1)) * (40.0 if k == 5 else 1.0), params) for k in range(9)]


def run(tx, shard=None):
  p = params if shard is None else jax.device_put(params, shard)
  state = tx.init(p)

  @jax.jit
  def step(p, state, g):
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state

  for g in grads:
    p, state = step(p, state, g if shard is None else jax.device_put(g, shard))
  return p, state


mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
shard = {"w": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P(None))}
for density in (1.0, 0.25):
  tx = spam.spam(1e-2, density=density, key=jax.random.key(0), **kw)
  ref, _ = run(tx)
  got, state = run(tx, shard)
  for n in ref:
    np.testing.assert_allclose(np.asarray(got[n]), np.asarray(ref[n]), rtol=1e-5, atol=1e-7)
  if density == 1.0:  # dense moments follow the parameters' sharding
    inner = state[0][0]
    assert inner.mu["w"].sharding.is_equivalent_to(shard["w"], 2), inner.mu["w"].sharding
    assert inner.nu["w"].sharding.is_equivalent_to(shard["w"], 2), inner.nu["w"].sharding

# pmap: every device draws the same subsets and computes the same update from the same gradients.
tx = spam.spam(1e-2, density=0.25, key=jax.random.key(1), **kw)
rep = lambda t: jax.tree.map(lambda x: jnp.stack([x] * 8), t)
p, state = rep(params), rep(tx.init(params))


def pstep(p, state, g):
  g = jax.lax.pmean(g, "i")
  u, state = tx.update(g, state, p)
  return optax.apply_updates(p, u), state


pstep = jax.pmap(pstep, axis_name="i")
for g in grads:
  p, state = pstep(p, state, rep(g))
w = np.asarray(p["w"])
assert all((w[i] == w[0]).all() for i in range(8))
single, _ = run(tx)
np.testing.assert_allclose(w[0], np.asarray(single["w"]), rtol=1e-5, atol=1e-7)
print("OK")
