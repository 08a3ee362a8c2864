"""Glue between an image classifier and the reweighting core -- the image twin of
:meth:`fairseq_reweight.task.ReweightedTranslationTask.train_step` / ``_meta_grad_fn``.

Teacher inputs per method (flags and semantics as on the NMT side):

* ``mwnet`` (Shu et al. 2019): the example's loss;
* ``deep`` (Fan et al. 2021): the pooled internal states chosen by ``--teacher-states`` (``last`` =
  the penultimate features, ``all``, or 1-based stage indices like ``1,3``), the loss, the observed
  label (one-hot, which the teacher's first linear layer turns into a learned label embedding) and
  the training progress in [0, 1]; the label and the progress are already bounded and bypass
  the teacher's input standardisation;
* ``l2rw`` (Ren et al. 2018) and ``none``: no teacher.

The meta-gradient replays the student with ``torch.func.functional_call``. Replays run in train
mode (batch statistics, like the real forward), but on *copies* of the BatchNorm buffers, so
the look-ahead and finite-difference passes never move the running statistics.
"""

from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core import MetaGrad, functional_call, parse_states_spec
from ..core.strategies.lookahead import replayed


class StudentOutput(NamedTuple):
    logits: torch.Tensor  # [B, K], with graph
    losses: torch.Tensor  # [B] per-example cross entropy on the observed labels, with graph
    states: List[torch.Tensor]  # pooled stage outputs [B, C_s], detached (empty unless asked for)


def parse_teacher_states(spec: str, num_states: int) -> List[int]:
    """``last``, ``all`` or 1-based indices like ``1,3`` -> 0-based state indices."""
    return parse_states_spec(spec, num_states, "stages")


def forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, states: bool) -> StudentOutput:
    if states:
        logits, pooled = model(x, states=True)
        pooled = [s.detach() for s in pooled]
    else:
        logits, pooled = model(x), []
    return StudentOutput(logits, F.cross_entropy(logits, y, reduction="none"), pooled)


def teacher_features(method: str, out: StudentOutput, labels: torch.Tensor, num_classes: int,
                     layers: List[int], progress: float) -> Optional[torch.Tensor]:
    """The teacher's ``[B, D]`` input for ``method`` (None for methods without a teacher)."""
    loss = out.losses.detach().float().unsqueeze(1)
    if method == "mwnet":
        return loss
    if method != "deep":
        return None
    label = F.one_hot(labels, num_classes).float()
    prog = torch.full_like(loss, progress)
    return torch.cat([out.states[i].float() for i in layers] + [loss, label, prog], 1)


def passthrough(method: str, num_classes: int) -> int:
    """Trailing feature columns the teacher should not standardise: the one-hot label and the progress."""
    return num_classes + 1 if method == "deep" else 0


def replay_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of the buffers (BatchNorm running statistics) for one functional replay to scribble on."""
    return {n: b.clone() for n, b in model.named_buffers()}


def probe_layers(model: nn.Module, spec: str):
    """``--meta-params`` for images -> ``[(name, module, 0)]``: ``fc`` (the classifier), ``block`` (the
    convolutions of the last residual block), ``stage`` (every convolution of the last stage), ``all``
    (every convolution); comma-separated, e.g. ``stage,fc``; ``auto`` = ``fc``.

    Only the classifier's per-example gradients are exact: a convolution followed by BatchNorm (in
    train mode) couples the examples of a batch, so the gradient the student's backward leaves at its
    output mixes in the other examples' losses."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if parts == ["auto"]:
        parts = ["fc"]
    chosen = {}
    last_stage = model.stages[-1]
    for part in parts:
        if part == "fc":
            chosen["fc"] = model.fc
        elif part in ("block", "stage", "all"):
            root = {"block": last_stage[-1], "stage": last_stage, "all": model}[part]
            prefix = {"block": f"stages.{len(model.stages) - 1}.{len(last_stage) - 1}.",
                      "stage": f"stages.{len(model.stages) - 1}.", "all": ""}[part]
            chosen.update({prefix + n: m for n, m in root.named_modules() if isinstance(m, nn.Conv2d)})
        else:
            raise ValueError(f"--meta-params {spec!r}: use auto, or a comma-separated list of fc, block, stage, all")
    return [(n, m, 0) for n, m in chosen.items()]


def meta_loss(model: nn.Module, meta_x: torch.Tensor, meta_y: torch.Tensor) -> torch.Tensor:
    """The clean loss of a meta batch in train mode, on copies of the BatchNorm buffers (so the meta
    pass does not move the running statistics)."""
    return F.cross_entropy(functional_call(model, replay_buffers(model), (meta_x,)), meta_y)


def lookahead(model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta_x: torch.Tensor, meta_y: torch.Tensor):
    """``(params, train_losses(p), meta_loss(p))`` for the look-ahead meta-gradient (core/strategies/lookahead.py):
    functional replays in train mode on copies of the BatchNorm buffers."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def call(p, inputs):
        return functional_call(model, {**replay_buffers(model), **p}, (inputs,))

    return (params, lambda p: F.cross_entropy(call(p, x), y, reduction="none"),
            lambda p: F.cross_entropy(call(p, meta_x), meta_y))


def meta_grad_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, losses: torch.Tensor,
                 meta_x: torch.Tensor, meta_y: torch.Tensor, lr: float, mode: str = "fd",
                 fd_eps: float = 1e-3, rng=None) -> Callable[[torch.Tensor], MetaGrad]:
    """``w -> dL_meta(theta'(w))/dw`` for one training batch (see :func:`weight_gradient`).

    ``losses``: the real forward's per-example losses (with graph); ``rng``: the RNG state
    captured just before that forward, so replays see the same random state. The normaliser
    is the batch size (the student minimises ``sum_i w_i l_i / B``).
    """
    return replayed(lookahead(model, x, y, meta_x, meta_y), losses, lr, float(len(y)), mode, fd_eps, rng)
