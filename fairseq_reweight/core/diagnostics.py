"""Weight diagnostics: summable per-batch statistics, AUC, and the per-example weight dump."""

import math
import os
from typing import Dict, Iterable, Optional

import numpy as np
import torch


def weight_stats(w: torch.Tensor) -> Dict[str, float]:
    """Statistics of one batch's normalised weights, all summable over batches/workers.

    ``w_low10`` is the fraction of the batch's weight mass on its lowest-weighted 10% of examples
    (at least one example); 0.1 for uniform weights, near 0 when the teacher silences a tail.
    Readers divide ``w_sum``/``w_sq`` by ``w_count`` and the other keys by ``w_batches``.
    """
    w = w.detach().float()
    n = w.numel()
    if n == 0:
        return {}
    k = max(1, math.ceil(0.1 * n))
    total = w.sum().clamp_min(1e-12)
    return {
        "w_count": float(n),
        "w_batches": 1.0,
        "w_sum": float(w.sum()),
        "w_sq": float((w * w).sum()),
        "w_min": float(w.min()),
        "w_max": float(w.max()),
        "w_low10": float(torch.sort(w).values[:k].sum() / total),
    }


def auc(scores: Iterable[float], positives: Iterable[int]) -> float:
    """Area under the ROC curve for ``scores`` ranking positives above negatives (ties count 1/2).

    For weight analysis pass the weights as scores and ``clean`` (1 = clean pair) as positives: an
    AUC of 1 means every clean example got a higher weight than every corrupted one.
    """
    s = np.asarray(list(scores), dtype=np.float64)
    y = np.asarray(list(positives), dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class WeightDumper:
    """Appends ``update<TAB>id<TAB>weight<TAB>loss`` rows (one per example) to a TSV file.

    One file per process: under distributed training rank r > 0 writes ``FILE.rank{r}``. A resumed run
    passes ``keep_before`` (the checkpoint's update count): this process's rows of later updates, written
    before the interruption, and a row the interruption cut short are dropped, so the file holds each
    update once.
    """

    HEADER = "update\tid\tweight\tloss\n"

    def __init__(self, path: str, rank: int = 0, keep_before: Optional[int] = None):
        self.path = path if rank == 0 else f"{path}.rank{rank}"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if keep_before is not None and os.path.isfile(self.path):
            tmp = f"{self.path}.tmp"
            with open(self.path) as src, open(tmp, "w") as dst:
                for i, line in enumerate(src):
                    if i == 0 or (line.endswith("\n") and int(line.split("\t", 1)[0]) < keep_before):
                        dst.write(line)  # (a last row without its newline was cut by the interruption)
            os.replace(tmp, self.path)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        self._f = open(self.path, "a", buffering=1 << 16)
        if new:
            self._f.write(self.HEADER)

    def write(self, update: int, ids: torch.Tensor, weights: torch.Tensor, losses: Optional[torch.Tensor]):
        ids = ids.detach().cpu().tolist()
        ws = weights.detach().float().cpu().tolist()
        ls = losses.detach().float().cpu().tolist() if losses is not None else [float("nan")] * len(ids)
        self._f.write("".join(f"{update}\t{i}\t{w:.6g}\t{l:.6g}\n" for i, w, l in zip(ids, ws, ls)))

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()
