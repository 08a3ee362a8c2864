"""fairseq_reweight: Learning to Reweight with Deep Interactions (Fan et al., AAAI 2021) for fairseq.

Use as ``fairseq-train ... --user-dir fairseq_reweight --task reweighted_translation
--criterion reweighted_label_smoothed_cross_entropy --reweight-method deep``.
The framework-agnostic core (teachers, meta-gradients, diagnostics) is :mod:`fairseq_reweight.core`.
"""

__version__ = "0.1.0"

from . import compat  # noqa: F401  (checkpoint loading under torch >= 2.6)

try:
    import fairseq  # noqa: F401
except ImportError:  # the core and the image module work without fairseq
    pass
else:
    from . import criterion, task  # noqa: F401  (registers the task and the criterion)
