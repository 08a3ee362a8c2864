"""fairseq-reweight-score: a corpus filter from the teacher (and the practitioners' scores), through the CLI."""

import gzip
import os

import numpy as np
import pytest

from conftest import BIN, make_corpus, preprocess, run, train_cmd
from fairseq_reweight.core import auc

SCORE = [BIN / "fairseq-reweight-score"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A third of 300 pairs misaligned; a short deep run (tuned recipe) and its checkpoint."""
    root = tmp_path_factory.mktemp("score")
    corrupted = make_corpus(root / "raw", n_train=300, corrupt=1 / 3, seed=0)
    data = preprocess(root / "raw", root / "bin")
    flags = np.array([1 if i in corrupted else 0 for i in range(300)])
    run(train_cmd(data, root / "deep", "deep", max_update=300,
                  extra=["--lr", "5e-3", "--reweight-warmup", "100", "--reweight-recipe", "tuned"]))
    return root, data, flags


def _rows(path):
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), np.array([[float(x) for x in line.split("\t")] for line in lines[1:]])


@pytest.mark.parametrize("score", ["teacher", "source-contrast"])
def test_scores_separate_misaligned_pairs_in_the_splits_order(scored, tmp_path, score):
    root, data, flags = scored
    out, keep, filt = tmp_path / "s.tsv", tmp_path / "keep.txt", tmp_path / "kept.tsv"
    run(SCORE + [data, "--path", root / "deep" / "checkpoint_last.pt", "--score", score, "--out", out, "--keep", "0.6",
                 "--keep-list", keep, "--raw", root / "raw" / "train.src", root / "raw" / "train.tgt",
                 "--filtered", filt, "--no-progress"])
    header, rows = _rows(out)
    assert header[:3] == ["id", "score", "nll_per_token"] and "source_contrast" in header
    assert rows[:, 0].tolist() == list(range(300))  # one row per pair, sentence id first, in the split's order
    a = auc(rows[:, 1], (flags == 0).astype(int))  # row i against line i of the flags: order matters
    assert a > 0.8, a
    if score == "teacher":
        assert ((rows[:, 1] > 0) & (rows[:, 1] < 1)).all()  # the sigmoid output, not a batch-normalised weight
    kept = np.array([int(x) for x in keep.read_text().split()])
    assert kept.sum() == 180 and flags[kept == 1].mean() < flags.mean() / 2
    src = (root / "raw" / "train.src").read_text().splitlines()
    lines = filt.read_text().splitlines()
    assert len(lines) == 180 and lines[0].split("\t")[0] == src[int(np.flatnonzero(kept)[0])]
    assert float(lines[0].split("\t")[2]) == pytest.approx(rows[np.flatnonzero(kept)[0], 1], rel=1e-4)
    if score == "teacher":  # gzip-compressed raw text (as corpora ship) gives the same output
        for side in ("src", "tgt"):
            (tmp_path / f"train.{side}.gz").write_bytes(gzip.compress((root / "raw" / f"train.{side}").read_bytes()))
        run(SCORE + [data, "--path", root / "deep" / "checkpoint_last.pt", "--out", tmp_path / "s2.tsv", "--keep",
                     "0.6", "--raw", tmp_path / "train.src.gz", tmp_path / "train.tgt.gz", "--filtered",
                     tmp_path / "kept2.tsv", "--no-progress"])
        assert (tmp_path / "kept2.tsv").read_text() == filt.read_text()


def test_dual_conditional_cross_entropy(scored, tmp_path):
    """dual-xent with a backward (target->source) model trained by the same CLI on the same corpus."""
    root, data, flags = scored
    back = train_cmd(data, root / "back", "none", max_update=150, extra=["--lr", "5e-3", "--source-lang", "tgt",
                                                                          "--target-lang", "src"])
    run(back)
    out = tmp_path / "d.tsv"
    fwd = root / "deep" / "checkpoint_last.pt"
    run(SCORE + [data, "--path", fwd, "--score", "dual-xent", "--backward-path", root / "back" / "checkpoint_last.pt",
                 "--out", out, "--no-progress"])
    header, rows = _rows(out)
    assert header == ["id", "score", "nll_per_token", "nll_per_token_backward"]
    hf, hb = rows[:, 2], rows[:, 3]
    assert np.allclose(rows[:, 1], np.exp(-(np.abs(hf - hb) + (hf + hb) / 2)), rtol=1e-4)
    assert auc(rows[:, 1], (flags == 0).astype(int)) > 0.8
    p = run(SCORE + [data, "--path", fwd, "--score", "dual-xent", "--backward-path", fwd, "--out", tmp_path / "x.tsv"],
            check=False)
    assert p.returncode == 2 and "--source-lang tgt --target-lang src" in p.stdout


def test_score_errors_name_the_fix(scored, tmp_path):
    root, data, flags = scored
    ck = root / "deep" / "checkpoint_last.pt"
    run(train_cmd(data, tmp_path / "none", "none", max_update=2))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cases = [
        (["--path", tmp_path / "none" / "checkpoint_last.pt"], "holds no teacher (trained with --reweight-method none)"),
        (["--path", ck, "--split", "nope"], "has no split 'nope'"),
        (["--path", ck, "--keep", "0.5", "--filtered", tmp_path / "f", "--raw", root / "raw" / "valid.src",
          root / "raw" / "valid.tgt"], "has 300 pairs but --raw has 40 and 40 lines"),
        (["--path", ck, "--keep", "1.5"], "--keep must be a fraction in (0, 1]"),
        (["--path", ck, "--keep", "0"], "--keep must be a fraction in (0, 1]"),
        (["--path", ck, "--keep-list", tmp_path / "k"], "need --keep FRACTION or --threshold"),
        # a pipe would be emptied by the line count and leave --filtered empty
        (["--path", ck, "--keep", "0.5", "--filtered", tmp_path / "f", "--raw", fifo, fifo],
         "is not a regular file (a pipe such as <(zcat FILE.gz) can be read only once"),
    ]
    for extra, message in cases:
        out = tmp_path / "s.tsv"
        p = run(SCORE + [data, *extra, "--out", out, "--no-progress"], check=False)
        assert p.returncode == 2 and message in p.stdout, (extra, p.stdout[-2000:])
        assert not out.exists() and not (tmp_path / "f").exists()  # nothing written on an error


def test_interrupted_output_leaves_no_file_that_looks_complete(tmp_path):
    from fairseq_reweight.score import _AtomicWriter

    path = tmp_path / "scores.tsv"
    with pytest.raises(KeyboardInterrupt):
        with _AtomicWriter(str(path)) as f:
            f.write("id\tscore\n0\t0.5\n")
            raise KeyboardInterrupt
    assert not path.exists() and not (tmp_path / "scores.tsv.tmp").exists()
    with _AtomicWriter(str(path)) as f:
        f.write("id\tscore\n")
    assert path.read_text() == "id\tscore\n"
