"""The deep teacher learns to rank corrupted pairs below clean ones (real CLI, tiny corpus)."""

import numpy as np
import pytest

from conftest import make_corpus, preprocess, run, train_cmd
from fairseq_reweight.core import auc


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    root = tmp_path_factory.mktemp("noisy")
    corrupted = make_corpus(root / "raw", n_train=300, corrupt=1 / 3, seed=0)  # misaligned targets
    assert len(corrupted) == 100
    return preprocess(root / "raw", root / "bin"), corrupted


def dumped_weights(data, tmp_path, method, recipe=()):
    """(update, pair id, weight) rows of a 300-update run's --dump-weights."""
    dump = tmp_path / f"{method}.tsv"
    run(train_cmd(data, tmp_path / method, method, max_update=300,
                  extra=["--lr", "5e-3", "--reweight-warmup", "100", "--dump-weights", dump, *recipe]))
    return np.loadtxt(dump, skiprows=1)


@pytest.mark.parametrize("contrast,min_left_out", [("once", 60), ("batch", 90)])
def test_deep_teacher_ranks_corrupted_pairs_below_clean_and_leaves_them_out(noisy, tmp_path, contrast, min_left_out):
    """The default (tuned) teacher, with the corpus's source contrast from one pass (the default) and from every batch.
    Ranking and size over the first reweighted updates: AUC > 0.8, and corrupted pairs get at most 2/3 of a clean
    pair's mean weight; filter (--drop-below, on by default): the pairs no longer scored over the last 50 updates
    (every kept pair about 7 times) are at least 60 % (per batch: 90 %) of the corrupted ones and at most 20 of the
    200 clean ones -- the pass's contrast comes from the student of the first reweighted update (and of update 200,
    --source-contrast-refresh), the weaker filter (README, Results). Uniform weights (AUC 0.5 from ties, nothing left out) fail all three."""
    data, corrupted = noisy
    rows = dumped_weights(data, tmp_path, "deep", ["--reweight-recipe", "tuned", "--source-contrast", contrast])
    first = rows[(rows[:, 0] >= 100) & (rows[:, 0] < 150)]
    w, ids = first[:, 2], first[:, 1].astype(int)
    clean = np.array([i not in corrupted for i in ids])
    assert auc(w, clean) > 0.8
    assert w[~clean].mean() < 2 / 3 * w[clean].mean(), (w[~clean].mean(), w[clean].mean())
    scored = set(rows[rows[:, 0] >= 250][:, 1].astype(int))
    left_out = set(range(300)) - scored
    assert len(left_out & set(corrupted)) >= min_left_out, len(left_out & set(corrupted))
    assert len(left_out - set(corrupted)) <= 20, len(left_out - set(corrupted))
