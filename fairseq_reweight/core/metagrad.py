"""Meta-gradient of a clean meta loss with respect to the example weights.

For a training batch with per-example losses ``l_i(theta)``, weights ``w`` and normaliser
``denom`` (fairseq: target tokens; images: batch size), the one-step SGD look-ahead is

    theta'(w) = theta - lr * grad_theta( sum_i w_i l_i(theta) / denom )

and the meta-gradient of the meta loss ``L_m`` at the look-ahead is

    dL_m(theta'(w)) / dw_i = -(lr / denom) * < grad L_m(theta'), grad l_i(theta) >.

Two interchangeable all-parameter implementations (``mode``); the cheaper first-order
``--meta-grad fast`` restricted to a few layers lives in :mod:`.probe`:

``exact``
    second-order autograd through the look-ahead (the reference; memory of a double backward).
``fd``
    no double backward: ``v = grad L_m(theta')`` from one ordinary backward at the look-ahead,
    then all ``B`` inner products ``<v, grad l_i(theta)>`` at once from a central finite
    difference of the per-example losses along ``v`` -- two extra forward passes, no backward.
    (Forward-mode AD would be the textbook choice, but ``torch.func.jvp`` does not trace
    fairseq's transformer and ``torch.autograd.forward_ad`` gave wrong tangents there; the finite
    difference is checked against ``exact`` in the tests.)

Everything is written against callables on a ``{name: tensor}`` parameter dict (the
``torch.func.functional_call`` style), so it is independent of fairseq and of the image code.
The callables must use the same dropout mask on every call (see :func:`fixed_rng`).
"""

import contextlib
from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

Params = Dict[str, torch.Tensor]


class MetaGrad(NamedTuple):
    grad_w: torch.Tensor  # [B], dL_meta(theta'(w))/dw
    meta_loss: torch.Tensor  # scalar, L_meta(theta'), detached


def capture_rng(device: torch.device):
    """The RNG state(s) needed to replay a forward pass with the same dropout masks."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def fixed_rng(state, device: torch.device):
    """Run a block with the RNG set to ``state``; the surrounding RNG stream is left untouched."""
    cpu, cuda = state
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def functional_call(module: torch.nn.Module, tensors: Params, args, kwargs=None):
    """``torch.func.functional_call`` that is safe for shared modules and tied weights.

    fairseq's ``--share-all-embeddings`` registers one embedding module under two paths and ties the
    output projection to it. torch's own tie handling then restores the shared module wrongly after
    the call, leaving it holding the substituted tensor (the model silently loses its tie and a
    parameter). Here every place a substituted parameter/buffer lives is named exactly once and
    ``tie_weights`` is off, so each is swapped and restored once.
    """
    new_by_id = {}
    for name, t in tensors.items():
        try:
            orig = module.get_parameter(name)
        except AttributeError:
            orig = module.get_buffer(name)
        new_by_id[id(orig)] = t
    expanded, seen = {}, set()
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for attr, value in list(mod._parameters.items()) + list(mod._buffers.items()):
            if value is not None and id(value) in new_by_id and (id(mod), attr) not in seen:
                seen.add((id(mod), attr))
                expanded[f"{mod_name}.{attr}" if mod_name else attr] = new_by_id[id(value)]
    return torch.func.functional_call(module, expanded, args, kwargs, tie_weights=False)


def _norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum((t.detach().float() ** 2).sum() for t in tensors))


def weight_gradient(
    params: Params,
    train_losses: Callable[[Params], torch.Tensor],
    meta_loss: Callable[[Params], torch.Tensor],
    weights: torch.Tensor,
    lr: float,
    denom: float = 1.0,
    mode: str = "fd",
    fd_eps: float = 1e-3,
    losses: Optional[torch.Tensor] = None,
) -> MetaGrad:
    """``dL_meta(theta'(w))/dw`` at ``w = weights`` (pass zeros for L2RW's epsilon trick).

    Args:
        params: the student's trainable parameters ``theta`` (its own ``nn.Parameter``s).
        train_losses: ``params -> [B]`` per-example training losses at the given parameters.
        meta_loss: ``params -> scalar`` meta (clean-set) loss at the given parameters.
        weights: ``[B]`` weights at which the look-ahead is taken.
        lr: look-ahead step size ``eta``.
        denom: normaliser of the weighted training loss.
        mode: ``"exact"`` or ``"fd"`` (see module docstring).
        fd_eps: ``fd`` only: the finite-difference step, relative: ``||h v|| = fd_eps ||theta||``.
        losses: optionally ``train_losses(params)`` already computed with its autograd graph (``fd``
            reuses it to save one forward and retains the graph for the caller's own backward).
    """
    names = list(params)
    theta = [params[n] for n in names]
    if mode == "exact":
        # fused attention kernels have no double backward: the reference path uses the math kernel,
        # so it recomputes the training losses rather than reusing ``losses``
        with sdpa_kernel([SDPBackend.MATH]):
            w = weights.detach().clone().requires_grad_(True)
            ell = train_losses(params)
            grads = torch.autograd.grad((w * ell).sum() / denom, theta, create_graph=True, allow_unused=True)
            ahead = {n: p if g is None else p - lr * g for n, p, g in zip(names, theta, grads)}
            lm = meta_loss(ahead)
            (gw,) = torch.autograd.grad(lm, w)
        return MetaGrad(gw.detach(), lm.detach())
    if mode != "fd":
        raise ValueError(f"unknown meta-gradient mode {mode!r}: use 'exact' or 'fd'")

    # 1. look-ahead parameters (skipped when all weights are zero: theta' = theta)
    if bool((weights != 0).any()):
        ell = losses if losses is not None else train_losses(params)
        grads = torch.autograd.grad(
            (weights.detach() * ell).sum() / denom, theta, retain_graph=losses is not None, allow_unused=True
        )
        ahead = [p.detach() if g is None else p.detach() - lr * g for p, g in zip(theta, grads)]
    else:
        ahead = [p.detach() for p in theta]
    # 2. v = grad of the meta loss at the look-ahead
    leaves = [t.clone().requires_grad_(True) for t in ahead]
    lm = meta_loss(dict(zip(names, leaves)))
    v = torch.autograd.grad(lm, leaves, allow_unused=True)
    v = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, v)]
    # 3. all <v, grad l_i(theta)> from a central difference of the per-example losses along v
    vnorm = _norm(v)
    if not torch.isfinite(vnorm) or vnorm == 0:
        return MetaGrad(torch.full_like(weights, float("nan") if not torch.isfinite(vnorm) else 0.0), lm.detach())
    directional = directional_fd(train_losses, dict(zip(names, theta)), dict(zip(names, v)), fd_eps)
    return MetaGrad((-lr / denom) * directional.detach(), lm.detach())


def directional_fd(losses: Callable[[Dict[str, torch.Tensor]], torch.Tensor], params: Dict[str, torch.Tensor],
                   direction: Params, fd_eps: float = 1e-3, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B]``: ``<direction, grad l_i(params)>`` for every example, by a central difference of ``losses`` along
    ``direction`` with the relative step ``||h v|| = fd_eps * max(||params||, 1)`` (``fd`` above; the tail replay of
    ``--meta-grad fast``, core/replay.py). ``base``: ``losses(params)`` where the caller has them (the training
    forward's): a forward difference, one evaluation instead of two (error O(h) instead of O(h^2)).
    Zero where the direction is zero; NaN where it is not finite."""
    names = list(params)
    v = [direction[n].to(params[n].dtype) if n in direction else torch.zeros_like(params[n]) for n in names]
    vnorm, pnorm = _norm(v), _norm(params.values())
    with torch.no_grad():
        if not torch.isfinite(vnorm) or vnorm == 0:
            like = base if base is not None else losses({n: params[n].detach() for n in names})
            return torch.full_like(like, float("nan") if not torch.isfinite(vnorm) else 0.0)
        h = float(fd_eps * pnorm.clamp_min(1.0) / vnorm)
        plus = losses({n: params[n].detach() + h * d for n, d in zip(names, v)})
        if base is not None:
            return (plus - base.detach().to(plus)) / h
        minus = losses({n: params[n].detach() - h * d for n, d in zip(names, v)})
    return (plus - minus) / (2 * h)
