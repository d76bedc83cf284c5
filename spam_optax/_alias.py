"""`spam`: the SPAM optimizer as one optax chain of this package's pieces."""

from __future__ import annotations

import chex
import optax

from spam_optax import _validate
from spam_optax._adam_reset import scale_by_adam_with_reset
from spam_optax._schedules import reset_warmup_schedule
from spam_optax._sparse import sparse_mask
from spam_optax._weight_decay import add_decayed_weights


def spam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    threshold: float = 5000.0,
    reset_interval: int = 500,
    warmup_steps: int = 150,
    clip_delay: int = 20,
    density: float = 1.0,
    key: chex.PRNGKey | None = None,
    sparse_leaves=None,
    sparse_row_multiple: int | None = None,
    weight_decay: float = 0.0,
    mu_dtype=None,
    nu_dtype=None,
    restart_bias_correction: bool = False,
    rounding: str = "stochastic",
    count_clipped: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""SPAM: Spike-Aware Adam with Momentum Reset, update for update as the authors' code.

  For update ``k = 1, 2, ...`` with ``t = k mod ΔT``:

  1. if ``t = 0``: ``m, v <- 0`` (the bias-correction count keeps the global ``k``);
  2. ``g <- sign(g) sqrt(θ v)`` where ``g² > θ v`` (previous raw ``v``), except while
     ``k < clip_delay`` or ``t < clip_delay``;
  3. ``m <- β1 m + (1-β1) g``, ``v <- β2 v + (1-β2) g²``;
  4. ``u = sqrt(1-β2^k) / (1-β1^k) * m / (sqrt(v) + ε)``;
  5. ``p <- p - lr_k * s(t) * u`` with the warmup factor ``s`` of `reset_warmup_schedule`
     (``s = 1`` before the first reset), plus decoupled weight decay ``- lr_k * wd * p``.

  It is exactly this chain, except that the clip and Adam share one ``v`` (so the state holds one
  ``m`` and one ``v`` per parameter, like Adam)::

    optax.chain(spam.spike_clip(θ, b2=b2, reset_interval=ΔT, clip_delay=cd),
                spam.scale_by_adam_with_reset(b1, b2, eps, reset_interval=ΔT),
                optax.scale_by_schedule(spam.reset_warmup_schedule(ΔT, N)),
                optax.scale_by_learning_rate(lr))

  With ``count_clipped=True`` the state reports how many gradient entries the last update
  clipped, summed over leaves (int32, on the subsets for sparse leaves):
  ``optax.tree.get(state, "num_clipped")``, also through ``optax.MultiSteps`` and
  ``optax.inject_hyperparams``. It is off by default because counting is a separate pass over
  ``g`` and ``v``: on XLA:CPU it doubled the update's time (LLaMA-60M shapes, 2.3x optax.adamw
  against 1.14x without it); the training script turns it on for its spike metrics.

  With ``density < 1`` the moments exist only for a random subset of each sparse leaf
  (`sparse_mask`), re-drawn at every reset; the other entries are not updated.

  Low-precision state: with ``mu_dtype`` / ``nu_dtype`` narrower than float32 (bfloat16) the
  moments are computed in float32 and stochastically rounded when stored (``rounding``), so that
  ``E[stored] = x`` and ``v`` still grows and decays as in float32; ``rounding="nearest"`` gives the
  authors' pure-bf16 behaviour (``v`` stuck at 0.25 under a unit gradient). See
  `scale_by_adam_with_reset`.

  Weight decay uses ``optax.add_decayed_weights`` (the pre-update parameters); the authors decay
  the post-step parameters, a difference of order ``lr² wd``. Every published run used 0.

  NaN and inf gradients: an inf entry is clipped to ``sqrt(θ v)`` once clipping is active (before
  that it makes the update NaN); a NaN entry poisons that entry's moments, and so its parameter,
  until the next reset. Wrap the optimizer in ``optax.apply_if_finite`` to skip such steps.

  Example:
    >>> import jax, jax.numpy as jnp, optax, spam_optax as spam
    >>> tx = spam.spam(1e-3, count_clipped=True)
    >>> params = {"w": jnp.ones((3, 2))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> optax.tree.get(state, "num_clipped")  # gradient entries clipped by the last update
    Array(0, dtype=int32)
    >>> sparse = spam.spam(4e-3, density=0.25, key=jax.random.key(0))
    >>> half = spam.spam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)  # 4 bytes/param

  Args:
    learning_rate: a float or an optax schedule (the paper: linear warmup then cosine).
    b1, b2, eps: Adam's decays and ε (added to the un-corrected ``sqrt(v)``).
    threshold: θ, the spike threshold on ``g²/v``; 0 disables clipping.
    reset_interval: ΔT, updates between momentum resets.
    warmup_steps: N, updates of cosine warmup after each reset; must be < ``reset_interval``.
    clip_delay: updates without clipping at the start and after every reset.
    density: d in (0, 1], the fraction of each sparse leaf that carries momentum. It fixes the
      state's shapes, so under ``optax.inject_hyperparams`` pass ``static_args=("density", "key")``.
    key: a `jax.random.key`, required when ``density < 1``.
    sparse_leaves: which leaves are sparse (pytree of bools or callable); default ndim >= 2.
    sparse_row_multiple: `sparse_mask`'s ``row_multiple``: the number of entries kept per column
      is a multiple of it (set it to the mesh axes that split the rows, see `sparse_mask`);
      None: 1. Like ``density`` it fixes state shapes: under ``optax.inject_hyperparams`` add it
      to ``static_args`` when you set it.
    weight_decay: decoupled weight decay (default 0). Sparse leaves decay on their subset only.
    mu_dtype, nu_dtype: dtypes of ``m`` and ``v``; default: the parameters' dtype.
    restart_bias_correction: count bias correction from the last reset (not the authors' code).
    count_clipped: keep ``num_clipped`` in the state (see above).
    rounding: ``"stochastic"`` (default) or ``"nearest"``: how moments are stored in a dtype
      narrower than float32. No effect on float32 state.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training, ICLR 2025.
  """
  _validate.check("learning_rate", learning_rate, lambda x: x >= 0, ">= 0")
  _validate.check("threshold", threshold, lambda x: x >= 0, ">= 0")
  _validate.check("density", density, lambda d: 0.0 < d <= 1.0, "in (0, 1]")
  _validate.check("weight_decay", weight_decay, lambda x: x >= 0, ">= 0")
  # Under optax.inject_hyperparams every numeric argument, density included, arrives traced: the
  # dense path needs no density, and the sparse one needs static_args=("density", "key").
  d = _validate.concrete(density)
  sparse = d != 1.0 if d is not None else key is not None
  if sparse and key is None:
    raise ValueError("key must be a jax.random.key when density < 1 (the sparse subsets derive from it)")

  core = [
      scale_by_adam_with_reset(
          b1, b2, eps, reset_interval=reset_interval, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
          restart_bias_correction=restart_bias_correction,
          clip_threshold=threshold, clip_delay=clip_delay, rounding=rounding,
          count_clipped=count_clipped,
      ),
      optax.scale_by_schedule(reset_warmup_schedule(reset_interval, warmup_steps)),
      add_decayed_weights(weight_decay),
  ]
  core = optax.chain(*core)
  if sparse:
    core = sparse_mask(core, density, reset_interval=reset_interval, key=key, leaves=sparse_leaves,
                       row_multiple=sparse_row_multiple or 1)
  return optax.chain(core, optax.scale_by_learning_rate(learning_rate))
