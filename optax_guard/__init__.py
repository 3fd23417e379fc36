"""optax_guard: keep training alive when gradients explode, and show why.

Composable `optax` gradient transformations that clip, skip and monitor inside
the jitted step, carrying their statistics in the optimizer state; read them
with `optax_guard.metrics(opt_state)`.
"""

from optax_guard._adaptive import adaptive_grad_clip
from optax_guard._adaptive import AdaptiveGradClipState
from optax_guard._adaptive import autoclip
from optax_guard._adaptive import AutoclipState
from optax_guard._adaptive import zclip
from optax_guard._adaptive import ZclipState
from optax_guard._check import check
from optax_guard._check import GradientExplosionError
from optax_guard._check import GuardError
from optax_guard._check import NonFiniteGradientError
from optax_guard._clipping import clip_by_global_norm
from optax_guard._clipping import clip_by_layer_norm
from optax_guard._clipping import clip_by_value
from optax_guard._clipping import ClipByGlobalNormState
from optax_guard._clipping import ClipByLayerNormState
from optax_guard._clipping import ClipByValueState
from optax_guard._decay import add_decayed_weights
from optax_guard._decay import add_l1_penalty
from optax_guard._decay import add_l2_penalty
from optax_guard._decay import AddDecayedWeightsState
from optax_guard._decay import AddL1PenaltyState
from optax_guard._decay import AddL2PenaltyState
from optax_guard._decay import decay_mask
from optax_guard._diagnose import diagnose
from optax_guard._diagnose import Diagnosis
from optax_guard._guard import guard
from optax_guard._guard import GuardState
from optax_guard._log import MetricsLog
from optax_guard._metrics import metrics
from optax_guard._metrics import PerLayer
from optax_guard._monitor import monitor
from optax_guard._monitor import MonitorState
from optax_guard._nonfinite import skip_nonfinite
from optax_guard._nonfinite import skip_nonfinite_microbatch
from optax_guard._nonfinite import SkipNonfiniteState
from optax_guard._nonfinite import zero_nonfinite
from optax_guard._nonfinite import ZeroNonfiniteState
from optax_guard._optimizers import adam
from optax_guard._optimizers import AdamState
from optax_guard._optimizers import adamw
from optax_guard._optimizers import AdamwState
from optax_guard._optimizers import GuardAwareTransformation
from optax_guard._optimizers import sgd
from optax_guard._optimizers import SgdState
from optax_guard._penalties import add_gradient_norm_penalty
from optax_guard._penalties import AddGradientNormPenaltyState
from optax_guard._penalties import gradient_norm_penalty
from optax_guard._penalties import input_gradient_penalty
from optax_guard._spikes import skip_spikes
from optax_guard._spikes import SkipSpikesState
from optax_guard._stats import HIST_BUCKETS

__version__ = "0.1.0"

__all__ = (
    "AdaptiveGradClipState",
    "AutoclipState",
    "ZclipState",
    "adaptive_grad_clip",
    "AddDecayedWeightsState",
    "AddL1PenaltyState",
    "AddL2PenaltyState",
    "add_decayed_weights",
    "add_l1_penalty",
    "add_l2_penalty",
    "decay_mask",
    "AddGradientNormPenaltyState",
    "add_gradient_norm_penalty",
    "gradient_norm_penalty",
    "input_gradient_penalty",
    "autoclip",
    "zclip",
    "AdamState",
    "AdamwState",
    "GuardAwareTransformation",
    "SgdState",
    "adam",
    "adamw",
    "sgd",
    "GradientExplosionError",
    "GuardState",
    "guard",
    "GuardError",
    "NonFiniteGradientError",
    "SkipNonfiniteState",
    "SkipSpikesState",
    "ZeroNonfiniteState",
    "check",
    "skip_nonfinite",
    "skip_nonfinite_microbatch",
    "skip_spikes",
    "zero_nonfinite",
    "ClipByGlobalNormState",
    "ClipByLayerNormState",
    "ClipByValueState",
    "HIST_BUCKETS",
    "MonitorState",
    "PerLayer",
    "clip_by_global_norm",
    "clip_by_layer_norm",
    "clip_by_value",
    "metrics",
    "Diagnosis",
    "diagnose",
    "MetricsLog",
    "monitor",
)
