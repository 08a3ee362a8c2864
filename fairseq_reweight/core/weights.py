"""Batch normalisation of example weights.

The rule (used by every method, NMT and images alike): given non-negative raw weights
``r_1..r_B`` of the examples in one batch (one micro-batch in fairseq terms),

    w_i = B * r_i / sum_j r_j            (so mean_i w_i = 1)

and the student minimises ``sum_i w_i * loss_i`` with the framework's usual normaliser
(fairseq: divided by the number of target tokens; images: by the batch size). Uniform raw
weights therefore give exactly the unweighted objective. If all raw weights are zero (possible
for L2RW) the weights fall back to uniform and the caller is told so it can log a warning.

``max_weight`` (``--max-weight C``, C > 1) bounds how much of the batch one example can take:

    w_i = min(C, s * r_i)   with the scale s chosen so that mean_i w_i = 1

(water-filling: the capped examples' surplus goes to the others in proportion to their raw
weights). Without it a teacher can concentrate the batch on a few examples (normalised weights of
10 and more in a batch of 50), which shrinks the effective batch however well the weights rank the
examples. At most ``B / C`` examples can sit at the cap; if fewer than ``B / C`` raw weights are
positive, those get ``C`` and the batch's weights sum to less than ``B``. The result is
differentiable in ``r`` (the capped examples have zero gradient).
"""

from typing import Optional, Tuple

import torch


def normalize(raw: torch.Tensor, max_weight: Optional[float] = None, eps: float = 1e-12,
              scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean-one normalisation over the batch, capped at ``max_weight`` (water-filling); differentiable (used
    inside the meta-gradient; a capped example's gradient is zero, the exact gradient of the water-filling).

    ``scale`` (``--weight-norm running``; a scalar or one per example): the weights are
    ``raw / scale`` (capped at ``max_weight``), ``scale`` the teacher's mean output over many batches (of the
    example's length bucket), so a batch of mostly bad examples gets little total weight instead of mean one;
    the gradient stays that of the batch normalisation (a straight-through value), so the teacher still only
    learns how to rank the examples of a batch, not to raise or lower every weight."""
    if scale is not None:
        value = raw.detach() / scale.clamp_min(eps)
        if max_weight is not None:
            value = value.clamp_max(max_weight)
        if not raw.requires_grad:  # no teacher gradient wanted: the batch normalisation is not needed
            return value
        w = normalize(raw, max_weight, eps)
        return w + (value - w).detach()
    n = raw.numel()
    w = raw * (n / raw.sum().clamp_min(eps))
    if max_weight is None or n == 0 or not bool((w.detach() > max_weight).any()):
        return w
    capped = torch.zeros_like(raw, dtype=torch.bool)
    r = raw.detach()
    for _ in range(n):  # the capped set only grows; each pass caps at least one more example
        free = r.masked_fill(capped, 0).sum()
        if free <= 0:
            break
        over = capped | (r * ((n - max_weight * int(capped.sum())) / free) > max_weight)
        if bool((over == capped).all()):
            break
        capped = over
    rest = raw.masked_fill(capped, 0)
    total = rest.sum()
    scale = (n - max_weight * int(capped.sum())) / total if bool(total.detach() > 0) else 0.0
    return torch.where(capped, torch.full_like(raw, max_weight), rest * scale)


def check_max_weight(max_weight: Optional[float]) -> None:
    if max_weight is not None and not max_weight > 1:
        raise ValueError(f"--max-weight must be > 1 (weights have mean 1; 1 would make them all uniform), "
                         f"got {max_weight}")


def l2rw_weights(grad_eps: torch.Tensor, max_weight: Optional[float] = None) -> Tuple[torch.Tensor, bool]:
    """Ren et al. (2018): ``w ∝ max(0, -dL_meta/d eps)`` at eps = 0, normalised to mean 1.

    Returns ``(weights, fell_back)``; ``fell_back`` is True when no example had a negative
    meta-gradient (or the gradient was not finite) and uniform weights were returned.
    """
    raw = (-grad_eps.detach()).clamp_min(0)
    total = raw.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.ones_like(raw), True
    return normalize(raw, max_weight), False
