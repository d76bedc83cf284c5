"""A NumPy float64 reference of SPAM written from ../shared/SPEC.md §1, one update at a time."""

from __future__ import annotations

import math

import numpy as np


def warmup_factor(k: int, reset_interval: int, warmup_steps: int) -> float:
  t = k % reset_interval
  if k < reset_interval or t >= warmup_steps:
    return 1.0
  return 1.0 - 0.99 * (1.0 + math.cos(math.pi * t / (warmup_steps + 1))) / 2.0


def spam_trajectory(p0, grad_fn, steps, *, lr=1e-3, b1=0.9, b2=0.999, eps=1e-6, threshold=5000.0,
                    reset_interval=500, warmup_steps=150, clip_delay=20, weight_decay=0.0,
                    restart_bias_correction=False):
  """Parameters after each of `steps` updates; `grad_fn(p, k)` gives the gradient of update k."""
  p = {n: np.asarray(x, np.float64) for n, x in p0.items()}
  m = {n: np.zeros_like(x) for n, x in p.items()}
  v = {n: np.zeros_like(x) for n, x in p.items()}
  out = []
  for k in range(1, steps + 1):
    lr_k = lr(k - 1) if callable(lr) else lr
    grads = grad_fn(p, k)
    if k % reset_interval == 0:  # 1. reset, bias correction keeps k
      m = {n: np.zeros_like(x) for n, x in m.items()}
      v = {n: np.zeros_like(x) for n, x in v.items()}
    kb = k
    if restart_bias_correction and k >= reset_interval:
      kb = k % reset_interval + 1
    s = warmup_factor(k, reset_interval, warmup_steps)
    new_p = {}
    for n in p:
      g = np.asarray(grads[n], np.float64)
      if threshold > 0 and k >= clip_delay and k % reset_interval >= clip_delay:  # 2. clip
        spike = g**2 > threshold * v[n]
        g = np.where(spike, np.sign(g) * np.sqrt(threshold * v[n]), g)
      m[n] = b1 * m[n] + (1 - b1) * g  # 3. moments
      v[n] = b2 * v[n] + (1 - b2) * g**2
      u = math.sqrt(1 - b2**kb) / (1 - b1**kb) * m[n] / (np.sqrt(v[n]) + eps)  # 4.
      # 5-6. warmup factor on top of the lr; decoupled decay on the pre-update parameters.
      new_p[n] = p[n] - lr_k * s * u - lr_k * weight_decay * p[n]
    p = new_p
    out.append({n: x.copy() for n, x in p.items()})
  return out
