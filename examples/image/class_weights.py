"""Where do deep's weights go? Per-epoch weight AUC (all examples, and within each observed class), and the
mean weight of the clean examples of each class, from the --dump-weights and labels.tsv files of image runs.

    python examples/image/class_weights.py runs/image/compare/deep runs/image/compare/mwnet ...
"""
import sys

import numpy as np

from fairseq_reweight.core import auc


def load(run_dir):
    w = np.loadtxt(f"{run_dir}/weights.tsv", skiprows=1)  # update id weight loss
    labels = {}
    for line in open(f"{run_dir}/labels.tsv").read().splitlines()[1:]:  # id label true_label noisy split
        f = line.split("\t")
        labels[int(f[0])] = (int(f[1]), int(f[3]))
    lab = np.array([labels[int(i)] for i in w[:, 1]])
    return w, lab[:, 0], 1 - lab[:, 1]


def main(dirs):
    for d in dirs:
        w, observed, clean = load(d)
        per_epoch = int(round(len(np.unique(w[:, 1])) / 100))  # updates per epoch (batch 100)
        epoch = (w[:, 0] // per_epoch).astype(int)
        print(d)
        print("  epoch  AUC(w)  AUC(-loss)  AUC(w) within class  mean w of clean examples, classes 0-9")
        for e in sorted(set(epoch.tolist())):
            k = epoch == e
            ww, cl, ob = w[k, 2], clean[k], observed[k]
            within = np.mean([auc(ww[ob == c], cl[ob == c]) for c in range(10)])
            by_class = " ".join(f"{ww[(ob == c) & (cl == 1)].mean():.2f}" for c in range(10))
            print(f"  {e + 1:5d}  {auc(ww, cl):.3f}   {auc(-w[k, 3], cl):.3f}       {within:.3f}              {by_class}")


if __name__ == "__main__":
    main(sys.argv[1:])
