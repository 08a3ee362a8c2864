"""The NMT teacher's inputs (``--teacher-inputs``), one function each (core/features.py)."""

from typing import List, NamedTuple, Optional

import torch

from .core.features import Input


class Batch(NamedTuple):
    out: object  # criterion.SentenceOutput
    sample: dict
    contrast: Optional[torch.Tensor]  # criterion.source_contrast, where asked for
    progress: float


def _token_stats(b: Batch) -> torch.Tensor:
    nll, mask = b.out.token_nll.float(), b.out.mask
    length = mask.sum(1).clamp_min(1).float()
    mean = nll.sum(1) / length
    mx = nll.masked_fill(~mask, float("-inf")).max(1).values.clamp_min(0)
    std = (((nll - mean[:, None]) ** 2 * mask).sum(1) / length).sqrt()
    return torch.stack([mean, mx, std, length.log()], 1)


def _length_ratio(b: Batch) -> torch.Tensor:
    length = b.out.mask.sum(1).clamp_min(1).float()
    src = b.sample["net_input"]["src_lengths"].to(length).clamp_min(1)
    return (length.log() - src.log())[:, None]


def _source_contrast(b: Batch) -> torch.Tensor:
    if b.contrast is None:
        raise ValueError("the source_contrast input needs criterion.source_contrast of the batch")
    return b.contrast.float()[:, None]


FEATURES = {
    "states": Input(lambda b: torch.cat([s.float() for s in b.out.states], 1),
                    help="mean-pooled decoder states of --teacher-states"),
    "token_stats": Input(_token_stats, help="mean, max and std of the token NLL, log target length"),
    "loss": Input(lambda b: b.out.loss.detach().float()[:, None], help="the sentence loss (MW-Net's input)"),
    "length_ratio": Input(_length_ratio, help="log(target length / source length)"),
    "source_contrast": Input(_source_contrast, help="per-token NLL rise when the decoder reads another source"),
    "progress": Input(lambda b: torch.full_like(b.out.loss.detach().float()[:, None], b.progress), standardise=False,
                      help="training progress in [0, 1]"),
}

# what --teacher-inputs auto means
PAPER_DEEP = "states,token_stats,progress"  # Fan et al. 2021: decoder states, loss statistics, progress
TUNED_DEEP = "states,token_stats,source_contrast,progress"
MWNET = "loss"  # Shu et al. 2019


def needs_contrast(names: List[str]) -> bool:
    return "source_contrast" in names
