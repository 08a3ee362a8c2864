"""Tiny generated parallel corpora and helpers to run fairseq's real command-line tools.

`run` merges stderr into stdout (fairseq logs to stdout, tracebacks go to stderr)."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fairseq_reweight import compat  # noqa: F401  (torch.load of fairseq checkpoints in the tests themselves)

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = str(ROOT / "fairseq_reweight")
BIN = Path(sys.executable).parent


def translate(src_words):
    """The toy language pair: word `aN` translates to `bN` (monotone, learnable in a few hundred updates)."""
    return ["b" + w[1:] for w in src_words]


def make_corpus(raw: Path, n_train=300, n_meta=60, n_valid=40, corrupt=0.0, seed=0, vocab=24):
    """Write train/valid/test/meta raw files (src, tgt); returns the set of corrupted train line ids."""
    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)

    def sentence():
        return [f"a{rng.randrange(vocab)}" for _ in range(rng.randint(3, 8))]

    corrupted = set()
    splits = {"train": n_train, "valid": n_valid, "test": n_valid, "meta": n_meta}
    for split, n in splits.items():
        src = [sentence() for _ in range(n)]
        tgt = [translate(s) for s in src]
        if split == "train" and corrupt > 0:
            ids = rng.sample(range(n), int(round(corrupt * n)))
            for i in ids:  # misaligned: a random other sentence's translation
                tgt[i] = translate(sentence())
            corrupted = set(ids)
        (raw / f"{split}.src").write_text("".join(" ".join(s) + "\n" for s in src))
        (raw / f"{split}.tgt").write_text("".join(" ".join(t) + "\n" for t in tgt))
    return corrupted


def run(cmd, cwd=None, env=None, check=True):
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-6000:]}")
    return p


def preprocess(raw: Path, dest: Path, meta=True, joined=False):
    """Binarize like scripts/prepare_multi30k.sh: train/valid/test, then meta with the same dictionaries
    (``joined``: one dictionary for both sides, as --share-all-embeddings needs)."""
    run([BIN / "fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
         "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
         "--destdir", dest, "--workers", "1"] + (["--joined-dictionary"] if joined else []))
    if meta:
        tmp = dest / "_meta"
        run([BIN / "fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
             "--srcdict", dest / "dict.src.txt", "--tgtdict", dest / "dict.tgt.txt",
             "--testpref", raw / "meta", "--destdir", tmp, "--workers", "1"])
        for f in tmp.glob("test.*"):
            f.rename(dest / f.name.replace("test.", "meta.", 1))
        shutil.rmtree(tmp)
    return dest


ARCHS = {
    "transformer": ["--arch", "transformer", "--encoder-layers", "2", "--decoder-layers", "2",
                    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                    "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
                    "--decoder-attention-heads", "2"],
    "lstm": ["--arch", "lstm", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
             "--encoder-hidden-size", "32", "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32"],
}


def train_cmd(data, save_dir, method="deep", arch="transformer", max_update=6, extra=()):
    cmd = [BIN / "fairseq-train", data, "--user-dir", USER_DIR, "--task", "reweighted_translation",
           "--criterion", "reweighted_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
           "--reweight-method", method, "--cpu", "--optimizer", "adam", "--lr", "3e-3", "--max-tokens", "400",
           "--max-update", str(max_update), "--save-dir", save_dir, "--seed", "1", "--log-format", "simple",
           "--log-interval", "1", "--no-epoch-checkpoints", "--num-workers", "0",
           "--dropout", "0.1"] + ARCHS[arch]
    # the tests of the mechanics use the plain flags (--reweight-recipe paper); the tuned defaults have their own
    if method != "none" and "--reweight-recipe" not in [str(x) for x in extra]:
        cmd += ["--reweight-recipe", "paper"]
    return cmd + list(extra)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_corpus(root / "raw")
    return preprocess(root / "raw", root / "bin")


@pytest.fixture(scope="session")
def tied_data(tmp_path_factory):
    """tiny_data's corpus with one joined dictionary (--share-all-embeddings)."""
    root = tmp_path_factory.mktemp("tied")
    make_corpus(root / "raw")
    return preprocess(root / "raw", root / "bin", joined=True)
