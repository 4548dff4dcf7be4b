"""optax_decoupled: weight decay you can trust, as composable Optax transforms."""

import importlib.metadata as _metadata

from optax_decoupled._aliases import adam_l2 as adam_l2
from optax_decoupled._aliases import adamw as adamw
from optax_decoupled._aliases import bert_adamw as bert_adamw
from optax_decoupled._sgd_aliases import sgd_l2 as sgd_l2
from optax_decoupled._sgd_aliases import sgdw as sgdw
from optax_decoupled._audit import DecayAudit as DecayAudit
from optax_decoupled._audit import DecayAuditRow as DecayAuditRow
from optax_decoupled._audit import audit_decay as audit_decay
from optax_decoupled._couplings import COUPLINGS as COUPLINGS
from optax_decoupled._couplings import CoupledWeightDecay as CoupledWeightDecay
from optax_decoupled._couplings import convert_weight_decay as convert_weight_decay
from optax_decoupled._couplings import coupled_weight_decay as coupled_weight_decay
from optax_decoupled._couplings import normalized_weight_decay as normalized_weight_decay
from optax_decoupled._couplings import (
  timescale_from_weight_decay as timescale_from_weight_decay,
)
from optax_decoupled._couplings import (
  weight_decay_from_timescale as weight_decay_from_timescale,
)
from optax_decoupled._decay import DecayTowardState as DecayTowardState
from optax_decoupled._decay import DecoupledDecayState as DecoupledDecayState
from optax_decoupled._decay import WeightDecayState as WeightDecayState
from optax_decoupled._flat import FlatLayout as FlatLayout
from optax_decoupled._labels import Labels as Labels
from optax_decoupled._layer_decay import LayerDecay as LayerDecay
from optax_decoupled._layer_decay import layer_decay as layer_decay
from optax_decoupled._lr_scaling import scale_by_layer_decay as scale_by_layer_decay
from optax_decoupled._labels import labels as labels
from optax_decoupled._fused import fused_step as fused_step
from optax_decoupled._masks import resolve_mask as resolve_mask
from optax_decoupled._multipliers import DecayMultipliers as DecayMultipliers
from optax_decoupled._multipliers import decay_multipliers as decay_multipliers
from optax_decoupled._precision import LowPrecisionDecayWarning as LowPrecisionDecayWarning
from optax_decoupled._precision import StochasticRoundingState as StochasticRoundingState
from optax_decoupled._precision import stochastic_rounding as stochastic_rounding
from optax_decoupled._predicates import BERT_EXCLUDE as BERT_EXCLUDE
from optax_decoupled._predicates import Predicate as Predicate
from optax_decoupled._predicates import exclude_names as exclude_names
from optax_decoupled._predicates import include_names as include_names
from optax_decoupled._predicates import min_ndim as min_ndim
from optax_decoupled._rules import Decision as Decision
from optax_decoupled._report import MaskReport as MaskReport
from optax_decoupled._report import MaskRow as MaskRow
from optax_decoupled._report import describe_mask as describe_mask
from optax_decoupled._schedules import (
  cosine_warm_restarts_schedule as cosine_warm_restarts_schedule,
)
from optax_decoupled._transforms import add_decoupled_decay as add_decoupled_decay
from optax_decoupled._transforms import add_l2_to_grad as add_l2_to_grad
from optax_decoupled._transforms import scale_by_adam as scale_by_adam
from optax_decoupled._lr_scaling import scale_by_lr_multipliers as scale_by_lr_multipliers
from optax_decoupled._wrappers import with_decay_toward as with_decay_toward
from optax_decoupled._wrappers import with_decoupled_decay as with_decoupled_decay

try:
  __version__ = _metadata.version("optax_decoupled")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
  __version__ = "0.0.0"

__all__ = [
    "BERT_EXCLUDE",
    "COUPLINGS",
    "CoupledWeightDecay",
    "DecayAudit",
    "DecayAuditRow",
    "DecayMultipliers",
    "DecayTowardState",
    "Decision",
    "DecoupledDecayState",
    "FlatLayout",
    "Labels",
    "LayerDecay",
    "LowPrecisionDecayWarning",
    "MaskReport",
    "MaskRow",
    "Predicate",
    "StochasticRoundingState",
    "WeightDecayState",
    "adam_l2",
    "adamw",
    "add_decoupled_decay",
    "audit_decay",
    "add_l2_to_grad",
    "bert_adamw",
    "convert_weight_decay",
    "cosine_warm_restarts_schedule",
    "coupled_weight_decay",
    "decay_multipliers",
    "describe_mask",
    "exclude_names",
    "fused_step",
    "include_names",
    "labels",
    "layer_decay",
    "min_ndim",
    "normalized_weight_decay",
    "resolve_mask",
    "scale_by_adam",
    "scale_by_layer_decay",
    "scale_by_lr_multipliers",
    "sgd_l2",
    "sgdw",
    "stochastic_rounding",
    "timescale_from_weight_decay",
    "weight_decay_from_timescale",
    "with_decay_toward",
    "with_decoupled_decay",
]
