"""``--meta-grad fast``: the first-order meta-gradient from the student's own forward and backward.

Before an update, one forward/backward of a clean meta batch with every parameter frozen gives the meta
direction v = dL_meta/dtheta on the probed layers (fresh every ``refresh``-th meta update, averaged with
decay ``ema``, optionally preconditioned like the student's Adam step). The probes record each probed layer's
input and output gradient during the student's ordinary training pass, so after its backward

    dL_meta/dw_i ~= -(lr/denom) <v, grad l_i>

follows per example in closed form (core/probe.py), is back-propagated through the batch normalisation and
the teacher, and the teacher takes one step per update, after the student's. No virtual step, no second
training forward, no double backward.

With a replayed tail instead of probes (core/replay.py: images, where BatchNorm makes probes inexact) the products
need only the recorded tail input, not the student's backward, so the teacher takes its step before the student's
and the student trains with the updated teacher's weights, as with ``fd``/``exact`` and in MW-Net.
"""

import contextlib
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..metagrad import MetaGrad
from ..probe import LayerProbe, MetaDirection, adam_precondition, first_order


class FastMetaGrad:
    def __init__(self, reweighter, mode: str = "fast", probe_layers: Optional[Callable[[], list]] = None,
                 refresh: int = 1, ema: float = 0.0, precondition: str = "none", fd_eps: Optional[float] = None,
                 on_probe: Optional[Callable[[LayerProbe], None]] = None):
        """``probe_layers()``: the ``[(name, module, batch_dim)]`` to probe, or a built probe such as a
        :class:`~..replay.TailReplay` (called once, at the first meta update);
        ``precondition``: ``none`` or ``adam`` (the ``optimizer`` given to :meth:`begin_update`);
        ``on_probe``: called with the probe when it is built (the glue logs its layers)."""
        self.rw = reweighter
        self.mode = mode
        self._probe_layers, self._on_probe, self._probe = probe_layers, on_probe, None
        self.meta_dir = MetaDirection(refresh, ema)  # fresh, reused or averaged across updates
        self.precondition = precondition
        self.direction: Optional[Tuple[Dict[str, torch.Tensor], torch.Tensor]] = None  # (v, meta loss) this update
        self._update = -1  # the update whose direction is current (micro-batches share it)
        self._active = self._real = False
        self._w_graph: Optional[torch.Tensor] = None
        self._scale = (1.0, 1.0, 0)  # (lr, denom, batch size) of the current batch
        self._stepped = -1  # the update whose teacher step was taken before the student's (replayed tails)

    @property
    def probe(self) -> LayerProbe:
        if self._probe is None:
            layers = self._probe_layers()
            self._probe = LayerProbe(layers) if isinstance(layers, (list, tuple)) else layers
            if self._on_probe is not None:
                self._on_probe(self._probe)
        return self._probe

    # ------------------------------------------------------------------ the hooks
    def begin_update(self, step: int, real: bool = True, params: Sequence[torch.Tensor] = (),
                     meta_loss: Optional[Callable[[], torch.Tensor]] = None,
                     optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """A (micro-)batch of update ``step`` starts. On the first real one of a meta update: the meta direction
        (``meta_loss()`` is the clean loss of a fresh meta batch at the current ``params``)."""
        self._real = real
        self._active = real and self.rw.is_meta_step(step)
        if not self._active or self._update == step:
            return
        with torch.autograd.profiler.record_function("meta_direction"):
            device = params[0].device if len(params) else torch.device("cpu")
            direction, loss = self.meta_dir.to(device).get(lambda: self.fresh_direction(params, meta_loss))
            if self.precondition == "adam" and optimizer is not None:  # along the step the student's Adam takes
                direction = adam_precondition(direction, self.probe.parameters(), optimizer)
        self.direction = (direction, loss)
        self._update = step
        self.rw.zero_teacher_grad()

    def forward(self, device: Optional[torch.device] = None):
        """Around the student's training forward: the probes record it on meta updates."""
        if not self._active:
            return contextlib.nullcontext()
        # a teacher's meta-gradient needs only <v, grad l_i>: reduced during the backward (l2rw reads the gradients)
        return self.probe.watch(capture_grads=self.rw.has_teacher,
                                dots=self.direction[0] if self.rw.has_teacher else None)

    def weights(self, step: int, features: Optional[torch.Tensor], losses: torch.Tensor, lr: float, denom: float,
                lookahead=None, ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Normalised weights of this batch (detached, mean 1) and diagnostics to log (``ids``: the examples'
        indices in the training set, for ``--weight-ema``)."""
        rw, n, info = self.rw, losses.shape[0], {}
        self._w_graph, self._scale = None, (lr, denom, n)
        with torch.autograd.profiler.record_function("reweight"):
            if not self._real:  # a batch without gradient; still build the teacher the other workers build
                if rw.has_teacher and step >= rw.warmup and features is not None:
                    rw.ensure_teacher(features.shape[1], features.device)
                return torch.ones(n, device=losses.device), info
            # a replayed tail differences against this forward's losses: one replay, not two
            base = losses.detach() if (self._active and not self.probe.weighted) else None
            if rw.method == "l2rw" and self._active:
                self.probe.output_grads(losses.sum())
                return rw.l2rw(self.first_order(base=base), info), info
            if not rw.has_teacher or step < rw.warmup:
                return torch.ones(n, device=losses.device), info
            if self._active and not self.probe.weighted:  # replayed products: the teacher steps first
                self._stepped = step
                return rw.weights(step, features, lambda w: self.first_order(base=base), ids=ids)
            w, self._w_graph = rw.teacher_weights(step, features, ids)  # the graph only on meta updates
            return w, info

    def after_backward(self, weights: torch.Tensor, info: Dict[str, float], loss_scale: float = 1.0) -> None:
        """After the student's backward of ``loss_scale * sum_i w_i l_i``: the teacher's meta-gradient."""
        if self._w_graph is None:
            return
        with torch.autograd.profiler.record_function("reweight"):
            self.rw.accumulate(self._w_graph, self.first_order(weights, loss_scale), info)
        self._w_graph = None

    def end_update(self, step: int) -> bool:
        """After the student's optimizer step, on every worker: the teacher's step (meta updates), the input
        moments folded in. True when a data-parallel check found the teachers identical."""
        rw = self.rw
        meta = rw.has_teacher and rw.is_meta_step(step)
        if meta and self._stepped != step:
            rw.step_teacher()
        rw.end_update()
        return meta and rw.check_in_sync(step)

    # ------------------------------------------------------------------ pieces
    def fresh_direction(self, params: Sequence[torch.Tensor], meta_loss: Callable[[], torch.Tensor]):
        """``(dL_meta/dtheta on the probed layers, L_meta)`` at the current ``params``: one meta forward with every
        parameter frozen, whose backward starts and stops at the probed layers."""
        return self.probe.meta_direction(list(params), meta_loss)

    def first_order(self, weights: Optional[torch.Tensor] = None, loss_scale: float = 1.0,
                    base: Optional[torch.Tensor] = None) -> MetaGrad:
        """dL_meta/dw_i of the probe's last recorded pass (``weights``: those of the student's backward; ``base``:
        its per-example losses, for a replayed tail)."""
        lr, denom, n = self._scale
        return first_order(self.probe, *self.direction, lr, denom, n, weights, loss_scale, base)

    def state_dict(self) -> Optional[dict]:
        return self.meta_dir.state_dict() if self.meta_dir.calls else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.meta_dir.load_state_dict(state)
