"""How the teacher's weights of single epochs compare with their average over epochs, from finished image runs.

    python examples/image/session36/weight_history.py RUN_DIR [RUN_DIR ...]

A run directory is one of ``python -m fairseq_reweight.image.compare``'s (``OUT/NOISE/deep/seedS``, with
``weights.tsv`` from ``--dump-weights`` and ``labels.tsv``). Per run it prints the clean-vs-noisy AUC of the weights
each example got in each of the last six epochs (``epoch``), of their exponential average over the epochs with decay
d per visit (``avg d``: what ``--weight-ema d`` trains with, had the teacher been the same), and the mean weight of
clean and noisy examples in the last epoch per *given* label.
"""

import csv
import sys
from pathlib import Path

import numpy as np

from fairseq_reweight.core import auc


def load(run: Path):
    labels = {}
    with open(run / "labels.tsv") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if r["split"] == "train":
                labels[int(r["id"])] = (int(r["label"]), int(r["noisy"]))
    rows = np.loadtxt(run / "weights.tsv", skiprows=1, ndmin=2)
    ids = np.array(sorted(labels))
    pos = {i: k for k, i in enumerate(ids)}
    per_epoch = -(-len(ids) // 100)  # updates per epoch (batch 100; the last batch may be short)
    epochs = int(rows[:, 0].max()) // per_epoch + 1
    w = np.full((epochs, len(ids)), np.nan)
    w[(rows[:, 0] // per_epoch).astype(int), [pos[int(i)] for i in rows[:, 1]]] = rows[:, 2]
    given = np.array([labels[i][0] for i in ids])
    noisy = np.array([labels[i][1] for i in ids], dtype=bool)
    return w, given, noisy


def averaged(w: np.ndarray, decay: float) -> np.ndarray:
    out, m = np.empty_like(w), np.full(w.shape[1], np.nan)
    for t in range(len(w)):
        m = np.where(np.isnan(m), w[t], np.where(np.isnan(w[t]), m, decay * m + (1 - decay) * w[t]))
        out[t] = m
    return out


def main(runs):
    for run in map(Path, runs):
        w, given, noisy = load(run)
        last = range(max(0, len(w) - 6), len(w))
        print(f"{run}  ({len(w)} epochs, AUC of epochs {last.start + 1}-{last.stop})")
        print("  epoch    " + " ".join(f"{auc(np.nan_to_num(w[e], nan=1.0), ~noisy):.3f}" for e in last))
        for d in (0.5, 0.7, 0.8):
            a = averaged(w, d)
            print(f"  avg {d:<4} " + " ".join(f"{auc(np.nan_to_num(a[e], nan=1.0), ~noisy):.3f}" for e in last))
        print("  last epoch, mean weight clean / noisy by given label (labels that received flipped ones): " + ", ".join(
            f"{c}: {np.nanmean(w[-1][(given == c) & ~noisy]):.2f}/{np.nanmean(w[-1][(given == c) & noisy]):.2f}"
            for c in np.unique(given[noisy])))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
