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


def final_auc(data, corrupted, tmp_path, method):
    dump = tmp_path / f"{method}.tsv"
    run(train_cmd(data, tmp_path / method, method, max_update=300,
                  extra=["--lr", "5e-3", "--reweight-warmup", "100", "--dump-weights", dump]))
    rows = np.loadtxt(dump, skiprows=1)
    last = rows[rows[:, 0] >= 250]  # the last 50 updates: every training pair about 7 times
    assert len(set(last[:, 1].astype(int))) >= 285  # nearly every pair is scored
    return auc(last[:, 2], [int(i) not in corrupted for i in last[:, 1].astype(int)])


def test_deep_teacher_ranks_corrupted_pairs_below_clean(noisy, tmp_path):
    data, corrupted = noisy
    assert final_auc(data, corrupted, tmp_path, "deep") > 0.8
    assert final_auc(data, corrupted, tmp_path, "none") < 0.6
