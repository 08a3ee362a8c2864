"""Teacher networks: per-example features -> raw weight in (0, 1).

The teacher is deliberately small and framework-agnostic: it sees a ``[B, D]`` float tensor
built by the framework glue (NMT: pooled decoder states + token-loss statistics + progress;
images: pooled stage features + label embedding + loss + progress) and returns ``[B]`` raw
weights, which :func:`fairseq_reweight.core.weights.normalize` turns into batch-normalised
weights.
"""

import torch
from torch import nn


class RunningNorm(nn.Module):
    """Standardise features with running (EMA) mean/variance.

    Decoder states, summed losses and lengths live on very different scales; this keeps the
    MLP's inputs near unit scale without depending on the composition of one batch. The
    statistics are buffers, so they are saved with the teacher and restored on resume.
    """

    def __init__(self, dim: int, momentum: float = 0.01, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold one batch into the running statistics (called once per training step)."""
        if x.shape[0] == 0:
            return
        m, v = x.mean(0), x.var(0, unbiased=False)
        if self.count == 0:  # first batch: take its statistics as they are
            self.mean.copy_(m)
            self.var.copy_(v)
        else:
            self.mean.lerp_(m, self.momentum)
            self.var.lerp_(v, self.momentum)
        self.count += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var + self.eps).sqrt()


class Teacher(nn.Module):
    """MLP teacher with a sigmoid output.

    ``in_dim=1`` with the example's loss as the only input is MW-Net (Shu et al., 2019);
    richer inputs (student internal states, loss statistics, progress, label) are the
    deep-interaction teacher of Fan et al. (2021). The output layer starts at zero so every
    example starts with weight sigmoid(0) = 0.5, i.e. uniform weights after normalisation.
    """

    def __init__(self, in_dim: int, hidden: int = 100, num_layers: int = 1):
        super().__init__()
        self.in_dim = in_dim
        self.norm = RunningNorm(in_dim)
        layers, d = [], in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(d, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(
                f"teacher expects features of shape [batch, {self.in_dim}], got {tuple(features.shape)}; "
                "the student's feature size changed (different --teacher-states or architecture?)"
            )
        h = self.body(self.norm(features.float()))
        return torch.sigmoid(self.out(h)).squeeze(-1)
