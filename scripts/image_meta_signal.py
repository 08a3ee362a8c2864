#!/usr/bin/env python
"""How well does each meta-gradient estimator of the image module tell clean from noisy labels? (a run folder)

The images' counterpart of ``scripts/meta_signal.py``. For a run of ``python -m fairseq_reweight.image`` (its
checkpoint and labels), draws ``--batches`` training batches (train-mode BatchNorm, as in training, without
augmentation) and scores every image by the first-order meta-gradient ``s_i = <dL_meta/dθ, dℓ_i/dθ>``
(``-η`` times ``∂L_m/∂w_i``; a larger score means the teacher is pushed to raise the weight), computed

* ``exact:all``  on every parameter, per example exactly (forward-mode AD along the meta direction: one pass,
  BatchNorm's coupling of the batch included) -- what ``--meta-grad fd`` estimates, at θ instead of θ';
* ``exact:stage,fc``, ``exact:fc``  the same restricted to the last stage's convolutions + classifier / the
  classifier;
* ``replay:stage``  the image default (the last stage + classifier replayed, core/replay.py), by a central
  difference and by a forward one from the training losses; ``replay:block`` the tail from the last residual
  block on (``--meta-params block``), one-sided;
* ``probe:fc``, ``probe:stage,fc``, ``probe:all``  as ``--meta-grad fast --meta-params ...`` computes it (the
  student's backward at each probed output, divided by the example's weight), with uniform weights and with
  weights ``--probe-weights`` (clean / noisy: what a teacher that already separates them gives; the division
  by a small weight is where BatchNorm's coupling hurts),

with the meta direction of the whole meta set and of one meta batch (the replays also with half a meta batch,
``--meta-batch-size`` half the batch). Prints and writes (``--out``) the AUC of
each score as a detector of clean labels (1: every clean image above every noisy one; 0.5: chance), and of
−loss for reference.

    python scripts/image_meta_signal.py --run runs/image/none-flip --preset cpu --noise flip --out signal.json
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq_reweight.core import auc  # noqa: E402
from fairseq_reweight.core.probe import LayerProbe  # noqa: E402
from fairseq_reweight.image import student  # noqa: E402
from fairseq_reweight.image.cli import parse_config  # noqa: E402
from fairseq_reweight.image.train import Trainer  # noqa: E402


def _functional(model, params, x):
    return torch.func.functional_call(model, {**student.replay_buffers(model), **params}, (x,))


def meta_direction(model, meta_x, meta_y, batch: int):
    """dL_meta/dθ (all parameters) averaged over the meta set in batches of ``batch``, of its first batch, and of
    the first half of that batch (--meta-batch-size batch/2)."""
    params = dict(model.named_parameters())

    def grad(x, y):
        loss = F.cross_entropy(_functional(model, params, x), y)
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    total, first, n = None, None, 0
    for s in range(0, len(meta_y), batch):
        g = grad(meta_x[s:s + batch], meta_y[s:s + batch])
        first = first or g
        total = g if total is None else {k: total[k] + g[k] for k in g}
        n += 1
    return {k: v / n for k, v in total.items()}, first, grad(meta_x[:batch // 2], meta_y[:batch // 2])


def exact_dots(model, x, y, direction, names):
    """``<direction restricted to names, dℓ_i/dθ>`` for every example, by forward-mode AD (train-mode BatchNorm)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    with fwAD.dual_level():
        duals = {n: (fwAD.make_dual(p, direction[n]) if n in names else p) for n, p in params.items()}
        losses = F.cross_entropy(_functional(model, duals, x), y, reduction="none")
        return fwAD.unpack_dual(losses).tangent.detach()


def probe_dots(model, probe: LayerProbe, x, y, direction, weights):
    """What ``--meta-grad fast`` computes: the backward of ``sum_i w_i ℓ_i``, output gradients divided by ``w_i``."""
    params = dict(model.named_parameters())
    with probe.watch(capture_grads=True):
        losses = F.cross_entropy(_functional(model, params, x), y, reduction="none")
    probe.output_grads((weights * losses).sum(), retain_graph=False)
    names = {id(p): n for n, p in model.named_parameters()}
    v = {k: direction[names[id(p)]] for k, p in probe.parameters().items()}
    return probe.example_dots(v, len(y)) / weights


def replay_dots(model, x, y, direction, dname, losses, part="stage"):
    """What the image default computes (the last stage + classifier replayed from its recorded input,
    core/replay.py), by a central difference (two replays) and a forward one from the training losses (one);
    ``part="block"``: the tail from the last residual block on (--meta-params block), one-sided only."""
    tail = student.probe_layers(model, part, labels=lambda: y)
    names = {id(p): n for n, p in model.named_parameters()}
    v = {k: direction[names[id(p)]] for k, p in tail.parameters().items()}
    with tail.watch(), torch.no_grad():
        _functional(model, dict(model.named_parameters()), x)
    one_sided = {f"replay:{part} one-sided ({dname})": tail.example_dots(v, len(y), base=losses)}
    return one_sided if part != "stage" else {f"replay:stage central ({dname})": tail.example_dots(v, len(y)),
                                               **one_sided}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run's --save-dir (checkpoint_last.pt)")
    p.add_argument("--batches", type=int, default=10, help="training batches to score (default 10)")
    p.add_argument("--probe-weights", default="1.5,0.2", help="clean,noisy weights of the weighted probe pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the AUCs here as JSON")
    args, rest = p.parse_known_args(argv)
    cfg = parse_config(rest + ["--save-dir", args.run, "--resume", "--no-progress", "--threads", "1"])
    tr = Trainer(cfg)
    model = tr.model
    model.train()
    gen = torch.Generator().manual_seed(args.seed)
    meta_x = tr.augment.normalize(tr.meta_x)
    full, one, half = meta_direction(model, meta_x, tr.meta_y, cfg.batch_size)
    last = f"stages.{len(model.stages) - 1}."
    layer_sets = {k: [(n, m, 0) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                      and (n == "fc" or (k == "stage,fc" and n.startswith(last)) or k == "all")]
                  for k in ("fc", "stage,fc", "all")}  # the convolutions and the classifier, as LayerProbe layers
    probes = {k: LayerProbe(layers) for k, layers in layer_sets.items()}
    exact_names = {k: {n + "." + a for n, m, _ in layers for a, _ in m.named_parameters(recurse=False)}
                   for k, layers in layer_sets.items()}
    exact_names["all"] = {n for n, _ in model.named_parameters()}
    wc, wn = (float(t) for t in args.probe_weights.split(","))
    scores, clean = {}, []
    perm = torch.randperm(len(tr.train_y), generator=gen)
    for b in range(args.batches):
        idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        x, y, noisy = tr.augment.normalize(tr.train_x[idx]), tr.train_y[idx], tr.train_noisy[idx]
        clean.append((~noisy).numpy())
        with torch.no_grad():
            loss = F.cross_entropy(_functional(model, dict(model.named_parameters()), x), y, reduction="none")
        rows = {"-loss": -loss}
        for dname, d in (("meta set", full), ("one meta batch", one)):
            for k in layer_sets:
                rows[f"exact:{k} ({dname})"] = exact_dots(model, x, y, d, exact_names[k])
                rows[f"probe:{k} ({dname})"] = probe_dots(model, probes[k], x, y, d, torch.ones(len(y)))
                w = torch.where(noisy, torch.tensor(wn), torch.tensor(wc))
                rows[f"probe:{k} weighted ({dname})"] = probe_dots(model, probes[k], x, y, d, w)
            rows.update(replay_dots(model, x, y, d, dname, loss))
            rows.update(replay_dots(model, x, y, d, dname, loss, part="block"))
        for part in ("stage", "block"):  # the default's product with a meta batch of half the size
            rows.update(replay_dots(model, x, y, half, "half a meta batch", loss, part=part))
        for k, v in rows.items():
            scores.setdefault(k, []).append(v.detach().numpy())
    clean = np.concatenate(clean)
    result = {k: auc(np.concatenate(v), clean) for k, v in scores.items()}
    for dname in ("meta set", "one meta batch"):  # how far the one-replay products are from the two-replay ones
        a, b = (np.concatenate(scores[f"replay:stage {s} ({dname})"]) for s in ("central", "one-sided"))
        result[f"replay one-sided vs central: correlation ({dname})"] = float(np.corrcoef(a, b)[0, 1])
        result[f"replay one-sided vs central: relative error ({dname})"] = float(
            np.linalg.norm(a - b) / np.linalg.norm(a))
    result["_checkpoint"] = {"run": args.run, "epoch": tr.epoch, "updates": tr.updates, "images": int(len(clean)),
                             "noisy": float(1 - clean.mean())}
    for k, v in result.items():
        print(f"{k:45s} {v if isinstance(v, dict) else f'{v:.3f}'}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
