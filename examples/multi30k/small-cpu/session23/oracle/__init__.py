"""Diagnostic, not part of the plugin: reweighting with the true noise flags.

``--task oracle_reweighted_translation --oracle-flags DATA-BIN/train.flags --reweight-method none``: every
training batch keeps its pairs, and each pair's weight is 0 if ``train.flags`` marks it corrupted, else
1 / (the clean fraction of the whole corpus) -- what ``--weight-norm running`` gives a perfect teacher. The
student sees the same batches as ``deep`` (corrupted pairs take their share of every batch), so this is the
ceiling of *reweighting* at a fixed number of updates, where the "perfect" row (retraining on the clean pairs
only) also fills every batch with clean pairs. Use it with ``--user-dir`` pointing here (this module imports
``fairseq_reweight``, which must be importable: PYTHONPATH=the checkout).
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from fairseq.tasks import register_task

from fairseq_reweight.task import ReweightedTranslationConfig, ReweightedTranslationTask


@dataclass
class OracleConfig(ReweightedTranslationConfig):
    oracle_flags: str = field(default="", metadata={"help": "train.flags of the data-bin (1 = corrupted)"})


class _OracleWeights:
    """Wraps the task's strategy: its weights replaced by the flags' (the student's step is the task's own)."""

    def __init__(self, inner, corrupted: np.ndarray, warmup: int):
        self.inner, self.warmup = inner, warmup
        self.corrupted = torch.from_numpy(corrupted)
        self.clean_weight = 1.0 / float(1.0 - corrupted.mean())
        self.ids = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def weights(self, step, features, losses, **kw):
        w, info = self.inner.weights(step, features, losses, **kw)
        if step >= self.warmup and self.ids is not None:
            bad = self.corrupted[self.ids.cpu()].to(losses.device)
            w = torch.where(bad, torch.zeros_like(w), torch.full_like(w, self.clean_weight))
        return w, info


@register_task("oracle_reweighted_translation", dataclass=OracleConfig)
class OracleReweightedTranslationTask(ReweightedTranslationTask):
    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        if not cfg.oracle_flags:
            raise ValueError("--oracle-flags DATA-BIN/train.flags is required")
        corrupted = np.loadtxt(cfg.oracle_flags, dtype=np.int64).astype(bool)
        self.strategy = _OracleWeights(self.strategy, corrupted, int(cfg.reweight_warmup or 0))

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self.strategy.ids = sample["id"]
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
