#!/usr/bin/env python
"""Score the per-sentence weights of a ``--dump-weights`` file against a noise flags file.

The AUC is that of the weight as a score separating clean pairs (positives) from corrupted ones
(``fairseq_reweight.core.auc``, Mann-Whitney, ties count 1/2): 1.0 = every clean pair weighted above
every corrupted one, 0.5 = no separation (uniform weights give exactly 0.5). Weights are normalised
to mean 1 within each batch, so they are comparable across batches.

Reports the AUC per window of updates, over the last ``--last-frac`` of training (rows, and the mean
weight of each sentence over that part; with ``--checkpoint`` of a ``--drop-below`` run also over every sentence,
those it left out at weight 0: the rows alone rank only the survivors of the filter), and, for reference, the AUC of the negated training loss
(the small-loss heuristic). Writes ``weights_analysis.json``, ``weights_hist.png`` (clean vs
corrupted weights over the last part) and ``weights_auc.png`` (AUC against updates) into
``--out-dir``.

Example::

    python scripts/analyze_weights.py --weights runs/x/weights.tsv \\
        --flags data-bin/multi30k_de_en_misaligned0.3/train.flags --out-dir runs/x
"""

import argparse
import glob
import importlib.util
import json
import logging
import math
import os
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _auc_fn():
    """``fairseq_reweight.core.auc``; loaded from its file when possible (the package import pulls in fairseq)."""
    path = ROOT / "fairseq_reweight" / "core" / "diagnostics.py"
    try:
        spec = importlib.util.spec_from_file_location("_fr_diagnostics", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.auc
    except Exception:  # e.g. the module grew relative imports: take the normal route
        sys.path.insert(0, str(ROOT))
        from fairseq_reweight.core import auc

        return auc


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_dump(paths):
    """Rows of one or more dump files as arrays; a repeated (update, id) keeps its last row (resumed runs)."""
    ups, ids, ws, ls = [], [], [], []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for k, line in enumerate(f, 1):
                parts = line.rstrip("\n").split("\t")
                if not parts or parts[0] in ("update", ""):
                    continue  # header (repeated when a run was resumed)
                if len(parts) < 3:
                    die(f"{path}:{k}: expected update<TAB>id<TAB>weight[<TAB>loss], got {line!r}")
                try:
                    ups.append(int(parts[0]))
                    ids.append(int(parts[1]))
                    ws.append(float(parts[2]))
                    ls.append(float(parts[3]) if len(parts) > 3 else float("nan"))
                except ValueError:
                    die(f"{path}:{k}: not a number in {line!r}")
    u, i, w, l = (np.asarray(x) for x in (ups, ids, ws, ls))
    if len(u) == 0:
        return u, i, w.astype(float), l.astype(float)
    key = u.astype(np.int64) * (int(i.max()) + 1) + i
    _, last = np.unique(key[::-1], return_index=True)
    keep = np.sort(len(key) - 1 - last)
    return u[keep], i[keep], w[keep], l[keep]


FLAGS_FIX = ("pass the flags file written with the training data (one 0/1 per train sentence id, 1 = corrupted): "
             "DATA-BIN/train.flags from scripts/prepare_multi30k.sh, or the --flags output of "
             "python -m fairseq_reweight.noise")


def read_flags(path):
    flags = []
    try:
        with open(path, encoding="utf-8") as f:
            for k, line in enumerate(f, 1):
                v = line.strip()
                if v not in ("0", "1"):
                    die(f"{path}:{k}: expected 0 or 1, got {line[:60]!r}: not a flags file; {FLAGS_FIX}")
                flags.append(int(v))
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read flags file {path} ({e}); {FLAGS_FIX}")
    if not flags:
        die(f"flags file {path} is empty; {FLAGS_FIX}")
    return np.asarray(flags, dtype=np.int64)


def train_split_size(flags_path):
    """``(sentences, idx file)`` of the binarized train split next to the flags file (DATA-BIN/train.flags),
    from the fairseq .idx header; ``(None, None)`` if there is none."""
    folder = os.path.dirname(os.path.abspath(flags_path))
    for idx in sorted(glob.glob(os.path.join(glob.escape(folder), "train.*-*.*.idx"))):
        try:
            with open(idx, "rb") as f:
                head = f.read(48)
        except OSError:
            continue
        if head[:9] == b"MMIDIDX\x00\x00" and len(head) >= 26:  # mmap: magic, version <Q, dtype <B, length <Q
            return struct.unpack("<Q", head[18:26])[0], idx
        if head[:8] == b"TNTIDX\x00\x00" and len(head) >= 40:  # cached: magic, version, code, size, length
            return struct.unpack("<Q", head[32:40])[0], idx
    return None, None


def target_lengths(flags_path):
    """Token count of every target sentence of the train split next to the flags file (DATA-BIN/train.SRC-TGT.TGT.idx,
    fairseq's mmap index: header, then one int32 size per sentence); None if there is none."""
    folder = os.path.dirname(os.path.abspath(flags_path))
    for idx in sorted(glob.glob(os.path.join(glob.escape(folder), "train.*-*.*.idx"))):
        pair, lang = os.path.basename(idx).split(".")[1:3]
        if pair.split("-")[-1] != lang:
            continue  # the source side
        with open(idx, "rb") as f:
            head = f.read(26)  # magic, version <Q, dtype <B, length <Q
            if head[:9] != b"MMIDIDX\x00\x00" or len(head) < 26:
                return None
            n = struct.unpack("<Q", head[18:26])[0]
            return np.frombuffer(f.read(4 * n), dtype=np.int32).astype(np.int64)
    return None


def length_bias(ids, weights, flags, lengths, last, buckets=5):
    """The clean sentences by target-length quantile of the corpus: how many of them the last part of training saw
    (``--drop-below`` leaves some out) and their mean weight there. A teacher that favours short sentences makes a
    student that writes short ones. ``[{"tokens": [lo, hi], "corpus", "seen", "mean_w"}]``."""
    clean_ids = np.flatnonzero(flags == 0)
    if len(clean_ids) < buckets:
        return None
    keep = last & (flags[ids] == 0)
    uid, inv = np.unique(ids[keep], return_inverse=True)
    mean_w = np.bincount(inv, weights=weights[keep]) / np.bincount(inv)
    edges = np.unique(np.quantile(lengths[clean_ids], np.linspace(0, 1, buckets + 1)))
    out = []
    for k, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        def inside(lens):
            return (lens >= a) & ((lens < b) if k < len(edges) - 2 else (lens <= b))
        m = inside(lengths[uid])
        out.append({"tokens": [int(a), int(b)], "corpus": int(inside(lengths[clean_ids]).sum()), "seen": int(m.sum()),
                    "mean_w": _r(mean_w[m].mean()) if m.any() else None})
    return out


def read_task_state(path, n):
    """``(left_out, contrast)`` from the checkpoint ``path``: ``[n]`` bool, the training sentences ``--drop-below``
    had left out (None: the run had no --drop-below), and ``[n]`` float, the source contrast of the corpus pass
    (``--source-contrast once``) the teacher read (None: the run had none)."""
    import torch

    sys.path.insert(0, str(ROOT))
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from fairseq_reweight import compat  # noqa: F401  (torch.load allow-list)
    root.setLevel(level)  # fairseq's import sets the root logger to DEBUG: matplotlib's debug lines would follow
    root.handlers[:] = handlers

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        die(f"cannot read the checkpoint {path} ({e}): pass the run's checkpoint_last.pt, or leave --checkpoint out")
    task = (state.get("extra_state") or {}).get("ReweightedTranslationTask") or {}
    out = []
    for key, value in (("drop", lambda d: d["dropped"].numpy().astype(bool)),
                       ("source_contrast", lambda d: (d["train"][:, 0] - d["train"][:, 1]).numpy())):
        if not task.get(key):
            out.append(None)
            continue
        v = value(task[key])
        if len(v) != n:
            die(f"the checkpoint's {key} state covers {len(v)} training sentences but the flags file has "
                f"{n}: pass the checkpoint of the run that wrote the weights")
        out.append(v)
    return tuple(out)


def prior_auc(contrast, flags, ids, last, auc):
    """How well the corpus pass's source contrast (the teacher's prior input, as the checkpoint holds it: from the last
    pass, --source-contrast-refresh, and for the pairs left out before it from the pass before) ranks clean above
    corrupted: over every training sentence, and over those still trained on in the last part (what the
    last part's weight AUC ranks)."""
    seen = np.zeros(len(flags), dtype=bool)
    seen[ids[last]] = True
    return {"auc_prior_all": _r(auc(contrast, flags == 0)),
            "auc_prior_last": _r(auc(contrast[seen], flags[seen] == 0))}


def with_left_out(ids, weights, flags, last, left_out, auc):
    """What the student trains on by the end: every training sentence's mean weight over the last part, and 0 for
    those ``--drop-below`` has left out (they get no weight any more); the AUC of that score over the sentences
    seen in the last part or left out, and how many clean / corrupted sentences were left out."""
    n = len(flags)
    sums = np.bincount(ids[last], weights=weights[last], minlength=n)
    counts = np.bincount(ids[last], minlength=n)
    score = np.where(left_out, 0.0, sums / np.maximum(counts, 1))
    use = left_out | (counts > 0)
    return {"auc_last_with_left_out": _r(auc(score[use], flags[use] == 0)),
            "left_out_clean": int((left_out & (flags == 0)).sum()),
            "left_out_corrupted": int((left_out & (flags == 1)).sum())}


def _r(x, nd=4):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def analyze(updates, ids, weights, losses, flags, auc, windows=10, last_frac=0.2):
    """The numbers of the report (a JSON-able dict)."""
    if len(updates) and ids.max() >= len(flags):
        die(f"sentence id {int(ids.max())} in the dump but the flags file has only {len(flags)} lines: "
            f"the flags do not belong to this data-bin's train split; {FLAGS_FIX}")
    corrupted = flags[ids] == 1
    clean = ~corrupted
    lo, hi = int(updates.min()), int(updates.max())
    edges = np.linspace(lo, hi + 1, windows + 1)
    curve = []
    for a, b in zip(edges[:-1], edges[1:]):
        m = (updates >= a) & (updates < b)
        if not m.any():
            continue
        curve.append({
            "update_from": int(math.ceil(a)), "update_to": int(math.ceil(b)) - 1, "rows": int(m.sum()),
            "auc": _r(auc(weights[m], clean[m])),
            "mean_w_clean": _r(weights[m & clean].mean()) if (m & clean).any() else None,
            "mean_w_corrupted": _r(weights[m & corrupted].mean()) if (m & corrupted).any() else None,
        })
    start = hi + 1 - max(1, int(round(last_frac * (hi + 1 - lo))))  # the last updates, at least one
    last = updates >= start
    # per-sentence mean weight over the last part
    uid, inv = np.unique(ids[last], return_inverse=True)
    mean_w = np.bincount(inv, weights=weights[last]) / np.bincount(inv)
    sent_clean = flags[uid] == 0
    finite = np.isfinite(losses[last])
    return {
        "rows": int(len(updates)), "updates": [lo, hi], "sentences_seen": int(len(np.unique(ids))),
        "train_sentences": int(len(flags)), "corrupted_fraction": _r(flags.mean()) if len(flags) else None,
        "auc_all": _r(auc(weights, clean)),
        "last_frac": last_frac, "last_from_update": int(start),
        "auc_last": _r(auc(weights[last], clean[last])),
        "auc_last_sentence_mean": _r(auc(mean_w, sent_clean)),
        "auc_last_neg_loss": _r(auc(-losses[last][finite], clean[last][finite])) if finite.any() else None,
        "mean_w_clean_last": _r(weights[last & clean].mean()) if (last & clean).any() else None,
        "mean_w_corrupted_last": _r(weights[last & corrupted].mean()) if (last & corrupted).any() else None,
        "curve": curve,
    }


def plot(res, weights, clean, last, out_dir, bins, label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{label}: " if label else ""
    fig, ax = plt.subplots(figsize=(6, 4))
    w = weights[last]
    c = clean[last]
    top = float(np.quantile(w, 0.995)) if len(w) else 1.0
    lo = float(w.min()) if len(w) else 0.0
    rng = (lo, max(top, lo + 1e-6))
    if c.any():
        ax.hist(np.clip(w[c], *rng), bins=bins, range=rng, density=True, alpha=0.55, label=f"clean ({int(c.sum())})")
    if (~c).any():
        ax.hist(np.clip(w[~c], *rng), bins=bins, range=rng, density=True, alpha=0.55,
                label=f"corrupted ({int((~c).sum())})")
    ax.set_xlabel("weight (batch mean = 1)")
    ax.set_ylabel("density")
    auc_txt = f", AUC {res['auc_last']:.3f}" if res["auc_last"] is not None else ""
    ax.set_title(f"{title}weights, updates >= {res['last_from_update']}{auc_txt}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    hist = os.path.join(out_dir, "weights_hist.png")
    fig.savefig(hist, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [(p["update_from"] + p["update_to"]) / 2 for p in res["curve"]]
    ys = [p["auc"] if p["auc"] is not None else float("nan") for p in res["curve"]]
    ax.plot(xs, ys, marker="o", label="weight AUC (clean vs corrupted)")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_ylim(0, 1)
    ax.set_xlabel("update")
    ax.set_ylabel("AUC")
    ax.set_title(f"{title}weight AUC over training", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    curve = os.path.join(out_dir, "weights_auc.png")
    fig.savefig(curve, dpi=110)
    plt.close(fig)
    return hist, curve


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="TSV from --dump-weights (its .rankN siblings are read too)")
    p.add_argument("--flags", required=True, help="flags file: one 0/1 per train sentence id (1 = corrupted)")
    p.add_argument("--out-dir", default=None, help="where to write the JSON and PNGs (default: the dump's folder)")
    p.add_argument("--bins", type=int, default=50, help="histogram bins (default 50)")
    p.add_argument("--windows", type=int, default=10, help="number of update windows of the AUC curve (default 10)")
    p.add_argument("--last-frac", type=float, default=0.2,
                   help="fraction of training (by updates) at the end for the summary AUC and histogram (default 0.2)")
    p.add_argument("--checkpoint", default=None,
                   help="the run's checkpoint_last.pt: with --drop-below, also the AUC where the sentences it left "
                   "out count with weight 0; with --source-contrast once, the AUC of the contrast the teacher read")
    p.add_argument("--label", default="", help="title prefix of the plots, e.g. the method")
    p.add_argument("--json", default=None, help="output JSON (default OUT-DIR/weights_analysis.json)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = p.parse_args(argv)

    if not os.path.isfile(args.weights):
        die(f"weights dump {args.weights} not found (train with --dump-weights FILE)")
    if not os.path.isfile(args.flags):
        die(f"flags file {args.flags} not found (scripts/prepare_multi30k.sh writes DATA-BIN/train.flags)")
    if not 0 < args.last_frac <= 1:
        die(f"--last-frac must be in (0, 1], got {args.last_frac}")
    if args.windows < 1 or args.bins < 1:
        die("--windows and --bins must be >= 1")
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.weights))
    os.makedirs(out_dir, exist_ok=True)

    paths = [args.weights] + sorted(glob.glob(glob.escape(args.weights) + ".rank*"))
    print(f"[analyze] reading {', '.join(paths)}", file=sys.stderr)
    try:
        updates, ids, weights, losses = read_dump(paths)
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read the weights dump ({e}): pass the TSV that fairseq-train --dump-weights FILE wrote")
    if len(updates) == 0:
        die(f"{args.weights} has no rows")
    flags = read_flags(args.flags)
    n_train, idx = train_split_size(args.flags)
    if n_train is not None and n_train != len(flags):
        die(f"flags file {args.flags} has {len(flags)} lines but the train split next to it ({idx}) has {n_train} "
            f"sentences: the flags do not belong to this data-bin; {FLAGS_FIX}")
    res = analyze(updates, ids, weights, losses, flags, _auc_fn(), args.windows, args.last_frac)
    res.update(weights_file=os.path.abspath(args.weights), flags_file=os.path.abspath(args.flags),
               label=args.label)
    if args.checkpoint:
        left_out, contrast = read_task_state(args.checkpoint, len(flags))
        last = updates >= res["last_from_update"]
        if left_out is not None:
            res.update(with_left_out(ids, weights, flags, last, left_out, _auc_fn()))
        if contrast is not None:
            res.update(prior_auc(contrast, flags, ids, last, _auc_fn()))
    lengths = target_lengths(args.flags)
    if lengths is not None and len(lengths) == len(flags):
        res["clean_weight_by_target_length"] = length_bias(ids, weights, flags, lengths,
                                                           updates >= res["last_from_update"])
    if not args.no_plots:
        clean = flags[ids] == 0
        last = updates >= res["last_from_update"]
        res["plots"] = list(plot(res, weights, clean, last, out_dir, args.bins, args.label))
    out_json = args.json or os.path.join(out_dir, "weights_analysis.json")
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
        f.write("\n")

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    print(f"[analyze] {res['rows']} rows, updates {res['updates'][0]}..{res['updates'][1]}, "
          f"{res['sentences_seen']}/{res['train_sentences']} train sentences seen, "
          f"{fmt(res['corrupted_fraction'])} of train corrupted")
    if res["auc_all"] is None:
        print("[analyze] no corrupted (or no clean) pairs among the dumped sentences: AUC undefined")
    for pt in res["curve"]:
        print(f"  updates {pt['update_from']:>6}-{pt['update_to']:<6} AUC {fmt(pt['auc'])}  mean weight clean "
              f"{fmt(pt['mean_w_clean'])} corrupted {fmt(pt['mean_w_corrupted'])}")
    print(f"AUC (all updates)              {fmt(res['auc_all'])}")
    print(f"AUC (last {res['last_frac']:.0%}, from update {res['last_from_update']}) {fmt(res['auc_last'])}")
    print(f"AUC (last part, per-sentence mean weight) {fmt(res['auc_last_sentence_mean'])}")
    print(f"AUC of -loss (last part, reference)       {fmt(res['auc_last_neg_loss'])}")
    if "auc_last_with_left_out" in res:
        print(f"AUC with the sentences --drop-below left out at weight 0 {fmt(res['auc_last_with_left_out'])} "
              f"(left out: {res['left_out_clean']} clean, {res['left_out_corrupted']} corrupted)")
    if "auc_prior_all" in res:
        print(f"AUC of the source contrast the teacher read (its corpus pass): all sentences "
              f"{fmt(res['auc_prior_all'])}, those of the last part {fmt(res['auc_prior_last'])}")
    if res.get("clean_weight_by_target_length"):
        print("clean sentences by target length, last part (seen/corpus, mean weight): " + ", ".join(
            f"{b['tokens'][0]}-{b['tokens'][1]} tokens {b['seen']}/{b['corpus']} {fmt(b['mean_w'])}"
            for b in res["clean_weight_by_target_length"]))
    print(f"[analyze] wrote {out_json}" + (f", {', '.join(res['plots'])}" if "plots" in res else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
