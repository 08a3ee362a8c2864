"""Where the weight on corrupted pairs comes from: batches grouped by their share of corrupted pairs.

    python examples/multi30k/small-cpu/session21/batch_composition.py RUN/weights.tsv DATA-BIN/train.flags [FROM_UPDATE]

One batch = the rows of one update in the weights dump (--dump-weights; one process, --update-freq 1). For each
group of batches: how many, the mean weight of their corrupted pairs, the batch's mean weight, and the share of
all weight in those batches that sits on corrupted pairs; then the share over all batches.
"""
import sys

import numpy as np

rows = np.loadtxt(sys.argv[1], skiprows=1)
flags = np.loadtxt(sys.argv[2]).astype(int)
start = int(sys.argv[3]) if len(sys.argv) > 3 else int(rows[:, 0].max() * 0.8)
rows = rows[rows[:, 0] >= start]
update, bad, w = rows[:, 0].astype(int), flags[rows[:, 1].astype(int)], rows[:, 2]
per_batch = []
for u in np.unique(update):
    s = update == u
    per_batch.append((bad[s].mean(), w[s & (bad == 1)].mean() if bad[s].any() else np.nan, w[s].mean(),
                      (w[s] * bad[s]).sum() / w[s].sum()))
b = np.array(per_batch)
print(f"updates >= {start}: {len(b)} batches; corrupted share of a batch, percentiles 5/25/50/75/95: "
      f"{np.percentile(b[:, 0], [5, 25, 50, 75, 95]).round(2).tolist()}")
print("| corrupted share of the batch | batches | mean weight of its corrupted pairs | batch mean weight | "
      "weight on corrupted pairs |\n|---|---|---|---|---|")
for lo, hi in [(0, .2), (.2, .3), (.3, .4), (.4, .5), (.5, .7), (.7, 1.01)]:
    s = (b[:, 0] >= lo) & (b[:, 0] < hi)
    if s.any():
        print(f"| {lo:.1f}–{min(hi, 1):.1f} | {s.sum()} | {np.nanmean(b[s, 1]):.3f} | {b[s, 2].mean():.3f} | "
              f"{b[s, 3].mean():.3f} |")
print(f"all batches: {(w * bad).sum() / w.sum():.3f} of the weight on corrupted pairs "
      f"(their share of the rows: {bad.mean():.3f})")
