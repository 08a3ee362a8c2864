"""``--drop-below W``: the teacher as a filter during training.

A reweighted student's batches still carry the examples its teacher has weighted to nearly nothing, so at a fixed
number of updates it sees fewer useful examples than a student trained on a filtered corpus (Multi30k, 30 %
misaligned: perfect weights on the same batches 30.96 BLEU, the clean pairs only 33.71). This leaves such examples
out of later epochs: each example's weights are averaged over an epoch, and an example whose mean weight was below
``W`` is left out of every later epoch (for good: it gets no new weight to come back with).

Framework-agnostic: the glue records ``(ids, weights)`` of every real batch and asks :meth:`EpochDrop.begin_epoch`
for the examples to leave out when it builds an epoch's batches (on every data-parallel worker: it all-reduces).
"""

from typing import Callable, Optional

import torch


def check_threshold(threshold: float) -> None:
    if not 0 < threshold < 1:
        raise ValueError(f"--drop-below must be in (0, 1) (weights have mean 1), got {threshold}")


class EpochDrop:
    def __init__(self, num_examples: int, threshold: float):
        check_threshold(threshold)
        self.threshold = threshold
        self.sums = torch.zeros(num_examples, dtype=torch.float64)  # this epoch's weights, per example
        self.counts = torch.zeros(num_examples, dtype=torch.float64)
        self.dropped = torch.zeros(num_examples, dtype=torch.bool)  # left out of the current epoch and all later ones
        self.epoch = 0  # the epoch whose batches ``dropped`` was applied to

    def record(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        ids = ids.detach().cpu().long()
        self.sums.index_add_(0, ids, weights.detach().cpu().double())
        self.counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))

    def begin_epoch(self, epoch: int, all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """The examples to leave out of epoch ``epoch``'s batches (a bool mask). The first call for a new epoch folds
        the previous epoch's weights in (summed over workers by ``all_reduce``); a repeated call for the same epoch
        (fairseq rebuilds the iterator of a resumed epoch) returns the same mask."""
        if epoch <= self.epoch:
            return self.dropped
        acc = torch.stack([self.sums, self.counts])
        if all_reduce is not None:
            all_reduce(acc)
        sums, counts = acc[0], acc[1]
        seen = counts > 0
        dropped = self.dropped | (seen & (sums < self.threshold * counts))
        if bool(dropped.all()):
            raise RuntimeError(f"--drop-below {self.threshold} would leave no training examples for epoch {epoch} (every "
                               "one had a mean weight below it in an earlier epoch): lower it")
        self.dropped = dropped
        self.sums.zero_()
        self.counts.zero_()
        self.epoch = epoch
        return self.dropped

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "epoch": self.epoch, "dropped": self.dropped.clone(),
                "sums": self.sums.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state:
            return
        if state["dropped"].numel() != self.dropped.numel():
            raise ValueError(f"the checkpoint's --drop-below state covers {state['dropped'].numel()} training examples "
                             f"but this training split has {self.dropped.numel()}: resume on the same data, or drop "
                             "the state with --reset-teacher")
        self.epoch = int(state["epoch"])
        self.dropped.copy_(state["dropped"])
        self.sums.copy_(state["sums"])
        self.counts.copy_(state["counts"])
