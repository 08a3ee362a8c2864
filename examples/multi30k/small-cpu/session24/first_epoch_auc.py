"""Weight AUC (clean vs corrupted) of a --drop-below run over an update range where every pair is still in the
batches (the first reweighted epoch), and over the last 20 % of updates (where the batches hold the pairs the
teacher kept: mostly clean, so the AUC there measures only the ranking of what is left).

    python first_epoch_auc.py WEIGHTS.tsv TRAIN.flags --first 400 --last 530
"""

import argparse
import json

import numpy as np
from sklearn.metrics import roc_auc_score


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("flags")
    ap.add_argument("--first", type=int, default=400)
    ap.add_argument("--last", type=int, default=530)
    a = ap.parse_args()
    w = np.loadtxt(a.weights, skiprows=1)
    flags = np.loadtxt(a.flags, dtype=int)
    upd, ids, weight = w[:, 0], w[:, 1].astype(int), w[:, 2]
    clean = flags[ids] == 0

    def auc(m):
        return float(roc_auc_score(clean[m], weight[m])) if 0 < clean[m].sum() < m.sum() else None

    first = (upd >= a.first) & (upd < a.last)
    tail = upd >= upd.max() * 0.8
    out = {"updates": [a.first, a.last], "auc_first_epoch": auc(first),
           "mean_weight_clean_first": float(weight[first & clean].mean()),
           "mean_weight_corrupted_first": float(weight[first & ~clean].mean()),
           "auc_last_20pct": auc(tail), "corrupted_share_last_20pct": float((~clean[tail]).mean())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
