#!/usr/bin/env python
"""Which parameters carry the meta-gradient's clean-vs-corrupted signal? (a checkpoint + a flags file)

For a trained checkpoint of a translation model, a clean meta split and the noise flags of the
training split, computes for each of ``--num`` random training pairs the first-order meta-gradient
score of every parameter group,

    s_i(group) = <dL_meta/dθ_group, dℓ_i/dθ_group>        (the l2rw score; -η times ∂L_m/∂w_i)

with exact per-sentence gradients (one backward per pair, dropout off), and prints the AUC of each
score as a detector of clean pairs (1 = every clean pair scored above every corrupted one, 0.5 =
chance). Groups follow ``--meta-params`` of the fast meta-gradient: ``embed`` (token embeddings /
output projection), ``encoder`` (every encoder layer's fc1/fc2), ``decoder`` (every decoder layer's
fc1/fc2), ``ffn`` (the last decoder layer's fc1/fc2), plus groups ``fast`` cannot probe (attention,
layer norms) and ``all`` (every parameter, what ``--meta-grad fd/exact`` use, to first order). The
loss, loss per token and gradient norm are scored too, for reference. Use it to choose
``--meta-params`` for a new model or noise type: a group whose AUC is near 0.5 gives a teacher
nothing to learn from.

``--teacher-ceiling`` asks the next question: can the ``deep`` teacher's inputs (the pooled decoder
states and token-loss statistics of ``--teacher-states``, as the task computes them) predict that
score? A ridge regression of each group's score on the standardised inputs is fitted on half of
the pairs and its prediction scored (AUC vs the flags) on the other half: roughly the best a
teacher trained by that meta-gradient can reach from those inputs. For comparison, the same ridge
fitted to the flags themselves (an oracle teacher).

Example (the measurement behind the default ``--meta-params auto`` = ``encoder``)::

    python scripts/meta_signal.py --checkpoint runs/multi30k_v2/noisy/none/seed1/checkpoint_last.pt \\
        --data data-bin/multi30k_de_en_v8000_m1000_s1_misaligned0.3 --num 800 --out examples/multi30k/meta_signal
"""

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch

GROUPS = ["embed", "encoder", "encoder.attn", "decoder", "ffn", "decoder.self_attn", "decoder.cross_attn",
          "other", "all"]


def groups_of(name: str, last_decoder_layer: int):
    """The groups a parameter (fairseq transformer naming) belongs to, ``all`` included."""
    out = ["all"]
    if "embed_tokens" in name or "output_projection" in name:
        return out + ["embed"]
    fc = ".fc1." in name or ".fc2." in name
    if name.startswith("encoder.layers."):
        return out + (["encoder"] if fc else ["encoder.attn"] if "attn" in name else ["other"])
    if name.startswith("decoder.layers."):
        if fc:
            return out + ["decoder"] + (["ffn"] if name.startswith(f"decoder.layers.{last_decoder_layer}.") else [])
        if "encoder_attn." in name:
            return out + ["decoder.cross_attn"]
        if "self_attn." in name:
            return out + ["decoder.self_attn"]
    return out + ["other"]


def load(checkpoint, data, with_cfg=False):
    import fairseq_reweight.task  # noqa: F401  (registers the task; torch.load of fairseq checkpoints)
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)],
                                                                      arg_overrides={"data": str(data)})
    return (models[0].eval(), task, cfg) if with_cfg else (models[0].eval(), task)


def teacher_inputs(task, cfg, model, dataset, ids, states="last", batch_sentences=50, names="auto"):
    """The ``deep`` teacher's input features of ``ids``: ``names`` as ``--teacher-inputs`` (auto: the tuned
    recipe's), computed with the registry the training uses (fairseq_reweight/features.py) from the run's
    criterion (any ``reweighted_translation`` checkpoint)."""
    from fairseq_reweight.core import features, parse_states_spec
    from fairseq_reweight.core.recipe import TUNED_DEEP
    from fairseq_reweight.criterion import num_decoder_layers
    from fairseq_reweight.features import FEATURES, Batch

    criterion = task.build_criterion(cfg.criterion)
    if not hasattr(criterion, "per_sentence"):
        sys.exit("meta_signal.py --teacher-ceiling: the checkpoint's criterion is not "
                 "reweighted_label_smoothed_cross_entropy; the teacher's inputs come from it")
    names = features.parse(TUNED_DEEP["teacher_inputs"] if names == "auto" else names, FEATURES)
    rows, layers = [], None
    with torch.no_grad():
        for start in range(0, len(ids), batch_sentences):
            sample = dataset.collater([dataset[int(i)] for i in ids[start:start + batch_sentences]])
            order = sample["id"].tolist()  # the collater sorts by length
            if layers is None:
                layers = parse_states_spec(states, num_decoder_layers(model, sample), "decoder layers")
            out = criterion.per_sentence(model, sample, layers)
            contrast = criterion.source_contrast(model, sample, out) if "source_contrast" in names else None
            feats = features.stack(names, FEATURES, Batch(out, sample, contrast, 0.0))
            by_id = dict(zip(order, feats.double().numpy()))
            rows += [by_id[int(i)] for i in ids[start:start + batch_sentences]]
    return np.array(rows), names


def ridge_auc(x, y, clean, lam=1.0):
    """Fit ``y`` on the standardised ``x`` (ridge) on the first half; AUC of the prediction on the second."""
    from fairseq_reweight.core import auc

    x = x[:, x.std(0) > 0]
    x = np.c_[(x - x.mean(0)) / x.std(0), np.ones(len(x))]
    h = len(x) // 2
    beta = np.linalg.solve(x[:h].T @ x[:h] + lam * np.eye(x.shape[1]), x[:h].T @ y[:h])
    return auc(x[h:] @ beta, clean[h:])


def sentence_nll(model, sample, pad):
    """Summed token NLL of each sentence of ``sample`` and its number of target tokens."""
    lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
    target = sample["target"]
    mask = target.ne(pad)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask
    return nll.sum(1), mask.sum(1)


def meta_gradient(model, dataset, pad, batch_sentences=100):
    """Gradient of the meta set's per-token mean NLL, as ``{name: tensor}``."""
    model.zero_grad()
    tokens = 0
    for start in range(0, len(dataset), batch_sentences):
        sample = dataset.collater([dataset[i] for i in range(start, min(start + batch_sentences, len(dataset)))])
        nll, n = sentence_nll(model, sample, pad)
        nll.sum().backward()
        tokens += int(n.sum())
    return {name: p.grad.detach() / tokens for name, p in model.named_parameters() if p.grad is not None}


def adam_precondition(checkpoint, model, meta_grad):
    """``meta_grad`` preconditioned as ``--meta-precondition adam`` does in training (``core.adam_precondition``),
    with the checkpoint's optimizer state loaded into a torch Adam over the model's parameters."""
    from fairseq_reweight.core import adam_precondition as precondition

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["last_optimizer_state"]
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam([p for p in params.values() if p.requires_grad])
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        sys.exit(f"meta_signal.py --precondition adam: the checkpoint's optimizer state is not Adam's over this "
                 f"model's parameters ({e})")
    return precondition(meta_grad, params, optimizer)


def sentence_scores(model, dataset, ids, meta_grad, pad, progress=True):
    """Per-sentence ``<meta_grad, grad ℓ_i>`` by group, the loss, its length and gradient norm."""
    from tqdm import tqdm

    names = dict(model.named_parameters())
    last = len(getattr(model.decoder, "layers", [])) - 1
    member = {n: groups_of(n, last) for n in names}
    scores = collections.defaultdict(list)
    loss, ntok, gnorm = [], [], []
    for i in tqdm(ids, desc="per-sentence gradients", disable=not progress, file=sys.stderr):
        model.zero_grad()
        nll, n = sentence_nll(model, dataset.collater([dataset[int(i)]]), pad)
        nll.sum().backward()
        per = collections.defaultdict(float)
        sq = 0.0
        for name, p in names.items():
            if p.grad is None or name not in meta_grad:
                continue
            ip = float((p.grad * meta_grad[name]).sum())
            for g in member[name]:
                per[g] += ip
            sq += float((p.grad ** 2).sum())
        for g in GROUPS:
            scores[g].append(per.get(g, 0.0))
        loss.append(float(nll.detach()))
        ntok.append(int(n))
        gnorm.append(sq ** 0.5)
    return {g: np.array(v) for g, v in scores.items()}, np.array(loss), np.array(ntok), np.array(gnorm)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="data-bin with the train and meta splits")
    p.add_argument("--flags", type=Path, help="noise flags of the train split (default DATA/train.flags)")
    p.add_argument("--meta-subset", default="meta")
    p.add_argument("--num", type=int, default=800, help="training pairs to score (random, fixed seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precondition", choices=["none", "adam"], default="none",
                   help="adam: score <P dL_meta, dl_i> with the student's Adam preconditioner P from the checkpoint")
    p.add_argument("--teacher-ceiling", action="store_true",
                   help="also fit the deep teacher's inputs to each score (ridge, held-out half)")
    p.add_argument("--teacher-states", default="last", help="decoder layers of the teacher's inputs")
    p.add_argument("--teacher-inputs", default="auto",
                   help="the teacher's inputs for --teacher-ceiling, as the training flag (auto: the tuned recipe's)")
    args = p.parse_args(argv)
    flags_path = args.flags or args.data / "train.flags"
    for path, what in [(args.checkpoint, "--checkpoint"), (flags_path, "flags file")]:
        if not path.is_file():
            sys.exit(f"meta_signal.py: {what} {path} not found"
                     + (" (pass --flags; scripts/prepare_multi30k.sh --noise ... writes DATA/train.flags)"
                        if what == "flags file" else ""))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from fairseq_reweight.core import auc

    model, task, cfg = load(args.checkpoint, args.data, with_cfg=True)
    task.load_dataset("train")
    task.load_dataset(args.meta_subset)
    train, meta = task.datasets["train"], task.datasets[args.meta_subset]
    flags = np.loadtxt(flags_path, dtype=int).reshape(-1)
    if len(flags) != len(train):
        sys.exit(f"meta_signal.py: {flags_path} has {len(flags)} lines but the train split has {len(train)} "
                 "pairs; pass the flags file written with this data-bin")
    pad = task.target_dictionary.pad()
    gm = meta_gradient(model, meta, pad)
    if args.precondition == "adam":
        gm = adam_precondition(args.checkpoint, model, gm)
    ids = np.random.default_rng(args.seed).choice(len(train), min(args.num, len(train)), replace=False)
    scores, loss, ntok, gnorm = sentence_scores(model, train, ids, gm, pad)
    clean = (1 - flags[ids]).tolist()
    if len(set(clean)) < 2:
        sys.exit("meta_signal.py: the sampled pairs are all clean or all corrupted; an AUC needs both")
    share = {g: float(np.abs(scores[g]).mean() / max(np.abs(scores["all"]).mean(), 1e-30)) for g in GROUPS}
    res = {
        "checkpoint": str(args.checkpoint), "data": str(args.data), "pairs": len(ids),
        "corrupted_fraction": float(1 - np.mean(clean)),
        "reference": {"-loss": auc(-loss, clean), "-loss/token": auc(-loss / ntok, clean),
                      "-grad norm": auc(-gnorm, clean)},
        "groups": {g: {"auc": auc(scores[g], clean), "auc_cosine": auc(scores[g] / np.maximum(gnorm, 1e-30), clean),
                       "share": share[g]} for g in GROUPS},
    }
    res["precondition"] = args.precondition
    pre = ", meta gradient preconditioned by the student's Adam state" if args.precondition == "adam" else ""
    lines = [f"Meta-gradient signal at `{args.checkpoint}` ({len(ids)} training pairs, "
             f"{res['corrupted_fraction']:.0%} corrupted; exact per-sentence gradients, dropout off{pre})\n",
             "| group (`--meta-params`) | AUC of ⟨∇L_meta, ∇ℓ_i⟩ | AUC of the cosine | mean \\|score\\| / all |",
             "|---|---|---|---|"]
    for g in GROUPS:
        r = res["groups"][g]
        lines.append(f"| {g} | {r['auc']:.3f} | {r['auc_cosine']:.3f} | {r['share']:.2f} |")
    if args.teacher_ceiling:
        feats, names = teacher_inputs(task, cfg, model, train, ids, args.teacher_states, names=args.teacher_inputs)
        optional = [f"--teacher-inputs {','.join(names)}"]
        c = np.array(clean)
        res["teacher_ceiling"] = {"inputs": int(feats.shape[1]), "oracle (fit to the flags)": ridge_auc(feats, c, c),
                                  **{g: ridge_auc(feats, scores[g], c) for g in GROUPS}}
        lines[1] += " teacher fit: held-out AUC |"
        lines[2] += "---|"
        for k, g in enumerate(GROUPS):
            lines[3 + k] += f" {res['teacher_ceiling'][g]:.3f} |"
        lines.append(f"\nTeacher fit: ridge regression of each score on the deep teacher's {feats.shape[1]} inputs "
                     f"(`--teacher-states {args.teacher_states}{''.join(' ' + f for f in optional)}`), fitted on half of the pairs, AUC of its prediction "
                     f"on the other half. The same fit to the flags (an oracle teacher): "
                     f"{res['teacher_ceiling']['oracle (fit to the flags)']:.3f}.")
    lines.append("\nReference scores: " + ", ".join(f"AUC({k}) {v:.3f}" for k, v in res["reference"].items()))
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        args.out.with_suffix(".md").write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
