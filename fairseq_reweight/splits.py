"""Checks of the data-bin splits the task reads, with errors that name the fix.

fairseq fails deep inside numpy on an empty split, only at the first batch that reads past the end of a cut
``.bin`` file, and never on a meta split binarized with another dictionary; these checks fail at start-up.
"""

import contextlib
import glob
import os
from typing import List, Optional

import torch
from fairseq import utils


def binarize_hint(cfg, split: str) -> str:
    s, t, data = cfg.source_lang, cfg.target_lang, utils.split_paths(cfg.data)[0]
    return (f"`fairseq-preprocess --source-lang {s} --target-lang {t} --srcdict {data}/dict.{s}.txt "
            f"--tgtdict {data}/dict.{t}.txt --testpref PREFIX --destdir TMP` and rename TMP/test.* to "
            f"{data}/{split}.*")


def missing_meta_message(cfg, split: str, error: Exception) -> str:
    return (f"--reweight-method {cfg.reweight_method} needs a clean meta split '{split}' in {cfg.data} ({error}). "
            f"Binarize one with the training dictionaries, e.g. {binarize_hint(cfg, split)} "
            "(scripts/prepare_multi30k.sh does this), or point --meta-subset at an existing split")


def bad_split_message(cfg, split: str, problem: str) -> str:
    s, t, data = cfg.source_lang, cfg.target_lang, utils.split_paths(cfg.data)[0]
    where = f"split '{split}' in {cfg.data} {problem}"
    if split == cfg.meta_subset:
        return (f"meta {where}: --reweight-method {cfg.reweight_method} needs clean sentence pairs there. "
                f"Re-binarize it from non-empty text with the training dictionaries, e.g. "
                f"{binarize_hint(cfg, split)}, or point --meta-subset at another split")
    return (f"{where}. Re-run fairseq-preprocess on complete, non-empty text for it (keep the dictionaries: "
            f"--srcdict {data}/dict.{s}.txt --tgtdict {data}/dict.{t}.txt), or copy the data-bin again if it was "
            f"cut short (full disk, interrupted copy)")


def split_files(data: str, split: str, is_train: bool, epoch: int, ext: str) -> List[str]:
    """The ``SPLIT.*.EXT`` files of the data-bin fairseq reads ``split`` from (the same shard choice)."""
    paths = utils.split_paths(data)
    path = paths[(epoch - 1) % len(paths)] if is_train else paths[0]
    return sorted(glob.glob(os.path.join(glob.escape(path), f"{glob.escape(split)}.*.{ext}")))


@contextlib.contextmanager
def explained(cfg, split: str, epoch: int):
    """Around fairseq's loader: an unreadable split becomes an error that names the fix."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- reported with the original error, which stays chained
        bins = split_files(cfg.data, split, split == cfg.train_subset, epoch, "bin")
        empty = bool(bins) and all(os.path.getsize(f) == 0 for f in bins)
        problem = "is empty (0 sentence pairs)" if empty else (
            f"cannot be read ({type(e).__name__}: {e}): its .bin/.idx files are truncated, corrupt, or not "
            f"fairseq-preprocess output (of this --dataset-impl)")
        raise ValueError(bad_split_message(cfg, split, problem)) from e


def check_loaded(cfg, split: str, dataset) -> None:
    """A loaded split whose ``.bin`` is shorter than its ``.idx``, or an empty train/meta split: an error."""
    problem = truncated(dataset)
    if problem is None and len(dataset) == 0 and split in (cfg.train_subset, cfg.meta_subset):
        problem = "is empty (0 sentence pairs)"
    if problem is not None:
        raise ValueError(bad_split_message(cfg, split, problem))


def truncated(dataset) -> Optional[str]:
    """Why a loaded split's mmap ``.bin`` files are shorter than their ``.idx`` says, else None."""
    if hasattr(dataset, "_index") and hasattr(dataset, "_bin_buffer"):  # fairseq's MMapIndexedDataset
        index = dataset._index
        if len(index):
            need = int(index._pointers[-1]) + int(index._sizes[-1]) * index._dtype_size
            have = len(dataset._bin_buffer)
            if need > have:
                return f"is truncated: {dataset._path}.bin has {have} bytes but its .idx needs {need}"
        return None
    children = [getattr(dataset, a, None) for a in ("src", "tgt", "dataset")] + list(getattr(dataset, "datasets", []))
    for child in children:
        if child is not None and child is not dataset:
            problem = truncated(child)
            if problem:
                return problem
    return None


def check_meta_vocab(cfg, dataset, src_dict, tgt_dict, split: str, max_sentences: int = 5000, log=None) -> None:
    """A meta split binarized with other dictionaries than the training data's fails at its first batch
    (token id out of range) or, with ids in range, feeds the teacher's meta loss garbage; catch what is
    visible in the ids: ids beyond the training dictionary, or mostly <unk>. (A same-size dictionary in
    another order is indistinguishable from the right one.)"""
    where = f"meta split '{split}' in {utils.split_paths(cfg.data)[0]}"
    fix = (f"Re-binarize the meta split with --srcdict/--tgtdict of the training data-bin (after the same "
           f"tokenization/BPE as the training text): {binarize_hint(cfg, split)}")
    step = max(1, len(dataset) // max_sentences)
    for side, data, d, lang in (("source", dataset.src, src_dict, cfg.source_lang),
                                ("target", dataset.tgt, tgt_dict, cfg.target_lang)):
        if data is None or len(data) == 0:
            continue
        toks = torch.cat([data[i].long().view(-1) for i in range(0, len(data), step)])
        if toks.numel() and int(toks.max()) >= len(d):
            raise ValueError(
                f"{where}: its {side} side has token id {int(toks.max())} but dict.{lang}.txt of the training "
                f"data has only {len(d)} entries, so it was binarized with a different dictionary. {fix}")
        words = toks[(toks >= d.nspecial) | (toks == d.unk())]
        unk = float((words == d.unk()).float().mean()) if words.numel() else 0.0
        if unk > 0.5:
            raise ValueError(
                f"{where}: {unk:.0%} of its {side} tokens are <unk> under dict.{lang}.txt of the training "
                f"data: it was binarized with a different dictionary, or from text not tokenized like the "
                f"training data. {fix}")
        if unk > 0.1 and log is not None:
            log.warning(f"{where}: {unk:.0%} of its {side} tokens are <unk> under the training dictionary")
