"""SPAM and Stable-SPAM as composable optax gradient transformations.

References:
  Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training", ICLR 2025.
"""

from spam_optax._adam_reset import (
    ScaleByAdamWithResetState,
    ScaleBySpamAdamState,
    scale_by_adam_with_reset,
)
from spam_optax._alias import spam
from spam_optax._scale import scale, scale_by_column_norm
from spam_optax._schedules import reset_warmup_schedule
from spam_optax._sparse import SparseMaskState, sparse_mask
from spam_optax._spike_clip import SpikeClipState, spike_clip
from spam_optax._adaptive_clip import AdaptiveSpikeClipState, adaptive_spike_clip
from spam_optax._adaptive_norm import AdaptiveGradNormState, adaptive_grad_norm
from spam_optax._spike_monitor import (
    SpikeMonitorState,
    group_by_layer_type,
    layer_type,
    spike_counts,
    spike_monitor,
)
from spam_optax._skip import SkipStepOnSpikesState, skip_step_on_spikes
from spam_optax._zclip import ZClipState, zclip
from spam_optax._stable_spam import (
    ScaleByStableSpamAdamState,
    scale_by_stable_spam_adam,
    stable_spam,
    stable_spam_momentum_scale,
)

__all__ = [
    "ScaleByAdamWithResetState",
    "ScaleBySpamAdamState",
    "SparseMaskState",
    "SpikeClipState",
    "reset_warmup_schedule",
    "scale",
    "scale_by_column_norm",
    "scale_by_adam_with_reset",
    "sparse_mask",
    "spam",
    "spike_clip",
    "AdaptiveGradNormState",
    "AdaptiveSpikeClipState",
    "ScaleByStableSpamAdamState",
    "SpikeMonitorState",
    "adaptive_grad_norm",
    "adaptive_spike_clip",
    "group_by_layer_type",
    "layer_type",
    "scale_by_stable_spam_adam",
    "spike_counts",
    "spike_monitor",
    "stable_spam",
    "stable_spam_momentum_scale",
    "SkipStepOnSpikesState",
    "skip_step_on_spikes",
    "ZClipState",
    "zclip",
]
