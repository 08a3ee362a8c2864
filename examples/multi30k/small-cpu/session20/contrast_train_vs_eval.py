"""Source contrast with and without dropout: AUC against train.flags on N shuffled train batches.

    python examples/multi30k/small-cpu/session20/contrast_train_vs_eval.py CKPT DATA-BIN N
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
torch.set_num_threads(1)
from fairseq_reweight import score as S
from fairseq_reweight.core import auc
ck, data, nb = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, task, crit, nu = S._load(ck, data, "train", True)
flags = np.loadtxt(data + "/train.flags").astype(int)
itr = task.get_batch_iterator(dataset=task.dataset("train"), max_tokens=4096, seed=3, disable_iterator_cache=True,
                              required_batch_size_multiple=1).next_epoch_itr(shuffle=True)
res = {"train": [], "eval": [], "train_both": []}
ids_all = []
torch.manual_seed(0)
for i, sample in enumerate(itr):
    if i >= nb: break
    ids_all.append(sample["id"].numpy())
    with torch.no_grad():
        model.train(); out = crit.per_sentence(model, sample); res["train"].append(crit.source_contrast(model, sample, out).numpy())
        model.eval(); out = crit.per_sentence(model, sample); res["eval"].append(crit.source_contrast(model, sample, out).numpy())
        model.train(); out = crit.per_sentence(model, sample)
        dec = model.decoder; orig = dec.eval; dec.eval = lambda: dec
        res["train_both"].append(crit.source_contrast(model, sample, out).numpy()); dec.eval = orig
ids = np.concatenate(ids_all); clean = 1 - flags[ids]
for k, v in res.items():
    if v: print(k, len(ids), "AUC %.3f" % auc(np.concatenate(v), clean))
