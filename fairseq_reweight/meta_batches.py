"""Clean meta batches for the teacher: their own shuffled iterator over ``--meta-subset``, cycling over epochs,
one shard per data-parallel worker, with a ``state_dict`` for an exact resume."""

import torch
from fairseq import utils


def rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class MetaBatches:
    def __init__(self, task):
        self.task = task
        self._epoch_itr = self._itr = self._state = None

    def next(self, model, device):
        """The next meta batch, on ``device``. Starting a DataLoader iteration draws a seed from the global RNG:
        run under ``fork_rng`` so the training run's dropout stream does not depend on when meta epochs start
        (an exact resume depends on it)."""
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            sample = self._next(model)
        return utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample

    def _next(self, model):
        task, cfg = self.task, self.task.cfg
        if self._epoch_itr is None:
            rank, world = rank_world()
            self._epoch_itr = task.get_batch_iterator(
                dataset=task._meta_dataset(),
                max_tokens=cfg.meta_max_tokens or cfg.max_tokens,
                max_sentences=cfg.meta_batch_size or cfg.batch_size,
                max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
                ignore_invalid_inputs=True, seed=cfg.seed, num_shards=world, shard_id=rank,
                disable_iterator_cache=True,
            )
            if self._state is not None:
                self._epoch_itr.load_state_dict(self._state)
            self._itr = self._epoch_itr.next_epoch_itr(shuffle=True)
        for _ in range(3):  # a worker's shard is padded with empty batches when the batches do not divide evenly
            if not self._itr.has_next():
                self._itr = self._epoch_itr.next_epoch_itr(shuffle=True)
            sample = next(self._itr)
            if sample and "net_input" in sample:
                return sample
        raise ValueError(f"meta split '{cfg.meta_subset}' is too small to give each of the {rank_world()[1]} "
                         "workers a meta batch: add clean pairs to it")

    def state_dict(self):
        return self._epoch_itr.state_dict() if self._epoch_itr is not None else self._state

    def load_state_dict(self, state) -> None:
        self._state, self._epoch_itr, self._itr = state, None, None
