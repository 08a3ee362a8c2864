"""Teacher networks: per-example features -> raw weight in (0, 1).

The teacher is deliberately small and framework-agnostic: it sees a ``[B, D]`` float tensor
built by the framework glue (NMT: pooled decoder states + token-loss statistics + progress;
images: pooled stage features + label embedding + loss + progress) and returns ``[B]`` raw
weights, which :func:`fairseq_reweight.core.weights.normalize` turns into batch-normalised
weights.
"""

from typing import Callable, List, Optional

import torch
from torch import nn


def parse_states_spec(spec: str, num_states: int, what: str = "layers") -> List[int]:
    """``--teacher-states``: ``last``, ``all`` or 1-based indices like ``1,3`` -> 0-based indices
    into the ``num_states`` internal states a student exposes (decoder layers, network stages)."""
    spec = spec.strip()
    if spec == "last":
        return [num_states - 1]
    if spec == "all":
        return list(range(num_states))
    try:
        idx = [int(t) for t in spec.split(",")]
    except ValueError:
        raise ValueError(f"--teacher-states {spec!r}: use last, all, or 1-based {what} like 1,3") from None
    bad = [i for i in idx if not 1 <= i <= num_states]
    if bad:
        raise ValueError(f"--teacher-states {spec!r}: this student exposes {what} 1..{num_states}, not {bad}")
    return [i - 1 for i in idx]


class RunningNorm(nn.Module):
    """Standardise features with running (EMA) first and second moments.

    Decoder states, summed losses and lengths live on very different scales; this keeps the
    MLP's inputs near unit scale without depending on the composition of one batch. The moments
    are EMAs over batches (so between-batch variation counts too), and the variance has a floor so
    a near-constant feature is not blown up. They are buffers: saved and restored with the teacher.
    """

    def __init__(self, dim: int, momentum: float = 0.01, min_var: float = 1e-4):
        super().__init__()
        self.momentum, self.min_var = momentum, min_var
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("sq", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

        self._acc: Optional[torch.Tensor] = None  # [sum x, sum x^2, n] of batches not yet folded in

    @torch.no_grad()
    def accumulate(self, x: torch.Tensor) -> None:
        """Add a batch to the moments that the next :meth:`commit` folds in."""
        if x.shape[0] == 0:
            return
        x = x.detach().to(self.mean)
        acc = torch.cat([x.sum(0), (x * x).sum(0), x.new_tensor([x.shape[0]])])
        self._acc = acc if self._acc is None else self._acc + acc

    @torch.no_grad()
    def commit(self, all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Fold the accumulated batches into the running moments; ``all_reduce`` (an in-place sum over
        data-parallel workers) makes every worker fold in the same moments. Every worker must call it."""
        d = self.mean.numel()
        acc = self._acc if self._acc is not None else self.mean.new_zeros(2 * d + 1)
        self._acc = None
        if all_reduce is not None:
            all_reduce(acc)
        n = float(acc[-1])
        if n == 0:
            return
        m, sq = acc[:d] / n, acc[d:2 * d] / n
        if self.count == 0:  # first batch: take its moments as they are
            self.mean.copy_(m)
            self.sq.copy_(sq)
        else:
            self.mean.lerp_(m, self.momentum)
            self.sq.lerp_(sq, self.momentum)
        self.count += 1

    @torch.no_grad()
    def reset(self, x: torch.Tensor) -> None:
        """The moments of ``x`` (``[N, dim]``) alone, as if it were the first batch."""
        x = x.to(self.mean)
        self.mean.copy_(x.mean(0))
        self.sq.copy_((x * x).mean(0))
        self.count.fill_(1)
        self._acc = None

    def update(self, x: torch.Tensor) -> None:
        """Fold one batch into the running moments at once (one process)."""
        self.accumulate(x)
        self.commit()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = (self.sq - self.mean * self.mean).clamp_min(self.min_var)
        return (x - self.mean) / var.sqrt()


class RunningMean(nn.Module):
    """The running (EMA) mean of a scalar (``--weight-norm running``: the teacher's output). It starts from the
    first update's batches and moves by ``momentum`` at every update after; a buffer, saved and restored with the
    teacher."""

    def __init__(self, momentum: float = 0.02):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))
        self._acc: Optional[torch.Tensor] = None  # [sum, examples] not yet folded in

    @torch.no_grad()
    def accumulate(self, x: torch.Tensor) -> None:
        x = x.detach().to(self.mean).flatten()
        acc = torch.stack([x.sum(), x.new_tensor(float(x.numel()))])
        self._acc = acc if self._acc is None else self._acc + acc

    @torch.no_grad()
    def commit(self, all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Fold the accumulated batches in (``all_reduce``: summed over data-parallel workers; every worker calls it)."""
        acc = self._acc if self._acc is not None else self.mean.new_zeros(2)
        self._acc = None
        if all_reduce is not None:
            all_reduce(acc)
        total, n = acc[:1], acc[1:]
        seen = n > 0  # an update without examples (none so far) leaves it as it is
        rate = torch.where(self.count > 0, torch.full_like(total, self.momentum), torch.ones_like(total))
        self.mean.copy_(torch.where(seen, self.mean + rate * (total / n.clamp_min(1) - self.mean), self.mean))
        self.count += seen.long()

    def value(self) -> Optional[torch.Tensor]:
        """The running mean (``[1]``), or None before any batch was folded in."""
        return self.mean if bool(self.count.item() > 0) else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "sq" in state_dict:  # --weight-norm running before session 23 kept it as a RunningNorm(1)
            del state_dict[prefix + "sq"]
            state_dict[prefix + "count"] = state_dict[prefix + "count"].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Teacher(nn.Module):
    """MLP teacher with a sigmoid output.

    ``in_dim=1`` with the example's loss as the only input is MW-Net (Shu et al., 2019);
    richer inputs (student internal states, loss statistics, progress, label) are the
    deep-interaction teacher of Fan et al. (2021). The output layer starts at zero so every
    example starts with weight sigmoid(0) = 0.5, i.e. uniform weights after normalisation.
    The last ``passthrough`` input columns (already bounded features such as training progress
    or a one-hot label) skip the input standardisation.

    ``running_output``: keep the running mean of the output over batches (``output_scale``), which the output is
    divided by instead of its batch mean (``--weight-norm running``; False: ``batch``).

    ``prior``: the index of a standardised input column the teacher starts from: ``prior_scale`` (learned, from
    its initial value) times that column's standardised value (clipped to [-3, 3]) is added to the logit, so the
    teacher ranks by that input from its first step and the meta-gradient corrects it from there.

    ``prior_reference``: standardise the prior's column by the moments of a clean reference (``reference``: the
    meta set's values of that input, folded in like the input moments) instead of the training batches', and
    centre it :data:`PRIOR_MARGIN` standard deviation below the clean mean: a pair gets the prior's low weight only
    where it falls that far below what clean pairs show, however much of the corpus is noise (on clean data: the lower tail only).
    Before any reference value is folded in, the prior reads the training batches' standardisation.
    """

    PRIOR_MARGIN = 1.0

    def __init__(self, in_dim: int, hidden: int = 100, num_layers: int = 1, passthrough: int = 0,
                 prior: Optional[int] = None, prior_scale: float = 2.0, running_output: bool = False,
                 output_momentum: float = 0.02, prior_reference: bool = False):
        super().__init__()
        if not 0 <= passthrough <= in_dim:
            raise ValueError(f"passthrough={passthrough} must be within [0, in_dim={in_dim}]")
        if prior is not None and not 0 <= prior < in_dim - passthrough:
            raise ValueError(f"prior column {prior} must be a standardised input, within [0, {in_dim - passthrough})")
        self.in_dim, self.passthrough, self.prior = in_dim, passthrough, prior
        if prior is not None:
            self.prior_scale = nn.Parameter(torch.tensor(float(prior_scale)))
        self.norm = RunningNorm(in_dim - passthrough)
        # --teacher-prior-reference meta: the clean meta set's moments of the prior's input
        self.reference = RunningNorm(1, momentum=0.05) if (prior_reference and prior is not None) else None
        # --weight-norm running: the running mean of the output, which divides it into the weights
        self.out_norm = RunningMean(output_momentum) if running_output else None
        layers, d = [], in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(d, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def output_scale(self) -> Optional[torch.Tensor]:
        """The running mean output (``[1]``), None under batch normalisation or before any batch was folded in."""
        return None if self.out_norm is None else self.out_norm.value()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(
                f"teacher expects features of shape [batch, {self.in_dim}], got {tuple(features.shape)}; "
                "the student's feature size changed (different --teacher-states or architecture?)"
            )
        x = features.float()
        k = self.in_dim - self.passthrough
        z = self.norm(x[:, :k])
        logit = self.out(self.body(torch.cat([z, x[:, k:]], 1) if self.passthrough else z)).squeeze(-1)
        if self.prior is not None:
            logit = logit + self.prior_scale * self.prior_value(x, z).clamp(-3.0, 3.0)
        return torch.sigmoid(logit)

    def prior_value(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The prior's column as the logit reads it: standardised by the training batches' moments, or (with a
        clean reference folded in) by the reference's, shifted up by the margin."""
        if self.reference is None or int(self.reference.count) == 0:
            return z[:, self.prior]
        return self.reference(x[:, self.prior:self.prior + 1])[:, 0] + self.PRIOR_MARGIN

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.reference is not None and prefix + "reference.mean" not in state_dict:  # a teacher saved without one
            for k, v in self.reference.state_dict().items():
                state_dict[prefix + "reference." + k] = v
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
