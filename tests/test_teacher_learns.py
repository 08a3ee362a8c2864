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


def last_weights(data, corrupted, tmp_path, method, recipe=()):
    dump = tmp_path / f"{method}.tsv"
    run(train_cmd(data, tmp_path / method, method, max_update=300,
                  extra=["--lr", "5e-3", "--reweight-warmup", "100", "--dump-weights", dump, *recipe]))
    rows = np.loadtxt(dump, skiprows=1)
    last = rows[rows[:, 0] >= 250]  # the last 50 updates: every training pair about 7 times
    assert len(set(last[:, 1].astype(int))) >= 285  # nearly every pair is scored
    clean = np.array([int(i) not in corrupted for i in last[:, 1].astype(int)])
    return last[:, 2], clean


def test_deep_teacher_ranks_corrupted_pairs_below_clean(noisy, tmp_path):
    """The default (tuned) teacher. Ranking and size: AUC > 0.8, and corrupted pairs get at most 2/3 of a clean pair's mean weight (uniform
    weights, AUC 0.5 from ties, fail both)."""
    data, corrupted = noisy
    w, clean = last_weights(data, corrupted, tmp_path, "deep", ["--reweight-recipe", "tuned"])
    assert auc(w, clean) > 0.8
    assert w[~clean].mean() < 2 / 3 * w[clean].mean(), (w[~clean].mean(), w[clean].mean())
