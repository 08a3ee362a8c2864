"""Framework-agnostic reweighting core (pure torch): teachers, weight normalisation,
meta-gradients (exact and fast), diagnostics. Used unchanged by the fairseq plugin and the
image module."""

from .diagnostics import WeightDumper, auc, weight_stats
from .metagrad import MetaGrad, capture_rng, fixed_rng, functional_call, weight_gradient
from .probe import LayerProbe, MetaDirection, adam_precondition, first_order, frozen, meta_direction
from .config import META_GRADS, METHODS, RECIPES, ReweightConfig, add_arguments
from .reweighter import Reweighter
from .teacher import RunningNorm, Teacher, parse_states_spec
from .weights import l2rw_weights, normalize

__all__ = [
    "LayerProbe", "META_GRADS", "MetaDirection", "METHODS", "MetaGrad", "Reweighter", "ReweightConfig", "RECIPES", "add_arguments", "RunningNorm", "Teacher", "WeightDumper", "adam_precondition", "auc", "capture_rng",
    "first_order", "fixed_rng", "functional_call", "frozen", "meta_direction", "l2rw_weights", "normalize", "parse_states_spec", "weight_gradient", "weight_stats",
]
