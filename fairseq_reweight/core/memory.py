"""``--weight-ema``: each example's teacher output averaged over its visits (once per epoch), a temporal ensemble
of the teacher's judgements (as Laine & Aila, 2017, average a network's predictions).

The teacher's ranking of clean against noisy labels moves from epoch to epoch (it learns from one noisy meta batch
at a time); the errors of one epoch are mostly not those of the next. On Fashion-MNIST with 40 % flip noise the
weights of one epoch ranked clean above flipped labels with AUC 0.73-0.78 at the last epoch of 10,000-image runs,
their average over the last five epochs with 0.93-0.97 (session 36, ``examples/image/session36/``).

    m_i <- decay * m_i + (1 - decay) * teacher(x_i)      (m_i = teacher(x_i) at the first visit)

The student trains with the batch-normalised ``m``; the meta-gradient reaches the teacher through the
``(1 - decay) * teacher(x_i)`` term, at every visit (the first one too: see :meth:`WeightMemory.mix`). New values are staged per batch and written once per update by
:meth:`WeightMemory.commit` (data parallel: summed over workers, so every worker keeps the same table).
"""

from typing import Callable, List, Optional, Tuple

import torch


class WeightMemory:
    def __init__(self, decay: float, size: int):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--weight-ema must be in [0, 1), got {decay}")
        if size < 1:
            raise ValueError(f"the weight memory needs the number of training examples, got {size}")
        self.decay = float(decay)
        self.values = torch.full((int(size),), float("nan"))  # NaN: not visited yet
        self._staged: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def _check(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.values.numel()):
            raise IndexError(f"example ids must be within [0, {self.values.numel()}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    def mix(self, ids: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """``raw`` (the teacher's outputs of the examples ``ids``) averaged into their memory (graph through ``raw``)."""
        self._check(ids)
        self.values = self.values.to(raw.device)
        prev = self.values[ids].to(raw.dtype)
        # an example's first visit starts its memory at the teacher's output: the value is the output, and the
        # gradient has the (1 - decay) scale of every later visit (a first epoch of larger gradients would swell
        # the teacher Adam's second moment and slow the teacher for its ~1000-step memory)
        prev = torch.where(torch.isnan(prev), raw.detach(), prev)
        return self.decay * prev + (1.0 - self.decay) * raw

    def stage(self, ids: torch.Tensor, mixed: torch.Tensor) -> None:
        """The values the batch trained with, written by the next :meth:`commit`."""
        self._staged.append((ids.detach(), mixed.detach().float()))

    def commit(self, all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Write the staged values (once per update; with ``all_reduce``, on every worker: one collective)."""
        staged, self._staged = self._staged, []
        if all_reduce is None:
            for ids, v in staged:
                self.values[ids.to(self.values.device)] = v.to(self.values.device)
            return
        dense = torch.zeros(2, self.values.numel(), device=self.values.device)
        for ids, v in staged:
            ids = ids.to(dense.device)
            dense[0, ids], dense[1, ids] = v.to(dense.device), 1.0
        all_reduce(dense)
        written = dense[1] > 0
        self.values[written] = dense[0, written] / dense[1, written]

    def checksum(self) -> torch.Tensor:
        return torch.nan_to_num(self.values.double()).sum()

    def state_dict(self) -> dict:
        return {"decay": self.decay, "values": self.values.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        values = state["values"]
        if values.numel() != self.values.numel():
            raise ValueError(f"the checkpoint's weight memory holds {values.numel()} examples but this training set "
                             f"has {self.values.numel()}: resume on the same data, or --reset-teacher")
        self.values = values.clone().to(self.values.device)
