"""Batch normalisation of example weights.

The rule (used by every method, NMT and images alike): given non-negative raw weights
``r_1..r_B`` of the examples in one batch (one micro-batch in fairseq terms),

    w_i = B * r_i / sum_j r_j            (so mean_i w_i = 1)

and the student minimises ``sum_i w_i * loss_i`` with the framework's usual normaliser
(fairseq: divided by the number of target tokens; images: by the batch size). Uniform raw
weights therefore give exactly the unweighted objective. If all raw weights are zero (possible
for L2RW) the weights fall back to uniform and the caller is told so it can log a warning.
"""

from typing import Tuple

import torch


def normalize(raw: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean-one normalisation over the batch; differentiable (used inside the meta-gradient)."""
    return raw * (raw.numel() / raw.sum().clamp_min(eps))


def l2rw_weights(grad_eps: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """Ren et al. (2018): ``w_i ∝ max(0, -dL_meta/d eps_i)`` at eps = 0, normalised to mean 1.

    Returns ``(weights, fell_back)``; ``fell_back`` is True when no example had a negative
    meta-gradient (or the gradient was not finite) and uniform weights were returned.
    """
    raw = (-grad_eps.detach()).clamp_min(0)
    total = raw.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.ones_like(raw), True
    return normalize(raw), False
