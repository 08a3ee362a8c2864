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
from ..core.replay import TailReplay
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


def loss_column(features: torch.Tensor, method: str, num_classes: int) -> int:
    """The index of the loss among the teacher's inputs (:func:`teacher_features`): the last standardised one."""
    return features.shape[1] - passthrough(method, num_classes) - 1


def passthrough(method: str, num_classes: int) -> int:
    """Trailing feature columns the teacher should not standardise: the one-hot label and the progress."""
    return num_classes + 1 if method == "deep" else 0


def replay_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of the buffers (BatchNorm running statistics) for one functional replay to scribble on."""
    return {n: b.clone() for n, b in model.named_buffers()}


class _Tail(nn.Module):
    """The part of an :class:`~.models.ImageStudent` from ``blocks[0]``'s input to the logits (references to the
    student's own modules: its state dict is untouched)."""

    def __init__(self, model: nn.Module, blocks: List[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head_norm, self.fc = model.head_norm, model.fc

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return self.fc(self.head_norm(h).mean((2, 3)))


def tail_replay(model: nn.Module, part: str, labels: Callable[[], torch.Tensor], fd_eps: float = 1e-3) -> TailReplay:
    """``--meta-params block`` / ``stage`` / ``all``: the exact per-example meta-gradient on the student from the
    last residual block / the last stage / the stem on (core/replay.py), every BatchNorm and the classifier
    included; ``labels()``: the current training batch's labels."""
    last = model.stages[-1]
    if part == "all":
        tail, entry, name = model, model, "every layer"
    else:
        blocks = [last[-1]] if part == "block" else [last]
        tail = _Tail(model, blocks)
        entry = blocks[0]
        where = (f"stages.{len(model.stages) - 1}.{len(last) - 1}" if part == "block"
                 else f"stages.{len(model.stages) - 1}")
        name = f"{where} + classifier"
    params = {n: p for n, p in tail.named_parameters() if p.requires_grad}

    def replay(p: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        buffers = {n: b.clone() for n, b in tail.named_buffers()}  # BatchNorm statistics stay where they are
        return F.cross_entropy(functional_call(tail, {**buffers, **p}, (x,)), labels(), reduction="none")

    return TailReplay(name, entry, params, replay, fd_eps)


def probe_layers(model: nn.Module, spec: str, labels: Optional[Callable[[], torch.Tensor]] = None,
                 fd_eps: float = 1e-3):
    """``--meta-params`` for images: ``fc`` (the classifier; probed, exact: no BatchNorm above it), ``block`` (the
    last residual block on), ``stage`` (the last stage on), ``all`` (every layer); ``auto`` = ``stage``. A list may
    name several (``stage,fc``): the deepest one decides, the classifier is always part of a tail.

    ``fc`` alone gives ``[(name, module, 0)]`` for a :class:`~..core.probe.LayerProbe`; the others a
    :class:`~..core.replay.TailReplay` (``labels()``: the current batch's labels), because a convolution followed
    by BatchNorm (train mode) couples the examples of a batch: the gradient the student's backward leaves at its
    output mixes in the other examples' losses, so probes there are not exact."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if parts == ["auto"]:
        parts = ["stage"]
    bad = [p for p in parts if p not in ("fc", "block", "stage", "all")]
    if bad or not parts:
        raise ValueError(f"--meta-params {spec!r}: use auto, or a comma-separated list of fc, block, stage, all")
    deepest = next((p for p in ("all", "stage", "block") if p in parts), None)
    if deepest is None:
        return [("fc", model.fc, 0)]
    return tail_replay(model, deepest, labels or _no_labels, fd_eps)


def _no_labels() -> torch.Tensor:
    raise RuntimeError("a tail replay needs the batch's labels: pass labels= to probe_layers")


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
