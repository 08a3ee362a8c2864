"""Score every sentence pair of a data-bin split, and keep the best: a corpus filter from what training learned.

    fairseq-reweight-score DATA-BIN --path CKPT [--split train] [--score teacher] --out scores.tsv \\
        [--keep 0.7 | --threshold T] [--keep-list keep.txt] [--raw SRC_FILE TGT_FILE --filtered OUT.tsv]

Scores (higher = keep):
  ``teacher``          the raw output of the checkpoint's mwnet/deep teacher (the sigmoid, before the batch
                       normalisation, so it does not depend on the other sentences of a batch), on the inputs it
                       was trained on, with training progress at the checkpoint's update count;
  ``source-contrast``  how much the target's per-token NLL rises when the decoder reads another sentence's
                       source (criterion.source_contrast; any checkpoint);
  ``loss``             minus the per-token NLL of the target (the small-loss heuristic; any checkpoint);
  ``dual-xent``        dual conditional cross-entropy (Junczys-Dowmunt 2018): exp(-(|H_f - H_b| + (H_f + H_b)/2))
                       with H_f, H_b the per-token cross-entropies of a forward (--path) and a backward
                       (--backward-path, target->source, e.g. ``train_translation.sh none DATA SAVE
                       --source-lang en --target-lang de``) model.

``--out`` gets one row per sentence pair in the split's order (sentence id first): id, score, and the features
behind it. ``--keep FRACTION`` / ``--threshold T`` choose the kept pairs; ``--keep-list`` writes one 0/1 per
sentence id (1 = keep; the format ``scripts/mt_helpers.py subset --keep`` reads), ``--filtered`` the kept raw
pairs as ``source<TAB>target<TAB>score`` (Bicleaner's convention: the input TSV plus a score column) given
``--raw``. Every output is written to a temporary file and renamed when complete: an interrupted run leaves
none that looks finished.
"""

import argparse
import gzip
import math
import os
import sys
from typing import Dict, Optional

import numpy as np

SCORES = ("teacher", "source-contrast", "loss", "dual-xent")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fairseq-reweight-score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="fairseq data-bin")
    p.add_argument("--path", required=True, help="checkpoint (trained with --task reweighted_translation for teacher)")
    p.add_argument("--backward-path", help="dual-xent: checkpoint of the target->source model")
    p.add_argument("--split", default="train", help="split of the data-bin to score (default train)")
    p.add_argument("--score", default="teacher", choices=SCORES, help="which score (default teacher)")
    p.add_argument("--out", required=True, help="TSV: id, score, features, one row per pair in the split's order")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep", type=float, help="keep this fraction of the pairs, the highest scores (0 < F <= 1)")
    g.add_argument("--threshold", type=float, help="keep the pairs whose score is at least this")
    p.add_argument("--keep-list", help="write one 0/1 per sentence id (1 = kept) here (needs --keep or --threshold)")
    p.add_argument("--raw", nargs=2, metavar=("SRC", "TGT"),
                   help="raw text of the split, one line per pair (plain or .gz files)")
    p.add_argument("--filtered", help="write the kept raw pairs as source<TAB>target<TAB>score (needs --raw)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch (default 4096)")
    p.add_argument("--cpu", action="store_true", help="score on the CPU even if a GPU is there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.keep is not None and not 0 < args.keep <= 1:
        p.error(f"--keep must be a fraction in (0, 1], got {args.keep} (e.g. --keep 0.8 keeps the best 80 %)")
    if (args.keep_list or args.filtered) and args.keep is None and args.threshold is None:
        p.error("--keep-list/--filtered need --keep FRACTION or --threshold T to know which pairs to keep")
    if args.filtered and not args.raw:
        p.error("--filtered writes the kept raw pairs: give the split's raw text with --raw SRC_FILE TGT_FILE")
    if args.score == "dual-xent" and not args.backward_path:
        p.error("--score dual-xent needs --backward-path: a target->source model trained on the same corpus")
    return args


def _open_raw(path: str, mode: str = "rt"):
    """A raw text file, gzip-compressed (by its magic bytes) or not."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz:
        return gzip.open(path, mode, encoding="utf-8") if "t" in mode else gzip.open(path, mode)
    return open(path, mode, encoding="utf-8") if "t" in mode else open(path, mode)


def _count_lines(path: str) -> int:
    with _open_raw(path, "rb") as f:
        return sum(1 for _ in f)


def _check_raw(path: str) -> str:
    """Why ``path`` cannot be a --raw file (it is read twice: its line count before scoring, its pairs after), or ''."""
    if not os.path.exists(path):
        return f"--raw file {path} not found"
    if not os.path.isfile(path):
        return (f"--raw file {path} is not a regular file (a pipe such as <(zcat FILE.gz) can be read only once, and "
                "--raw is read twice: its line count before scoring, its pairs after): give the file itself; "
                ".gz files are read directly")
    return ""


def _load(path: str, data: str, split: str, cpu: bool):
    """(model, task, criterion, num_updates) of a checkpoint, its task reading ``data``."""
    import torch
    from fairseq import checkpoint_utils

    from . import compat, criterion as _criterion, task as _task  # noqa: F401  (registers; torch.load allow-list)

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    overrides = {"data": data, "drop_below": 0}  # every pair is scored, also those --drop-below left out in training
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=overrides)
    model = models[0].eval()
    if torch.cuda.is_available() and not cpu:
        model = model.cuda()
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    history = state.get("optimizer_history") or [{}]
    num_updates = int(history[-1].get("num_updates", 0))
    if split not in task.datasets:
        try:
            task.load_dataset(split)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"the data-bin {data} has no split '{split}' for {task.cfg.source_lang}->{task.cfg.target_lang} "
                f"(no {split}.{task.cfg.source_lang}-{task.cfg.target_lang}.* files): choose --split among the "
                "binarized splits (train, valid, test, meta)") from None
    crit = _criterion.ReweightedLabelSmoothedCrossEntropyCriterion(task, False, 0.0)
    return model, task, crit, num_updates


def cfg_task_name(task) -> str:
    return getattr(task.cfg, "_name", None) or type(task).__name__


def _batches(task, model, split, max_tokens):
    from fairseq import utils

    itr = task.get_batch_iterator(dataset=task.dataset(split), max_tokens=max_tokens,
                                  max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
                                  ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=1,
                                  disable_iterator_cache=True)
    return itr.next_epoch_itr(shuffle=False)


def _per_token_nll(crit, model, sample):
    out = crit.per_sentence(model, sample)
    return out, out.nll / out.mask.sum(1).clamp_min(1).to(out.nll.dtype)


def score_split(args) -> Dict[str, np.ndarray]:
    """Columns (each one value per sentence id of the split): ``score`` first, then the features."""
    import torch
    from fairseq import utils

    from .contrast import refresh_reference

    model, task, crit, num_updates = _load(args.path, args.data, args.split, args.cpu)
    rw = getattr(task, "reweighter", None)  # None: a plain --task translation checkpoint
    if args.score == "teacher" and (rw is None or not rw.has_teacher or not (rw._pending or rw.teacher is not None)):
        how = f"--reweight-method {rw.method}" if rw is not None else f"--task {cfg_task_name(task)}"
        raise ValueError(
            f"{args.path} holds no teacher (trained with {how}): --score teacher needs the checkpoint of a mwnet/deep "
            "run (--task reweighted_translation --reweight-method deep); or use --score source-contrast/loss")
    back = None
    if args.score == "dual-xent":
        back = _load(args.backward_path, args.data, args.split, args.cpu)
        bt = back[1]
        if (bt.cfg.source_lang, bt.cfg.target_lang) != (task.cfg.target_lang, task.cfg.source_lang):
            raise ValueError(f"--backward-path translates {bt.cfg.source_lang}->{bt.cfg.target_lang}, but the forward "
                             f"model translates {task.cfg.source_lang}->{task.cfg.target_lang}: train the backward "
                             f"model with --source-lang {task.cfg.target_lang} --target-lang {task.cfg.source_lang}")
        if args.split not in bt.datasets:
            bt.load_dataset(args.split)
    n = len(task.dataset(args.split))
    if args.raw:  # before the scoring pass: a mismatched raw text fails in seconds, not after the corpus
        counts = [_count_lines(f) for f in args.raw]
        if counts != [n, n]:
            raise ValueError(f"the split '{args.split}' has {n} pairs but --raw has {counts[0]} and {counts[1]} lines: "
                             "give the raw text the split was binarized from, one line per pair, in the same order")
    cols: Dict[str, np.ndarray] = {}

    def put(name, ids, values):
        if name not in cols:
            cols[name] = np.full(n, np.nan)
        cols[name][ids] = values.detach().double().cpu().numpy()

    device = next(model.parameters()).device
    layers = task._resolve_layers(model) if (rw is not None and "states" in task.inputs) else None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    itr = _batches(task, model, args.split, args.max_tokens)
    bar = tqdm(total=n, unit="pair", desc=f"scoring {args.split}", disable=args.no_progress or tqdm is None,
               file=sys.stderr) if tqdm else None
    refreshed = False
    with torch.no_grad():
        for sample in itr:
            if not sample or "net_input" not in sample:
                continue
            sample = utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample
            ids = sample["id"].cpu().numpy()
            out = crit.per_sentence(model, sample, layers if args.score == "teacher" else None)
            length = out.mask.sum(1).clamp_min(1).to(out.nll.dtype)
            h_f = out.nll / length
            put("nll_per_token", ids, h_f)
            if args.score == "source-contrast" or (args.score == "teacher" and "source_contrast" in task.inputs):
                contrast = crit.source_contrast(model, sample, out)
                put("source_contrast", ids, contrast)
            else:
                contrast = None
            if args.score == "teacher":
                feats = task.teacher_features(out, num_updates, sample, contrast)
                teacher = rw.ensure_teacher(feats.shape[1], device)
                if getattr(task, "contrast", None) is not None and not refreshed:  # --source-contrast once
                    refreshed = True
                    try:
                        refresh_reference(task, model, crit, teacher)
                    except FileNotFoundError:
                        print(f"warning: {args.data} has no meta split '{task.cfg.meta_subset}': the teacher's prior "
                              "keeps the reference of the student it was trained with", file=sys.stderr)
                put("score", ids, teacher(feats.float()))
            elif args.score == "source-contrast":
                put("score", ids, contrast)
            elif args.score == "loss":
                put("score", ids, -h_f)
            else:
                bmodel, btask, bcrit, _ = back
                bsample = btask.dataset(args.split).collater([btask.dataset(args.split)[int(i)] for i in ids])
                bsample = utils.move_to_cuda(bsample, device=device) if device.type == "cuda" else bsample
                bout = bcrit.per_sentence(bmodel, bsample)
                h_b = bout.nll / bout.mask.sum(1).clamp_min(1).to(bout.nll.dtype)
                bid = bsample["id"].cpu().numpy()
                hb = np.full(n, np.nan)
                hb[bid] = h_b.double().cpu().numpy()
                put("nll_per_token_backward", ids, torch.from_numpy(hb[ids]))
                hf = h_f.double().cpu().numpy()
                put("score", ids, torch.from_numpy(np.exp(-(np.abs(hf - hb[ids]) + (hf + hb[ids]) / 2))))
            if bar:
                bar.update(len(ids))
    if bar:
        bar.close()
    missing = int(np.isnan(cols["score"]).sum())
    if missing:
        raise RuntimeError(f"{missing} of {n} pairs of split '{args.split}' got no score (longer than the model's "
                           "maximum positions?): nothing was written")
    order = ["score"] + [k for k in cols if k != "score"]
    return {k: cols[k] for k in order}


def kept_mask(scores: np.ndarray, keep: Optional[float], threshold: Optional[float]) -> np.ndarray:
    """Boolean mask of the kept pairs: the ceil(keep * N) highest scores (ties broken by sentence id), or
    score >= threshold."""
    if threshold is not None:
        return scores >= threshold
    k = int(math.ceil(keep * len(scores)))
    order = np.lexsort((np.arange(len(scores)), -scores))  # highest first, then by id
    mask = np.zeros(len(scores), dtype=bool)
    mask[order[:k]] = True
    return mask


class _AtomicWriter:
    """A text file that appears under its name only when complete (write to NAME.tmp, rename on success)."""

    def __init__(self, path: str):
        self.path, self.tmp = path, path + ".tmp"
        self.f = open(self.tmp, "w", encoding="utf-8")

    def __enter__(self):
        return self.f

    def __exit__(self, exc_type, exc, tb):
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.remove(self.tmp)
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    for problem in map(_check_raw, args.raw or []):  # fail early, before any model is loaded
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    try:
        cols = score_split(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(cols["score"])
    names = list(cols)
    with _AtomicWriter(args.out) as f:
        f.write("id\t" + "\t".join(names) + "\n")
        for i in range(n):
            f.write(f"{i}\t" + "\t".join(f"{cols[k][i]:.6g}" for k in names) + "\n")
    print(f"[score] {args.score} scores of {n} pairs of '{args.split}' -> {args.out}", file=sys.stderr)
    if args.keep is None and args.threshold is None:
        return 0
    mask = kept_mask(cols["score"], args.keep, args.threshold)
    print(f"[score] keeping {int(mask.sum())} of {n} pairs", file=sys.stderr)
    if args.keep_list:
        with _AtomicWriter(args.keep_list) as f:
            f.writelines("1\n" if k else "0\n" for k in mask)
    if args.filtered:
        with _open_raw(args.raw[0]) as fs, _open_raw(args.raw[1]) as ft, _AtomicWriter(args.filtered) as f:
            for i, (s, t) in enumerate(zip(fs, ft)):  # streamed: the raw text is never held in memory
                if mask[i]:
                    f.write(f"{s.rstrip(chr(10))}\t{t.rstrip(chr(10))}\t{cols['score'][i]:.6g}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
