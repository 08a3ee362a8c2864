"""Per-example gradient inner products at a few linear/embedding layers, from activations the training
step computes anyway -- the engine of ``--meta-grad fast``.

For a linear layer ``o = W a + b`` applied at positions ``t`` (tokens, or one per image), the
gradient of example ``i``'s loss is ``grad_W l_i = sum_{t in i} d_t a_t^T`` with ``d_t = dl_i/do_t``,
so for any direction ``(V, v)``

    <(V, v), grad_(W,b) l_i> = sum_{t in i} d_t . (V a_t + v);

for an embedding ``o_t = E[x_t]`` it is ``sum_{t in i} d_t . V[x_t]`` (a gather); for a convolution,
``sum_positions d . conv(a_i, V)`` (one convolution with ``V`` as the kernel).

`LayerProbe` records ``a`` (the layer's input) in the forward pass and ``d`` (the
gradient at the layer's output) in a backward pass: the student's own backward of the weighted
loss for the teacher methods (``d_t = w_i dl_i/do_t``, so dividing by ``w_i`` recovers it), or a
partial backward from the losses to the probed outputs (L2RW, whose weights are needed before the
real backward). The meta gradient ``(V, v)`` of the clean loss restricted to the same layers comes
from the same probe on a meta forward with every other parameter frozen, so its backward stops at
the probed layers.

``--meta-grad fast`` then uses the first-order meta-gradient

    dL_m(theta'(w))/dw_i  ~=  -(lr / denom) < grad L_m(theta), grad l_i(theta) >   on the probed layers,

i.e. the look-ahead is the student's real previous update (``theta`` *is* the look-ahead of the
last step) and the inner products are restricted to the probed layers. Both approximations are
bounded in the tests: on the probed layers it matches the exact second-order meta-gradient up to
``O(lr)``; its cosine with the all-parameter exact meta-gradient is measured and documented.
"""

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .metagrad import MetaGrad


class _Box:
    __slots__ = ("grad", "dot")

    def __init__(self):
        self.grad: Optional[torch.Tensor] = None
        self.dot: Optional[torch.Tensor] = None  # [B] per-example inner products (``watch(dots=...)``)


@dataclass
class _Call:
    name: str
    batch_dim: int
    inp: Optional[torch.Tensor]  # the layer's input (activations, or token ids for an embedding), detached
    out: Optional[torch.Tensor]  # the layer's output (part of the autograd graph; None under ``watch(dots=...)``)
    # d loss / d out, when captured. A box that does not point back at ``out``: a gradient hook on
    # ``out`` that referenced the call would make a cycle through autograd's C++ hooks that Python's
    # garbage collector cannot see, keeping every step's activations alive (~20 MB per update).
    box: _Box = field(default_factory=_Box)

    @property
    def grad(self) -> Optional[torch.Tensor]:
        return self.box.grad

    @grad.setter
    def grad(self, g: Optional[torch.Tensor]) -> None:
        self.box.grad = g


Direction = Dict[str, torch.Tensor]  # parameter name -> a tensor of its shape


class LayerProbe:
    """Watches ``nn.Linear`` and ``nn.Embedding`` layers: ``layers`` is a list of
    ``(name, module, batch_dim)`` where ``batch_dim`` is the dimension of the layer's input that
    indexes examples (fairseq's transformer layers are time-major: 1; batch-first tensors: 0).
    A parameter shared by several layers (tied embeddings) is one parameter: its meta gradient and
    its per-example gradients sum over every probed use."""

    weighted = True  # the output gradients come from the student's weighted backward (divided by the weights)

    def __init__(self, layers: Sequence[Tuple[str, nn.Module, int]]):
        if not layers:
            raise ValueError("LayerProbe needs at least one layer")
        for name, module, _ in layers:
            if not isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
                raise TypeError(f"--meta-grad fast probes nn.Linear/nn.Embedding/nn.Conv2d layers; {name} is a "
                                f"{type(module).__name__}")
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                raise TypeError(f"{name}: only zero-padded convolutions can be probed")
        # a module listed twice (fairseq's --share-all-embeddings: encoder.embed_tokens is decoder.embed_tokens)
        # is watched once: a second hook would record each of its calls twice
        unique, seen = [], set()
        for layer in layers:
            if id(layer[1]) not in seen:
                seen.add(id(layer[1]))
                unique.append(layer)
        self.layers = unique

        self.calls: List[_Call] = []
        self._modules = {n: m for n, m, _ in self.layers}
        self._pname: Dict[int, str] = {}  # id(parameter) -> its (first) name
        for name, module, _ in self.layers:
            for attr, p in module.named_parameters(recurse=False):
                self._pname.setdefault(id(p), f"{name}.{attr}")

    @property
    def names(self) -> List[str]:
        return [n for n, _, _ in self.layers]

    def parameters(self) -> Dict[str, nn.Parameter]:
        """The probed parameters, each once, by name."""
        out = {}
        for _, m, _ in self.layers:
            for p in m.parameters(recurse=False):
                out.setdefault(self._pname[id(p)], p)
        return out

    @contextlib.contextmanager
    def watch(self, capture_grads: bool = False, leaf: bool = False, dots: Optional[Direction] = None):
        """Record inputs/outputs of the probed layers in the enclosed forward pass.

        ``capture_grads``: also keep the gradients reaching the outputs in a later backward.
        ``leaf``: for a forward with frozen parameters, turn the first probed output into a leaf
        that requires grad, so a backward from the loss stops at the probed layers.
        ``dots``: with ``capture_grads``, reduce each output gradient as it arrives to the per-example inner
        products with this direction (what :meth:`example_dots` returns for it), keeping neither the gradient nor
        the output: the training pass of ``--meta-grad fast`` then holds no [positions, batch, width] tensors of
        its own beyond the autograd graph.
        """
        self.calls = []
        handles = []

        def reduce(g, call):
            call.box.dot = self._call_dots(call, dots, _acc(g))
            call.inp = None

        def hook(name, batch_dim, module, args, out):
            if leaf and not out.requires_grad:
                out = out.detach().requires_grad_(True)
            call = _Call(name, batch_dim, args[0].detach(), out if dots is None else None)
            if capture_grads and out.requires_grad:
                if dots is None:
                    out.register_hook(lambda g, box=call.box: setattr(box, "grad", g))
                else:  # the closure holds the call, which does not hold ``out``: no cycle through the hook
                    out.register_hook(lambda g, call=call: reduce(g, call))
            self.calls.append(call)
            return out.clone()  # later in-place ops (e.g. q *= scaling) must not change the recorded output

        for name, module, batch_dim in self.layers:
            handles.append(module.register_forward_hook(
                lambda m, a, o, n=name, d=batch_dim: hook(n, d, m, a, o)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def meta_direction(self, params: Sequence[torch.Tensor],
                       meta_loss: Callable[[], torch.Tensor]) -> Tuple[Direction, torch.Tensor]:
        return meta_direction(self, params, meta_loss)

    def _check_seen(self):
        seen = {c.name for c in self.calls}
        missing = [n for n in self.names if n not in seen]
        if missing:
            raise RuntimeError(f"probed layers {missing} were not used by the forward pass")

    def output_grads(self, loss: torch.Tensor, retain_graph: bool = True) -> None:
        """Fill the recorded calls' gradients with ``d loss / d out`` (a partial backward)."""
        self._check_seen()
        grads = torch.autograd.grad(loss, [c.out for c in self.calls], retain_graph=retain_graph,
                                    allow_unused=True)
        for c, g in zip(self.calls, grads):
            c.grad = torch.zeros_like(c.out) if g is None else g

    def _grad_of(self, c: _Call) -> torch.Tensor:
        if c.grad is None:
            raise RuntimeError(f"no gradient was recorded for {c.name}")
        return _acc(c.grad)

    def param_grads(self) -> Direction:
        """Gradients of the probed parameters (summed over positions and uses), from the recorded
        inputs and output gradients: ``{parameter name: grad}``."""
        result: Direction = {}

        def add(p, g):
            key = self._pname[id(p)]
            result[key] = g if key not in result else result[key] + g

        for c in self.calls:
            m, d = self._modules[c.name], self._grad_of(c)
            if isinstance(m, nn.Conv2d):  # [B, C, H, W]
                add(m.weight, torch.nn.grad.conv2d_weight(_acc(c.inp).to(d.dtype), m.weight.shape, d, m.stride,
                                                          m.padding, m.dilation, m.groups))
                if m.bias is not None:
                    add(m.bias, d.sum((0, 2, 3)))
                continue
            d = d.reshape(-1, d.shape[-1])
            if isinstance(m, nn.Embedding):
                idx = c.inp.reshape(-1)
                if m.padding_idx is not None:
                    d = d * idx.ne(m.padding_idx).unsqueeze(1).to(d.dtype)
                add(m.weight, torch.zeros(m.weight.shape, dtype=d.dtype, device=d.device).index_add_(0, idx, d))
            else:
                add(m.weight, d.t() @ _acc(c.inp.reshape(-1, c.inp.shape[-1])).to(d.dtype))
                if m.bias is not None:
                    add(m.bias, d.sum(0))
        return result

    def example_dots(self, direction: Direction, batch_size: int) -> torch.Tensor:
        """``[B]``: the inner product of ``direction`` with each example's gradient on the probed parameters (under
        ``watch(dots=direction)``: the products reduced during the backward)."""
        dots = None
        for c in self.calls:
            dots_c = c.box.dot if c.box.dot is not None else self._call_dots(c, direction, self._grad_of(c))
            if dots_c.shape[0] != batch_size:
                raise RuntimeError(f"{c.name}: expected {batch_size} examples along dim {c.batch_dim} of its "
                                   f"input, got {dots_c.shape[0]}")
            dots = dots_c if dots is None else dots + dots_c
        return dots

    def _call_dots(self, c: _Call, direction: Direction, d: torch.Tensor) -> torch.Tensor:
        """``[examples]``: one recorded call's share of :meth:`example_dots`, from its output gradient ``d``."""
        m = self._modules[c.name]
        v = direction[self._pname[id(m.weight)]].to(d.dtype)
        n = c.inp.shape[c.batch_dim]
        if isinstance(m, nn.Conv2d):  # <V, grad_W l_i> = sum over positions of d . conv(a, V)
            u = torch.nn.functional.conv2d(_acc(c.inp).to(d.dtype), v, None, m.stride, m.padding, m.dilation,
                                           m.groups)
            if m.bias is not None:
                u = u + direction[self._pname[id(m.bias)]].to(d.dtype)[:, None, None]
            return (u * d).reshape(n, -1).sum(1)
        if isinstance(m, nn.Embedding):
            u = v[c.inp]
            if m.padding_idx is not None:
                u = u * c.inp.ne(m.padding_idx).unsqueeze(-1).to(u.dtype)
        else:
            u = _acc(c.inp).to(d.dtype) @ v.t()
            if m.bias is not None:
                u = u + direction[self._pname[id(m.bias)]].to(d.dtype)
        return (u * d).sum(-1).movedim(c.batch_dim, 0).reshape(n, -1).sum(1)


def meta_direction(probe: LayerProbe, params: Sequence[torch.Tensor],
                   meta_loss: Callable[[], torch.Tensor]) -> Tuple[Direction, torch.Tensor]:
    """Gradient of the meta loss on the probed parameters at the current ``params``: one forward with
    every parameter frozen, so the backward starts and stops at the probed layers."""
    with frozen(params), probe.watch(leaf=True):
        loss = meta_loss()
        probe.output_grads(loss, retain_graph=False)
    return probe.param_grads(), loss.detach()


class MetaDirection:
    """The meta-gradient direction of ``--meta-grad fast`` across updates.

    ``refresh``: compute a fresh direction (one meta forward/backward, the main cost of a meta update)
    every ``refresh``-th meta update and reuse it in between, so the teacher can still learn at every
    update. ``decay``: an exponential average of the fresh directions (bias-corrected, like Adam's
    moments), against the noise of one meta batch: on noisy Multi30k the per-example scores of one meta
    batch separate clean from corrupted pairs with AUC 0.60-0.68, those of the whole meta set with 0.78
    (scripts/meta_signal.py). Both trade freshness: the student moves between the meta batches that are
    averaged. A non-finite fresh direction is returned as it is (that meta update is skipped and counted)
    but never folded into the average.
    """

    def __init__(self, refresh: int = 1, decay: float = 0.0):
        if refresh < 1:
            raise ValueError(f"--meta-refresh must be >= 1, got {refresh}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--meta-ema must be in [0, 1), got {decay}")
        self.refresh, self.decay = refresh, decay
        self.calls = 0  # meta updates served
        self.fresh = 0  # fresh directions folded in
        self._avg: Optional[Direction] = None  # the running average, not yet divided by 1 - decay^fresh
        self._loss: Optional[torch.Tensor] = None

    def get(self, compute: Callable[[], Tuple[Direction, torch.Tensor]]) -> Tuple[Direction, torch.Tensor]:
        """The direction for this meta update; ``compute()`` gives a fresh ``(direction, meta loss)``."""
        due = self._avg is None or self.calls % self.refresh == 0
        self.calls += 1
        if not due:
            return self._value(), self._loss
        direction, loss = compute()
        if not (bool(torch.isfinite(loss)) and all(bool(torch.isfinite(v).all()) for v in direction.values())):
            return direction, loss
        self.fresh += 1
        self._loss = loss
        if self.decay == 0.0:
            self._avg = direction
        else:
            avg = self._avg or {k: torch.zeros_like(v) for k, v in direction.items()}
            self._avg = {k: v.lerp(direction[k], 1.0 - self.decay) for k, v in avg.items()}
        return self._value(), loss

    def _value(self) -> Direction:
        """The average of the fresh directions ``d_1..d_n`` with weights ``(1 - decay) decay^(n-k)``, divided
        by their sum ``1 - decay^n`` (decay 0: the last direction)."""
        if self.decay == 0.0:
            return self._avg
        correction = 1.0 - self.decay ** self.fresh
        return {k: v / correction for k, v in self._avg.items()}

    def state_dict(self) -> dict:
        return {"calls": self.calls, "fresh": self.fresh, "avg": self._avg, "loss": self._loss}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state:
            return
        self.calls, self.fresh = state["calls"], state["fresh"]
        self._avg, self._loss = state["avg"], state["loss"]

    def to(self, device) -> "MetaDirection":
        if self._avg is not None:
            self._avg = {k: v.to(device) for k, v in self._avg.items()}
            self._loss = self._loss.to(device)
        return self


def adam_precondition(direction: Direction, params: Dict[str, torch.Tensor],
                      optimizer: torch.optim.Optimizer) -> Direction:
    """``direction / (sqrt(v_hat) + eps)`` with the Adam second moments the student's ``optimizer`` holds for
    ``params`` (``--meta-precondition adam``): the look-ahead then moves along the step Adam would take,
    ``theta' = theta - lr * P grad``, so each example is scored by ``<P grad L_meta, grad l_i>``. On noisy
    Multi30k that raised the clean-vs-corrupted AUC of the encoder score from 0.78 to 0.83
    (scripts/meta_signal.py --precondition adam). Before the optimizer's first step (no second moments
    yet) the direction is returned unchanged."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    if any(id(params[name]) not in group_of for name in direction):
        raise ValueError("--meta-precondition adam: the optimizer does not hold the model's own parameters (a mixed-"
                         "precision wrapper keeps its state on fp32 copies): train in fp32, or drop the flag")
    kind = type(optimizer).__name__
    if any("betas" not in group_of[id(params[name])] for name in direction):
        raise ValueError(f"--meta-precondition adam needs an Adam-type student optimizer, not {kind}: use "
                         "--optimizer adam, or drop the flag")
    states = {name: optimizer.state.get(params[name]) for name in direction}
    if not any(states.values()):
        return direction  # before the optimizer's first step
    # fairseq's own Adam (CPU, --use-old-adam) and FusedAdamV1 add eps to sqrt(v) before the bias correction:
    # lr sqrt(bc2)/bc1 m / (sqrt(v) + eps) = lr/bc1 m / (sqrt(v_hat) + eps/sqrt(bc2)); torch's Adam/AdamW (and
    # apex's fused Adam) add it after: m_hat / (sqrt(v_hat) + eps)
    eps_before_correction = type(optimizer).__module__.startswith("fairseq.optim") and kind in ("Adam", "FusedAdamV1")
    out: Direction = {}
    for name, v in direction.items():
        st, g = states[name], group_of[id(params[name])]
        if not st or "exp_avg_sq" not in st:
            raise ValueError(f"--meta-precondition adam: {kind} holds no Adam second moment for {name}; use "
                             "--optimizer adam, or drop the flag")
        second = st["exp_avg_sq"]
        if g.get("amsgrad", False):  # AMSGrad normalises by the running maximum of the second moments
            second = st.get("max_exp_avg_sq", st.get("max_exp_avg_sqs", second))
        bc2 = 1.0 - g["betas"][1] ** float(st["step"])
        eps = g["eps"] / math.sqrt(bc2) if eps_before_correction else g["eps"]
        out[name] = v / ((second.to(v.device) / bc2).sqrt() + eps).to(v.dtype)
    return out



def first_order(probe: LayerProbe, direction: Direction, meta_loss: torch.Tensor, lr: float, denom: float,
                batch_size: int, weights: Optional[torch.Tensor] = None, loss_scale: float = 1.0,
                base: Optional[torch.Tensor] = None) -> MetaGrad:
    """``dL_meta/dw_i ~= -(lr/denom) <grad L_meta, grad l_i>`` on the probed layers, from the probe's
    last recorded pass. With ``weights`` the output gradients are those of the student's backward of
    ``loss_scale * sum_i w_i l_i``, divided here by ``loss_scale * w_i`` (not for a :class:`~.replay.TailReplay`,
    whose products do not come from that backward; ``base``: the recorded pass's per-example losses, which a replay
    reuses)."""
    dots = probe.example_dots(direction, batch_size) if base is None else probe.example_dots(direction, batch_size, base)
    if weights is not None and probe.weighted:
        w = weights.to(dots) * loss_scale
        dots = torch.where(w > 0, dots / w.clamp_min(1e-30), torch.zeros_like(dots))
    return MetaGrad((-lr / denom) * dots, meta_loss)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulate half-precision activations in float32 (float32/float64 stay as they are)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@contextlib.contextmanager
def frozen(params: Sequence[torch.Tensor]):
    """Temporarily stop ``params`` from requiring grad (a meta forward that builds no graph before the probe)."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
