"""Exact per-example meta-gradient inner products on the last part of a network, for students whose examples
are coupled inside a batch (BatchNorm in train mode) -- the engine of ``--meta-grad fast`` below BatchNorm.

:class:`~.probe.LayerProbe` reads ``<v, grad l_i>`` off the gradient the student's backward leaves at each probed
layer's output. Below a BatchNorm layer in train mode that gradient mixes in the other examples' losses (through
the batch statistics), and dividing it by the example's weight amplifies their share for down-weighted examples:
on Fashion-MNIST with 40 % uniform noise the probes of the last stage lost 0.01-0.05 AUC against the exact value,
and the classifier alone (the one exact probe) separated clean from noisy labels with AUC 0.64 where the last
stage + classifier reached 0.83 (examples/image/signal/).

:class:`TailReplay` computes the same inner products exactly for a *tail* of the network (e.g. the last residual
stage, the pooling and the classifier): the tail's input is recorded in the student's training forward, and

    <v, grad l_i(theta)> = d/dh l_i(theta_tail + h v) at h = 0

is a finite difference of replays of the tail alone, along the meta direction ``v``, with the batch's own
statistics (train mode, on copies of the BatchNorm buffers) -- so the coupling of the batch is included, as in
``--meta-grad fd``. No per-example gradients, no second backward: in training one forward of the tail (a third of
a ResNet-32's forward for its last stage), differenced against the training forward's own losses (a forward
difference; on Fashion-MNIST its products correlate 1.000 with the central difference's, relative error 1-3 %,
the same clean/noisy AUC: examples/image/session29/README.md); without those losses, two replays
(a central difference). The meta direction is the meta loss's gradient on the tail's parameters,
from one meta forward whose backward stops at the tail (every other parameter frozen).

It has the interface :class:`~.strategies.fast.FastMetaGrad` uses of a probe: ``parameters``, ``names``,
``watch``, ``meta_direction``, ``example_dots``, ``output_grads`` and ``weighted`` (False: its products do not
come from the weighted backward, so they are not divided by the weights).
"""

import contextlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .metagrad import directional_fd
from .probe import Direction, frozen


class TailReplay:
    """The tail of a network, replayed from its recorded input.

    Args:
        name: what the logs call it (e.g. ``stages.2 + fc``).
        entry: the module whose input is the tail's input (a forward pre-hook records it, detached).
        params: the tail's parameters by name, in the names ``replay`` takes.
        replay: ``(params, recorded input) -> [B]`` per-example losses of the tail at ``params`` (the glue binds
            the batch's labels and runs BatchNorm in train mode on copies of its buffers).
        fd_eps: the relative finite-difference step (see :func:`directional_fd`).
    """

    weighted = False  # products from replays, not from the student's weighted backward

    def __init__(self, name: str, entry: nn.Module, params: Dict[str, nn.Parameter],
                 replay: Callable[[Dict[str, torch.Tensor], torch.Tensor], torch.Tensor], fd_eps: float = 1e-3):
        if not params:
            raise ValueError(f"TailReplay {name}: the tail has no parameters")
        self.name, self.entry, self._params, self.replay, self.fd_eps = name, entry, dict(params), replay, fd_eps
        self.inputs: List[torch.Tensor] = []  # the tail inputs of the last watched forward (one per call)

    @property
    def names(self) -> List[str]:
        return [self.name]

    def parameters(self) -> Dict[str, nn.Parameter]:
        return dict(self._params)

    @contextlib.contextmanager
    def watch(self, capture_grads: bool = False, leaf: bool = False, dots: Optional[Direction] = None):
        """Record the tail's input in the enclosed forward (the other arguments are the probe's; unused)."""
        self.inputs = []
        handle = self.entry.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].detach()))
        try:
            yield self
        finally:
            handle.remove()

    def meta_direction(self, params: Sequence[torch.Tensor],
                       meta_loss: Callable[[], torch.Tensor]) -> Tuple[Direction, torch.Tensor]:
        """``(dL_meta/d tail parameters, L_meta)`` at the current parameters: every other parameter frozen, so the
        meta forward builds a graph only from the tail on."""
        mine = {id(p) for p in self._params.values()}
        with frozen([p for p in params if id(p) not in mine]):
            loss = meta_loss()
            names = list(self._params)
            grads = torch.autograd.grad(loss, [self._params[n] for n in names], allow_unused=True)
        return {n: torch.zeros_like(self._params[n]) if g is None else g for n, g in zip(names, grads)}, loss.detach()

    def output_grads(self, loss: torch.Tensor, retain_graph: bool = True) -> None:
        """Nothing to capture: the products come from replays (l2rw calls this before :meth:`example_dots`)."""

    def example_dots(self, direction: Direction, batch_size: int, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B]``: ``<direction, grad l_i>`` on the tail's parameters, exactly (up to the finite difference).
        ``base``: the per-example losses of the watched forward (the tail's at the current parameters): one replay
        (a forward difference) instead of two."""
        if len(self.inputs) != 1:
            raise RuntimeError(f"the tail {self.name} was entered {len(self.inputs)} times in the watched forward; "
                               "it must be entered exactly once")
        x = self.inputs[0]
        dots = directional_fd(lambda p: self.replay(p, x), self._params, direction, self.fd_eps, base)
        if dots.shape[0] != batch_size:
            raise RuntimeError(f"{self.name}: expected {batch_size} examples, got {dots.shape[0]}")
        return dots
