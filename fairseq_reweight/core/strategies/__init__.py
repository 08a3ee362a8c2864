"""How the teacher learns: one meta-gradient strategy per ``--meta-grad``, picked from :data:`STRATEGIES`.

The fairseq task and the image trainer drive the same strategy objects through the same hooks. Per
(micro-)batch, in this order::

    s.begin_update(step, real=..., params=..., meta_loss=..., optimizer=...)  # fast: the meta direction
    with s.forward(device):
        out = student(batch)                                  # per-example losses (and states)
    w, info = s.weights(step, features, losses, lr=..., denom=..., lookahead=...)
    backward(sum_i w_i * loss_i)                              # the student's own backward
    s.after_backward(w, info)                                 # fast: the teacher's meta-gradient from it

and once per update, after the student's optimizer step::

    s.end_update(step)                                        # teacher step (fast), input moments, sync check

``real=False`` marks a batch without a gradient (fairseq's padding batches under data parallelism): it gets
uniform weights but takes part in every collective the other workers issue.

``fast``   :class:`FastMetaGrad` -- first order, on the layers of ``--meta-params``, from the student's own
           forward and backward (``core/probe.py``); the default.
``fd``     :class:`LookAhead` -- all parameters through the one-step look-ahead, finite differences.
``exact``  :class:`LookAhead` -- second-order autograd through the look-ahead (the reference).
"""

from .fast import FastMetaGrad
from .lookahead import LookAhead

STRATEGIES = {"fast": FastMetaGrad, "fd": LookAhead, "exact": LookAhead}


def build(meta_grad: str, reweighter, **options):
    """The strategy of ``--meta-grad meta_grad`` for ``reweighter`` (options: see each class)."""
    if str(meta_grad) not in STRATEGIES:
        raise ValueError(f"--meta-grad must be one of {', '.join(STRATEGIES)}, got {meta_grad!r}")
    return STRATEGIES[str(meta_grad)](reweighter, mode=str(meta_grad), **options)


__all__ = ["FastMetaGrad", "LookAhead", "STRATEGIES", "build"]
