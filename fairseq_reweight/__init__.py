"""fairseq_reweight: Learning to Reweight with Deep Interactions (Fan et al., AAAI 2021) for fairseq.

Use as ``fairseq-train ... --user-dir fairseq_reweight --task reweighted_translation
--criterion reweighted_label_smoothed_cross_entropy --reweight-method deep``.
The framework-agnostic core (teachers, meta-gradients, diagnostics) is :mod:`fairseq_reweight.core`.
"""

__version__ = "0.1.0"

import sys as _sys

# fairseq's --user-dir imports this package with fairseq already loaded: register the task and the criterion
# then. Anything else (`python -m fairseq_reweight.noise`, the image module, the core, analysis scripts) starts
# without importing fairseq (~3 s); `import fairseq_reweight.task` registers them explicitly.
if "fairseq" in _sys.modules:
    from . import compat, criterion, task  # noqa: F401  (compat: checkpoint loading under torch >= 2.6)
