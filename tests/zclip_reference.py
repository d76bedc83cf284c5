"""A float64 NumPy transcription of ZClip 1.0.0 (PyPI ``zclip``, ``zclip/zclip.py``), one step at a time.

Written from the released source, statement by statement, without torch: the warm-up buffer
(two-pass mean and population variance when it is full, clip_grad_norm_-style clipping meanwhile),
``_compute_clip_val`` (percentile / zscore with adaptive_scaling or mean), ``_apply_clipping`` (the
max_grad_norm cap, ``coef = e / (n + 1e-6)`` only when ``n > e``) and ``_update_ema`` (mean first,
variance with the new mean), with ``skip_update_on_spike``.
"""

from __future__ import annotations

import numpy as np


class ZClipReference:

  def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6, warmup_steps=25,
               mode="zscore", clip_option="adaptive_scaling", clip_factor=1.0,
               skip_update_on_spike=False):
    self.alpha, self.z_thresh, self.max_grad_norm, self.eps = alpha, z_thresh, max_grad_norm, eps
    self.warmup_steps, self.mode, self.clip_factor = warmup_steps, mode.lower(), clip_factor
    self.skip_update_on_spike = skip_update_on_spike
    self.clip_option = clip_option.lower() if self.mode == "zscore" else None
    self.buffer, self.initialized, self.mean, self.var = [], False, None, None

  def _compute_clip_val(self, n):
    std = self.var ** 0.5
    if self.mode == "percentile":
      threshold = self.mean + self.z_thresh * std
      if n > threshold:
        return threshold
    else:
      z = (n - self.mean) / (std + self.eps)
      if z > self.z_thresh:
        if self.clip_option == "adaptive_scaling":
          eta = z / self.z_thresh
          return (self.mean + (self.z_thresh * std) / eta) * self.clip_factor
        return self.mean
    return None

  def step(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Returns the clipped gradients (float64) and advances the statistics."""
    grads = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    n = float(np.sqrt(sum(np.linalg.norm(g.ravel()) ** 2 for g in grads.values())))
    if not self.initialized:
      self.buffer.append(n)
      if len(self.buffer) >= self.warmup_steps:
        self.mean = sum(self.buffer) / len(self.buffer)
        self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
        self.initialized, self.buffer = True, []
      if self.max_grad_norm is not None:  # torch.nn.utils.clip_grad_norm_
        coef = min(1.0, self.max_grad_norm / (n + 1e-6))
        grads = {k: g * coef for k, g in grads.items()}
      return grads
    clip_val = self._compute_clip_val(n)
    adaptive = clip_val if clip_val is not None else n
    effective = min(adaptive, self.max_grad_norm) if self.max_grad_norm is not None else adaptive
    coef = effective / (n + 1e-6) if n > effective else 1.0
    if coef < 1.0:
      grads = {k: g * coef for k, g in grads.items()}
    if clip_val is not None and self.skip_update_on_spike:
      return grads
    x = clip_val if clip_val is not None else n
    self.mean = self.alpha * self.mean + (1 - self.alpha) * x
    self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
    return grads
