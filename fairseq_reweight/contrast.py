"""``--source-contrast once``: the source contrast (a target's per-token NLL given another source minus given its own)
of every training pair and every meta pair, computed in one pass when reweighting starts and kept for the rest of
training (instead of in every training batch, which costs about 1.7 forwards of the student per update). The
values are the teacher's input and prior; the meta set's become the prior's clean reference, folded into the teacher
once. ``--source-contrast-refresh N`` runs the pass again every N updates (the tuned recipe: once, half-way through the
reweighted updates), for the pairs ``--drop-below`` has not left out (theirs are kept), and the new meta values replace
the reference. Saved in the checkpoint: both NLLs, 8 bytes per pair, and the update of the last pass."""

import logging
import time
from typing import Optional

import numpy as np
import torch
from fairseq import utils
from fairseq.data import data_utils

from .meta_batches import rank_world

logger = logging.getLogger(__name__)


class CorpusContrast:
    def __init__(self):
        # [pairs, 2]: per-token NLL given another source, given the own source (float32, CPU)
        self.train: Optional[torch.Tensor] = None  # of the training split
        self.meta: Optional[torch.Tensor] = None  # of the meta split
        self.reference_pending = False  # the meta values still to be folded into the teacher's reference
        self.built_at: Optional[int] = None  # the update of the last pass
        self.passes = 0  # passes so far (> 1: refreshed)

    @property
    def ready(self) -> bool:
        return self.train is not None

    def due(self, update_num: int, every: int = 0) -> bool:
        """Whether a pass runs at this update: the first, or ``every`` > 0 updates after the last one."""
        if not self.ready:
            return True
        # (an update count below the last pass's: the counter was reset, e.g. by --reset-optimizer)
        return every > 0 and self.built_at is not None and (
            update_num >= self.built_at + every or update_num < self.built_at)

    def build(self, task, inner, criterion, all_reduce, update_num: int = 0,
              skip: Optional[torch.Tensor] = None) -> None:
        """One pass over the training and the meta split (:func:`split_contrast`); on a refresh the training pairs
        ``skip`` marks (``[pairs]`` bool: left out by --drop-below) are not scored again and keep their values. Data
        parallel: each worker scores its shard of the batches and one all-reduce (sum) joins them, so every worker
        must call it at the same update, with the same ``skip``."""
        start, (rank, world) = time.time(), rank_world()
        datasets = [task.dataset(task.cfg.train_subset), task._meta_dataset()]
        skip = skip.numpy().astype(bool) if (self.ready and skip is not None and bool(skip.any())) else None
        n = len(datasets[0]) - (0 if skip is None else int(skip.sum()))
        what = "again at update {} ({} left out keep theirs)".format(
            update_num, len(datasets[0]) - n) if self.ready else "at update {}".format(update_num)
        logger.info(f"--source-contrast once: scoring {n} training and {len(datasets[1])} meta pairs {what} (one pass "
                    f"in eval mode{f', {world} workers' if world > 1 else ''})")
        cfg = task.cfg
        values = torch.cat([split_contrast(task, inner, criterion, datasets[0], rank, world, parts=True, skip=skip),
                            split_contrast(task, inner, criterion, datasets[1], rank, world, parts=True,
                                           max_tokens=cfg.meta_max_tokens or cfg.max_tokens)])
        if world > 1:
            all_reduce(values)
        values = values.cpu()
        train, self.meta = values[:len(datasets[0])], values[len(datasets[0]):]
        if skip is not None:
            keep = torch.from_numpy(skip)
            train[keep] = self.train[keep]
        self.train, self.built_at, self.passes, self.reference_pending = train, update_num, self.passes + 1, True
        logger.info(f"--source-contrast once: done in {time.time() - start:.0f} s")

    def check_size(self, pairs: int) -> None:
        if len(self.train) != pairs:
            raise ValueError(f"the checkpoint's source contrast (--source-contrast once) covers {len(self.train)} "
                             f"training pairs, but this training split has {pairs}: the checkpoint was trained on "
                             "another split; continue from it with --reset-teacher")

    def values(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B]``: the source contrast of the training split's pairs ``ids`` (:meth:`check_size` first)."""
        rows = self.train[ids.cpu()].to(ids.device)
        return rows[:, 0] - rows[:, 1]

    def state_dict(self) -> Optional[dict]:
        return None if self.train is None else {"train": self.train, "meta": self.meta, "built_at": self.built_at,
                                                "passes": self.passes, "reference_pending": self.reference_pending}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            if state["train"].dim() != 2:
                raise ValueError("this checkpoint's --source-contrast values are of an older format (the contrast "
                                 "only); continue from it with --reset-teacher, which runs the corpus pass again")
            self.train, self.meta = state["train"], state["meta"]
            self.reference_pending = bool(state.get("reference_pending", False))
            # checkpoints written before --source-contrast-refresh: one pass, at an update not saved (no refresh)
            self.built_at, self.passes = state.get("built_at"), state.get("passes", 1)


def contrast_batches(task, inner, dataset, max_tokens: Optional[int] = None, skip: Optional[np.ndarray] = None) -> list:
    """The batches of the pass: ``max_tokens`` (default the task's ``--max-tokens``) over the pairs sorted by length
    (the order breaks ties with numpy's RNG: seeded, so every worker builds the same list), too long ones and those
    ``skip`` marks left out.
    A batch of one pair (which has no other source to read) joins its neighbour."""
    with data_utils.numpy_seed(task.cfg.seed):
        indices = dataset.ordered_indices()
    if skip is not None:
        indices = indices[~skip[indices]]
    indices, _ = dataset.filter_indices_by_size(
        indices, utils.resolve_max_positions(task.max_positions(), inner.max_positions()))
    batches = list(dataset.batch_by_size(indices, max_tokens=max_tokens or task.cfg.max_tokens,
                                         max_sentences=task.cfg.batch_size))
    for k in range(len(batches) - 1, -1, -1):
        if len(batches[k]) < 2 and len(batches) > 1:
            j = k - 1 if k > 0 else 1
            batches[j] = np.concatenate([batches[j], batches[k]])
            del batches[k]
    return batches


def scored(values: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the rows of a pass's ``[N, 2]`` NLLs that were scored (a per-token NLL is never exactly 0; the
    rows of pairs the pass left out, too long for the model, stay 0)."""
    return values.ne(0).any(1)


def split_contrast(task, inner, criterion, dataset, rank: int = 0, world: int = 1,
                   max_tokens: Optional[int] = None, parts: bool = False, skip: Optional[np.ndarray] = None) -> torch.Tensor:
    """``[len(dataset)]`` (``parts``: ``[len(dataset), 2]``): ``criterion.source_contrast`` of every pair, in
    batches of the task's ``--max-tokens`` built from the length-sorted pairs (as training batches are: each pair's
    contrast source has about its length); in eval mode, without graph, the RNG untouched (:func:`contrast_batches`).
    ``rank``/``world``: this worker's share of the batches (the
    others' pairs stay 0), as are pairs longer than the model's maximum positions and those ``skip`` marks."""
    device = next(inner.parameters()).device
    values = torch.zeros((len(dataset), 2) if parts else len(dataset), dtype=torch.float32, device=device)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in contrast_batches(task, inner, dataset, max_tokens, skip)[rank::world]:
            sample = dataset.collater([dataset[int(i)] for i in batch])
            if device.type == "cuda":
                sample = utils.move_to_cuda(sample, device=device)
            values[sample["id"]] = criterion.source_contrast(inner, sample, parts=parts).float()
    return values


def refresh_reference(task, inner, criterion, teacher) -> None:
    """Scoring with ``--source-contrast once``'s teacher: it learnt on contrasts of the student when reweighting
    started, the scorer computes them with the checkpoint's student (larger, as it learnt to read the source); the
    prior's clean reference is re-measured on the meta set with the same student, so it is on the same scale."""
    if teacher.reference is not None and task.cfg.teacher_prior == "source_contrast":
        meta = split_contrast(task, inner, criterion, task._meta_dataset(), max_tokens=task.cfg.meta_max_tokens,
                              parts=True).cpu()
        meta = meta[scored(meta)]
        teacher.reference.reset((meta[:, 0] - meta[:, 1])[:, None])
