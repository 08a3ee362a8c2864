"""How stale can the meta direction of ``--meta-grad fast`` be? (the measurement behind --meta-refresh in
the README; an ad-hoc analysis, not part of the package)

At a trained checkpoint (its Adam state loaded, lr 5e-4, dropout off), compares the per-sentence
meta-gradients <grad L_meta, grad l_i> of one training batch (centered over the batch: the weights are
normalised, so only differences between sentences matter) computed from

  * the direction of another meta batch at the same parameters (meta-batch noise),
  * the average direction of 8 meta batches (what --meta-ema averages toward),
  * a direction 1, 3 and 8 Adam updates old vs a fresh one on the same meta batch (--meta-refresh).

    python examples/performance/meta_direction_staleness.py \\
        runs/multi30k_v2/noisy/none/seed1/checkpoint_last.pt data-bin/multi30k_de_en_v8000_m1000_s1_misaligned0.3
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from meta_signal import load  # noqa: E402

from fairseq_reweight.core import MetaDirection, first_order  # noqa: E402


def main(ck, data):
    torch.set_num_threads(1)
    model, task, cfg = load(ck, data, with_cfg=True)
    crit = task.build_criterion(cfg.criterion)
    model.eval()
    dev = torch.device("cpu")
    task.load_dataset("train")
    task._meta_dataset()
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=1024, seed=3).next_epoch_itr(shuffle=True)
    batches = [next(itr) for _ in range(12)]
    probe_sample = batches[-1]

    def dots(direction):
        probe = task._get_probe(model)
        with probe.watch(capture_grads=True):
            out = crit.per_sentence(model, probe_sample)
        probe.output_grads(out.loss.sum())
        return first_order(probe, direction, out.loss.detach().sum(), 1.0, 1.0,
                           int(probe_sample["target"].size(0))).grad_w

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a - a.mean(), b - b.mean(), dim=0))

    state = task.state_dict()
    dirs = [task._meta_direction(model, crit, dev)[0] for _ in range(8)]
    d0 = [dots(d) for d in dirs]
    avg = {k: sum(d[k] for d in dirs) / len(dirs) for k in dirs[0]}
    print("another meta batch, same parameters:", [round(cos(d0[0], d), 3) for d in d0[1:4]])
    print("one meta batch vs the 8-batch average:", [round(cos(d, dots(avg)), 3) for d in d0[:4]])
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-8)
    saved = torch.load(ck, weights_only=False)["last_optimizer_state"]
    saved["param_groups"][0] = {**opt.state_dict()["param_groups"][0], "lr": 5e-4}
    opt.load_state_dict(saved)
    for k in range(8):
        opt.zero_grad()
        crit.per_sentence(model, batches[k]).loss.sum().backward()
        opt.step()
        if k + 1 in (1, 3, 8):
            task.load_state_dict(state)  # the first meta batch again
            task._meta_dir = MetaDirection()
            fresh = dots(task._meta_direction(model, crit, dev)[0])
            print(f"{k + 1} update(s) old vs fresh, same meta batch: {cos(dots(dirs[0]), fresh):.3f}; "
                  f"the old 8-batch average vs fresh: {cos(dots(avg), fresh):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
