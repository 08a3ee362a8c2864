#!/usr/bin/env python
"""Where do a run's weights of *clean* pairs depend on sentence length: across batches or within them?

fairseq buckets batches by length. With ``--weight-norm batch`` or ``running`` the teacher's gradient is the batch
normalisation's, which cannot see a factor common to a whole batch, so the weight level of a batch (a length
bucket) is never trained by the meta-gradient. This prints, over the last ``--tail`` of a run's updates:
the correlation between a batch's mean clean weight and its mean target length (across batches), the mean
within-batch correlation of weight and length, and the mean clean weight by batch length. ``--scores`` (a
``fairseq-reweight-score`` TSV) adds the share of clean and corrupted pairs a keep-``--keep`` filter keeps per
length, for comparison.

    python examples/multi30k/small-cpu/session22/length_bias.py --data DATA-BIN --weights RUN/weights.tsv
"""

import argparse

import numpy as np
from fairseq.data import data_utils

BINS = [0, 12, 15, 18, 22, 1000]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data-bin with train.flags (1 = corrupted)")
    p.add_argument("--weights", nargs="*", default=[], help="weights.tsv of runs (update, id, weight, loss)")
    p.add_argument("--scores", nargs="*", default=[], help="fairseq-reweight-score TSVs (id, score, ...)")
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--tail", type=float, default=0.2, help="last fraction of the updates (default 0.2)")
    p.add_argument("--src", default="de")
    p.add_argument("--tgt", default="en")
    args = p.parse_args()
    ds = data_utils.load_indexed_dataset(f"{args.data}/train.{args.src}-{args.tgt}.{args.tgt}", None)
    length = np.array(ds.sizes).copy()
    corrupted = np.loadtxt(f"{args.data}/train.flags").astype(bool)
    for path in args.weights:
        up, idx, w = np.loadtxt(path, skiprows=1, usecols=(0, 1, 2)).T
        idx = idx.astype(int)
        last = up >= up.min() + (1 - args.tail) * (up.max() - up.min())
        lens, means, within = [], [], []
        for u in np.unique(up[last]):
            k = (up == u) & ~corrupted[idx]
            if k.sum() < 5:
                continue
            lens.append(length[idx[k]].mean())
            means.append(w[k].mean())
            if length[idx[k]].std() > 0 and w[k].std() > 0:
                within.append(np.corrcoef(w[k], length[idx[k]])[0, 1])
        lens, means = np.array(lens), np.array(means)
        print(f"{path}: {len(lens)} batches; corr(batch mean clean weight, batch mean target length) "
              f"{np.corrcoef(means, lens)[0, 1]:+.3f}; mean within-batch corr(weight, length) {np.mean(within):+.3f}")
        k = last & corrupted[idx]
        print(f"  weight on corrupted pairs: {w[k].sum() / w[last].sum():.3f} of all")
        for lo, hi in zip(BINS[:-1], BINS[1:]):
            b = (lens >= lo) & (lens < hi)
            if b.any():
                print(f"  batches of mean target length [{lo}, {hi}): {b.sum():4d}, mean clean weight {means[b].mean():.3f}")
    for path in args.scores:
        rows = [line.split("\t") for line in open(path).read().splitlines()[1:]]
        ids = np.array([int(r[0]) for r in rows])
        s = np.array([float(r[1]) for r in rows])
        keep = np.zeros(len(s), bool)
        keep[np.argsort(-s)[: int(args.keep * len(s))]] = True
        print(f"{path}: kept by a keep-{args.keep} filter, by target length")
        for lo, hi in zip(BINS[:-1], BINS[1:]):
            b = (length[ids] >= lo) & (length[ids] < hi)
            c = corrupted[ids]
            print(f"  target length [{lo}, {hi}): clean {keep[b & ~c].mean():.3f} (of {(b & ~c).sum()}), corrupted "
                  f"{keep[b & c].mean():.3f} (of {(b & c).sum()})")


if __name__ == "__main__":
    main()
