"""--source-contrast once: the corpus's source contrast, computed by one pass when reweighting starts."""

import pytest
import torch

from conftest import run, train_cmd
from fairseq_reweight import compat  # noqa: F401  (torch.load allow-list)
from fairseq_reweight.contrast import contrast_batches

ONCE = ["--reweight-recipe", "tuned", "--source-contrast", "once", "--reweight-warmup", "4",
        "--save-interval-updates", "4", "--keep-interval-updates", "5"]


def _load(path, data):
    """(model in eval mode, task) of a checkpoint, its task reading ``data``."""
    from fairseq import checkpoint_utils

    import fairseq_reweight.task  # noqa: F401  (registers the task)

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(data)})
    task.load_dataset("train")
    return models[0].eval(), task


def _nll_per_token(model, task, src, tgt):
    """Mean target-token NLL of one pair through fairseq's plain model forward (no padding, no batch)."""
    sample = task.dataset("train").collater([{"id": 0, "source": src, "target": tgt}])
    with torch.no_grad():
        out = model(**sample["net_input"])
        lprobs = model.get_normalized_probs(out, log_probs=True)[0]
    return float(-lprobs.gather(-1, sample["target"][0][:, None]).mean())


def test_corpus_contrast_is_the_students_at_the_first_reweighted_update(tiny_data, tmp_path):
    """The values the teacher reads are, for every training pair, its target's per-token NLL given the source of
    its neighbour in a length-sorted batch minus given its own, with the student of the update where reweighting
    started (checked pair by pair with fairseq's plain forward of single pairs), saved in the checkpoint; the meta
    set's values are the prior's clean reference, folded into the teacher once."""
    run(train_cmd(tiny_data, tmp_path / "ck", "deep", max_update=9, extra=ONCE + ["--source-contrast-refresh", "0"]))
    saved = torch.load(tmp_path / "ck" / "checkpoint_last.pt", weights_only=True)["extra_state"][
        "ReweightedTranslationTask"]
    values = saved["source_contrast"]["train"]
    model, task = _load(tmp_path / "ck" / "checkpoint_1_4.pt", tiny_data)  # the student after the plain updates
    dataset = task.dataset("train")
    assert values.shape == (len(dataset), 2) and saved["source_contrast"]["meta"].shape == (60, 2)
    checked = 0
    for batch in contrast_batches(task, model, dataset)[:3]:
        ids = dataset.collater([dataset[int(i)] for i in batch])["id"].tolist()  # the batch's order (by length)
        for k, i in enumerate(ids):
            j = ids[k - 1]  # the batch's sources rotated by one
            src_i, src_j, tgt = dataset[int(i)]["source"], dataset[int(j)]["source"], dataset[int(i)]["target"]
            other, own = _nll_per_token(model, task, src_j, tgt), _nll_per_token(model, task, src_i, tgt)
            assert abs(float(values[int(i), 0]) - other) < 1e-4 and abs(float(values[int(i), 1]) - own) < 1e-4, \
                (int(i), values[int(i)].tolist(), other, own)
            checked += 1
    assert checked > 30 and float((values[:, 0] - values[:, 1]).std()) > 0.01
    reference = saved["reweighter"]["teacher"]
    meta = saved["source_contrast"]["meta"]
    assert int(reference["reference.count"]) == 1  # folded in once, not per meta batch
    assert abs(float(reference["reference.mean"]) - float((meta[:, 0] - meta[:, 1]).mean())) < 1e-5


@pytest.mark.parametrize("value,message", [
    ("once", "--source-contrast once: the teacher of this run does not read source_contrast"),
    ("sometimes", "--source-contrast must be batch or once, got 'sometimes'")])
def test_a_source_contrast_without_effect_or_unknown_is_refused(tiny_data, tmp_path, value, message):
    p = run(train_cmd(tiny_data, tmp_path / "ck", "deep", max_update=2, extra=["--source-contrast", value]), check=False)
    assert p.returncode != 0 and message in p.stdout, p.stdout[-3000:]
    assert not (tmp_path / "ck" / "checkpoint_last.pt").exists()
    assert value == "sometimes" or "add source_contrast to --teacher-inputs" in p.stdout  # the way on


def test_pass_batches_give_every_pair_another_source(tiny_data, tmp_path):
    """A batch of one pair has no other source to read: the pass joins it to its neighbour, so no pair is left
    with the 0 of an unscored row."""
    from types import SimpleNamespace

    import numpy as np

    class Pairs:  # what contrast_batches asks of a dataset
        def ordered_indices(self):
            return np.arange(5)

        def filter_indices_by_size(self, indices, max_positions):
            return indices, []

        def batch_by_size(self, indices, max_tokens, max_sentences):
            return [np.array([0]), np.array([1, 2]), np.array([3]), np.array([4])]

    task = SimpleNamespace(cfg=SimpleNamespace(seed=1, max_tokens=100, batch_size=None), max_positions=lambda: None)
    inner = SimpleNamespace(max_positions=lambda: None)
    batches = contrast_batches(task, inner, Pairs())
    assert [sorted(int(i) for i in b) for b in batches] == [[0, 1, 2], [3, 4]]


def test_sharded_data_is_refused_with_the_corpus_pass(tiny_data, tmp_path):
    p = run(train_cmd(f"{tiny_data}:{tiny_data}", tmp_path / "ck", "deep", max_update=2,
                      extra=["--reweight-recipe", "tuned", "--source-contrast", "once"]), check=False)
    assert p.returncode != 0 and "--data has 2 shards" in p.stdout and "use --source-contrast batch" in p.stdout, \
        p.stdout[-3000:]
    # the tuned recipe's own choice falls back to the per-batch contrast there instead of failing
    p = run(train_cmd(f"{tiny_data}:{tiny_data}", tmp_path / "ck2", "deep", max_update=2,
                      extra=["--reweight-recipe", "tuned"]), check=False)
    assert p.returncode == 0 and "source_contrast=batch" in p.stdout, p.stdout[-3000:]


def test_refresh_rescores_the_pairs_still_trained_on_and_replaces_the_reference(tiny_data, tmp_path):
    """--source-contrast-refresh N: the pass runs again N updates after the last one, with the student of that update,
    for the pairs --drop-below has not left out (those keep their earlier values; the kept pairs are batched without
    them), and the prior's clean reference becomes the new meta values alone. A run stopped before a refresh and
    resumed gives the same weights as an uninterrupted one."""
    import numpy as np

    from fairseq_reweight.contrast import scored, split_contrast
    from fairseq_reweight.criterion import ReweightedLabelSmoothedCrossEntropyCriterion

    extra = ["--teacher-inputs", "states,token_stats,source_contrast,progress", "--source-contrast", "once",
             "--source-contrast-refresh", "6", "--teacher-prior", "source_contrast", "--teacher-prior-reference",
             "meta", "--teacher-lr", "0.05", "--drop-below", "0.9", "--required-batch-size-multiple", "1",
             "--teacher-progress-horizon", "20", "--save-interval-updates", "6"]
    a = run(train_cmd(tiny_data, tmp_path / "a", "deep", max_update=14, extra=extra + ["--dump-weights", tmp_path / "a.tsv"]))
    assert "scoring" in a.stdout and "again at update 6" in a.stdout and "again at update 12" in a.stdout, a.stdout[-3000:]
    ck = sorted((tmp_path / "a").glob("checkpoint_*_12.pt"))
    assert len(ck) == 1, list((tmp_path / "a").iterdir())
    state = lambda p: torch.load(p, weights_only=True)["extra_state"]["ReweightedTranslationTask"]  # noqa: E731
    last, at12 = state(tmp_path / "a" / "checkpoint_last.pt"), state(ck[0])  # at12: the values of the pass at 6
    assert (last["source_contrast"]["built_at"], last["source_contrast"]["passes"]) == (12, 3)
    skip = at12["drop"]["dropped"].numpy()
    assert 0 < skip.sum() < len(skip), "nothing left out before the refresh: the test does not exercise the skip"
    model, task = _load(ck[0], tiny_data)  # the student of the update of the last pass
    fresh = split_contrast(task, model, ReweightedLabelSmoothedCrossEntropyCriterion(task, False, 0.0),
                           task.dataset("train"), parts=True, skip=skip)
    values, before = last["source_contrast"]["train"], at12["source_contrast"]["train"]
    keep = torch.from_numpy(~skip)
    assert torch.allclose(values[keep], fresh[keep], atol=1e-5)
    assert torch.equal(values[~keep], before[~keep])  # left out: the earlier pass's values
    assert (values[keep] - before[keep]).abs().max() > 1e-3  # the refresh changed what the teacher reads
    meta = last["source_contrast"]["meta"]
    meta = meta[scored(meta)]
    reference = last["reweighter"]["teacher"]
    assert int(reference["reference.count"]) == 1  # the new pass's alone
    assert abs(float(reference["reference.mean"]) - float((meta[:, 0] - meta[:, 1]).mean())) < 1e-5
    assert abs(float(at12["reweighter"]["teacher"]["reference.mean"]) - float(reference["reference.mean"])) > 1e-4

    b = extra + ["--dump-weights", tmp_path / "b.tsv"]
    run(train_cmd(tiny_data, tmp_path / "b", "deep", max_update=10, extra=b))
    run(train_cmd(tiny_data, tmp_path / "b", "deep", max_update=14, extra=b))
    assert np.array_equal(np.loadtxt(tmp_path / "a.tsv", skiprows=1), np.loadtxt(tmp_path / "b.tsv", skiprows=1))


@pytest.mark.parametrize("extra,message", [
    (["--source-contrast", "batch", "--source-contrast-refresh", "5"],
     "--source-contrast-refresh 5 repeats the corpus pass of --source-contrast once"),
    (["--source-contrast-refresh", "-1"], "--source-contrast-refresh must be >= 0")])
def test_a_refresh_without_a_pass_or_negative_is_refused(tiny_data, tmp_path, extra, message):
    p = run(train_cmd(tiny_data, tmp_path / "ck", "deep", max_update=2, extra=["--reweight-recipe", "tuned"] + extra),
            check=False)
    assert p.returncode != 0 and message in p.stdout, p.stdout[-3000:]
    assert not (tmp_path / "ck" / "checkpoint_last.pt").exists()
