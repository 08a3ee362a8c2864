"""--drop-below: the teacher as a filter during training (core/selection.py, task.get_batch_iterator)."""

import re

import numpy as np
import pytest
import torch

from conftest import run, train_cmd
from fairseq_reweight.core.selection import EpochDrop


def test_epoch_drop_leaves_out_low_mean_weights_for_good_and_resumes():
    d = EpochDrop(6, 0.5)
    assert not d.begin_epoch(1).any()  # nothing recorded yet
    d.record(torch.tensor([0, 1, 2, 0]), torch.tensor([0.2, 0.9, 0.4, 0.6]))  # means: 0 -> 0.4, 1 -> 0.9, 2 -> 0.4
    state = d.state_dict()
    assert d.begin_epoch(2).tolist() == [True, False, True, False, False, False]
    assert d.begin_epoch(2).tolist() == [True, False, True, False, False, False]  # the same epoch again: same mask
    d.record(torch.tensor([1, 3]), torch.tensor([0.1, 1.5]))
    assert d.begin_epoch(3).tolist() == [True, True, True, False, False, False]  # dropped ones stay dropped
    again = EpochDrop(6, 0.5)
    again.load_state_dict(state)  # saved mid-epoch 1
    assert again.begin_epoch(2).tolist() == [True, False, True, False, False, False]
    with pytest.raises(ValueError, match="covers 6 training examples but this training split has 5"):
        EpochDrop(5, 0.5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"--drop-below must be in \(0, 1\)"):
        EpochDrop(5, 1.0)
    d.record(torch.tensor([3, 4, 5]), torch.tensor([0.1, 0.1, 0.1]))
    with pytest.raises(RuntimeError, match="would leave no training examples for epoch 4"):
        d.begin_epoch(4)


def _epochs(stdout):
    """update -> epoch, from fairseq's per-update log lines (--log-interval 1)."""
    out = {}
    for m in re.finditer(r"epoch (\d+):\s+\d+ / \d+ .*?num_updates=(\d+)", stdout):
        out[int(m.group(2)) - 1] = int(m.group(1))
    return out


def test_drop_below_leaves_out_the_sentences_below_the_threshold_and_resumes_exactly(tiny_data, tmp_path):
    """Through the CLI: from epoch 2 on, exactly the sentences whose mean weight in an earlier epoch was below the
    threshold are missing from the batches (and the log says how many); a run interrupted mid-epoch and resumed
    trains on the same batches with the same weights as an uninterrupted one."""
    extra = ["--teacher-lr", "0.05", "--drop-below", "0.5", "--save-interval-updates", "100",
             "--required-batch-size-multiple", "1", "--teacher-progress-horizon", "20"]
    a = run(train_cmd(tiny_data, tmp_path / "a", "deep", max_update=20, extra=extra + ["--dump-weights", tmp_path / "a.tsv"]))
    rows = np.loadtxt(tmp_path / "a.tsv", skiprows=1)
    epoch_of = _epochs(a.stdout)
    epochs = np.array([epoch_of[int(u)] for u in rows[:, 0]])
    n = int(rows[:, 1].max()) + 1
    universe = np.zeros(n, bool)
    universe[rows[epochs == 1][:, 1].astype(int)] = True  # the sentences of a full epoch
    dropped = np.zeros(n, bool)
    left = [int(m) for m in re.findall(r"--drop-below 0.5: epoch \d+ leaves out (\d+) of", a.stdout)]
    assert left[0] == 0
    checked = 0
    for e in range(1, int(epochs.max())):  # the complete epochs (the last one may be cut by --max-update)
        ids = rows[epochs == e][:, 1].astype(int)
        seen = np.zeros(n, bool)
        seen[ids] = True
        assert (seen == (universe & ~dropped)).all(), e  # exactly the sentences not dropped, none of the dropped
        sums = np.bincount(ids, rows[epochs == e][:, 2], minlength=n)
        counts = np.bincount(ids, minlength=n)
        dropped |= (counts > 0) & (sums < 0.5 * counts)
        assert left[e] == dropped.sum(), e  # the log line of epoch e + 1
        checked += int(0 < dropped.sum() < universe.sum())
    assert checked > 0, "nothing was dropped: the test does not exercise --drop-below"

    b = extra + ["--dump-weights", tmp_path / "b.tsv"]
    run(train_cmd(tiny_data, tmp_path / "b", "deep", max_update=15, extra=b + ["--save-interval-updates", "15"]))
    run(train_cmd(tiny_data, tmp_path / "b", "deep", max_update=20, extra=b))
    assert (tmp_path / "a.tsv").read_text() == (tmp_path / "b.tsv").read_text()


def test_drop_below_needs_weights(tiny_data, tmp_path):
    p = run(train_cmd(tiny_data, tmp_path / "n", "none", extra=["--drop-below", "0.5"]), check=False)
    assert p.returncode != 0 and "--drop-below leaves out sentences by their weights" in p.stdout
