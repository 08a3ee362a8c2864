"""Data-parallel training (torchrun + gloo on 2 CPU processes), gradient accumulation, and
numerical faults, through fairseq's real CLI where it matters."""

import re
import socket

import pytest
import torch

from conftest import BIN, run, train_cmd
from fairseq_reweight import compat  # noqa: F401  (torch.load allow-list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# fairseq 0.12 on CPUs: its torchrun detection divides by the GPU count and its pytorch_ddp wrapper
# insists on device ids, so CPU workers take the env:// rendezvous directly and fairseq's legacy DDP
# (the recipe in the README, "Running at scale")
CPU_DDP = ["--distributed-backend", "gloo", "--distributed-init-method", "env://", "--distributed-no-spawn",
           "--distributed-rank", "-1", "--ddp-backend", "legacy_ddp"]


def run_ddp(cmd, nproc=2, check=True):
    args = [BIN / "torchrun", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), cmd[0], *cmd[1:], "--distributed-world-size", str(nproc), *CPU_DDP]
    return run(args, env={"OMP_NUM_THREADS": "1"}, check=check)


def params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_data, tmp_path):
    """none (plain training through the task): 2 workers x 1 batch == 1 worker x --update-freq 2."""
    extra = ["--dropout", "0.0", "--max-tokens", "200"]
    run_ddp(train_cmd(tiny_data, tmp_path / "ddp", "none", max_update=4, extra=extra))
    run(train_cmd(tiny_data, tmp_path / "one", "none", max_update=4, extra=extra + ["--update-freq", "2"]))
    a, b = params(tmp_path / "ddp" / "checkpoint_last.pt"), params(tmp_path / "one" / "checkpoint_last.pt")
    for k in a:
        if k.endswith("k_proj.bias"):
            # its gradient is zero in exact arithmetic (softmax ignores a constant shift of the scores);
            # Adam turns the rounding noise left there into lr-sized steps of random sign
            continue
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("method", ["deep", "l2rw"])
def test_ddp_keeps_one_teacher_and_resumes(tiny_data, tmp_path, method):
    """2 workers with --update-freq 2: the teacher is checked identical on every worker after every meta
    update (a mismatch stops the run), weights are dumped per worker, and the run resumes."""
    dump = tmp_path / "w.tsv"
    cmd = train_cmd(tiny_data, tmp_path / "run", method, max_update=4,
                    extra=["--update-freq", "2", "--max-tokens", "200", "--dump-weights", dump])
    out = run_ddp(cmd).stdout
    if method == "deep":
        assert "teacher identical on all 2 workers" in out
        state = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)
        rw = state["extra_state"]["ReweightedTranslationTask"]["reweighter"]
        assert rw["meta_steps"] == 4  # one teacher step per update, not per micro-batch or worker
    assert dump.exists() and (tmp_path / "w.tsv.rank1").exists()
    out = run_ddp(train_cmd(tiny_data, tmp_path / "run", method, max_update=6,
                            extra=["--update-freq", "2", "--max-tokens", "200"])).stdout
    assert "num_updates 6" in out or "| num_updates 6" in out or "done training" in out
    if method == "deep":
        assert "restored the deep teacher" in out


def test_torchrun_without_distributed_flags_is_refused(tiny_data, tmp_path):
    """fairseq-train under torchrun without --distributed-world-size runs N independent trainings into
    one save dir; the task refuses that instead of letting them overwrite each other's checkpoints."""
    args = [BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), *map(str, train_cmd(tiny_data, tmp_path / "run", "deep", max_update=2)),
            "--distributed-backend", "gloo"]
    p = run(args, env={"OMP_NUM_THREADS": "1"}, check=False)
    assert p.returncode != 0 and "--distributed-world-size 2" in p.stdout
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


def test_torch_ddp_forward_goes_through_the_wrapper(tiny_data):
    """Under torch's DistributedDataParallel (fairseq's pytorch_ddp, the GPU default) the forward runs
    through the wrapper, so DDP all-reduces the gradients; the per-sentence losses are unchanged."""
    import torch.distributed as dist
    from test_metagrad_fairseq import build, first_batch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg, task, model, criterion = build(tiny_data, extra=("--dropout", "0.0"))
        sample = first_batch(task, "train", model)
        ref = criterion.per_sentence(model, sample, layers=[1])
        from fairseq.distributed import ModuleProxyWrapper

        ddp = torch.nn.parallel.DistributedDataParallel(model)
        calls = []
        ddp.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
        out = criterion.per_sentence(ModuleProxyWrapper(ddp), sample, layers=[1])  # as fairseq wraps it
        assert calls, "the forward did not go through DistributedDataParallel"
        assert torch.allclose(out.loss, ref.loss) and torch.allclose(out.states[0], ref.states[0])
    finally:
        dist.destroy_process_group()


def test_process_group_is_destroyed_before_the_interpreter_exits(tiny_data, tmp_path):
    """fairseq-train leaves the process group alive; gloo's threads torn down during interpreter finalisation
    can then abort a worker that finished training (SIGABRT). The task destroys the group at exit, before
    finalisation: a handler registered before the task's runs after it and sees the group gone."""
    import subprocess
    import sys

    from conftest import ROOT

    script = tmp_path / "exit.py"
    script.write_text(
        "import atexit, sys\n"
        "import torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)\n"
        "atexit.register(lambda: print('group alive after the task exit handler:', dist.is_initialized()))\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from test_metagrad_fairseq import build\n"
        f"build({str(tiny_data)!r})\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "group alive after the task exit handler: False" in p.stdout, p.stdout[-2000:]


def test_update_freq_steps_the_teacher_once_per_update(tiny_data, tmp_path):
    out = run(train_cmd(tiny_data, tmp_path / "run", "deep", max_update=5, extra=["--update-freq", "3"])).stdout
    state = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)
    assert state["extra_state"]["ReweightedTranslationTask"]["reweighter"]["meta_steps"] == 5, out[-3000:]


def test_fp16_is_refused_with_a_clear_error(tiny_data, tmp_path):
    p = run(train_cmd(tiny_data, tmp_path / "run", "deep", max_update=2, extra=["--amp"]), check=False)
    assert p.returncode != 0 and "--amp with --reweight-method deep is not supported" in p.stdout
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


# ---------------------------------------------------------------------- numerical faults
def _trainer(data, method="deep"):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    from conftest import ARCHS, USER_DIR

    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(data), "--user-dir", USER_DIR, "--task", "reweighted_translation", "--criterion",
        "reweighted_label_smoothed_cross_entropy", "--reweight-method", method, "--cpu", "--optimizer", "adam",
        "--lr", "1e-3", "--max-tokens", "400", "--seed", "1", "--reweight-recipe", "paper", *ARCHS["transformer"]])
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(1)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    trainer.begin_epoch(1)
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=400, seed=1).next_epoch_itr(shuffle=False)
    return trainer, task, model, criterion, itr


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_nan_sentence_loss_reaches_neither_student_nor_teacher(tiny_data, caplog):
    trainer, task, model, criterion, itr = _trainer(tiny_data)
    trainer.train_step([next(itr)])  # a normal update builds the teacher
    student, teacher = _snapshot(model), _snapshot(task.reweighter.teacher)
    steps = task.reweighter.meta_steps
    real = criterion.per_sentence

    def poisoned(*a, **k):
        out = real(*a, **k)
        return out._replace(loss=out.loss.index_fill(0, torch.tensor([1]), float("nan")))

    criterion.per_sentence = poisoned
    log = trainer.train_step([next(itr)])
    criterion.per_sentence = real
    assert log is not None and "NaN/inf" in caplog.text
    for k, v in _snapshot(model).items():
        assert torch.equal(v, student[k]), k  # zero gradient: Adam's first moments stay zero for it
    for k, v in _snapshot(task.reweighter.teacher).items():
        assert torch.equal(v, teacher[k]), k
    assert task.reweighter.meta_steps == steps
    trainer.train_step([next(itr)])  # and training goes on
    assert task.reweighter.meta_steps == steps + 1


def test_nan_meta_loss_skips_the_teacher_update_only(tiny_data):
    trainer, task, model, criterion, itr = _trainer(tiny_data)
    trainer.train_step([next(itr)])
    student, teacher = _snapshot(model), _snapshot(task.reweighter.teacher)
    real = task.strategy.fresh_direction

    def nan_direction(*a, **k):
        direction, loss = real(*a, **k)
        return {n: torch.full_like(v, float("nan")) for n, v in direction.items()}, loss * float("nan")

    task.strategy.fresh_direction = nan_direction
    trainer.train_step([next(itr)])
    task.strategy.fresh_direction = real
    assert task.reweighter.meta_skipped == 1 and task.reweighter.meta_steps == 1
    for k, v in task.reweighter.teacher.named_parameters():  # its input moments (finite features) may move
        assert torch.equal(v, teacher[k]), k
    assert any(not torch.equal(v, student[k]) for k, v in _snapshot(model).items())  # the student still learns
    assert all(torch.isfinite(v).all() for v in _snapshot(model).values())


# ---------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("interval", [1, 2, "refresh2-ema", "running", "prior-reference", "contrast-once"])
def test_resume_mid_epoch_continues_exactly(tiny_data, tmp_path, interval):
    """Interrupt after 3 updates (mid-epoch) and resume: the next updates' weights and losses, and the final
    student and teacher, equal those of an uninterrupted run (teacher, its Adam state and input moments,
    the meta iterator, the averaged meta direction, the running output mean of --weight-norm running and
    fairseq's per-update seeds all come back)."""
    averaged = interval == "refresh2-ema"
    extra = ["--meta-interval", str(interval) if isinstance(interval, int) else "1",
             "--save-interval-updates", "3", "--teacher-progress-horizon", "6"] + (
        ["--meta-refresh", "2", "--meta-ema", "0.9"] if averaged else []) + (
        ["--weight-norm", interval] if str(interval).startswith("running") else []) + (
        ["--teacher-inputs", "states,token_stats,source_contrast,progress", "--teacher-prior", "source_contrast",
         "--teacher-prior-reference", "meta"] if interval in ("prior-reference", "contrast-once") else []) + (
        ["--source-contrast", "once"] if interval == "contrast-once" else [])

    def rows(path):
        return [line.split("\t") for line in path.read_text().splitlines()[1:]]

    run(train_cmd(tiny_data, tmp_path / "a", "deep", max_update=6, extra=extra + ["--dump-weights", tmp_path / "a.tsv"]))
    run(train_cmd(tiny_data, tmp_path / "b", "deep", max_update=3, extra=extra + ["--dump-weights", tmp_path / "b.tsv"]))
    with open(tmp_path / "b.tsv", "a") as f:  # a row of an update after the checkpoint, as if interrupted
        f.write("3\t0\t1\t1\n")
    out = run(train_cmd(tiny_data, tmp_path / "b", "deep", max_update=6,
                        extra=extra + ["--dump-weights", tmp_path / "b.tsv"])).stdout
    assert "restored the deep teacher" in out
    a, b = rows(tmp_path / "a.tsv"), rows(tmp_path / "b.tsv")
    assert a == b  # update, sentence id, weight, loss: every row of updates 0-5
    sa = torch.load(tmp_path / "a" / "checkpoint_last.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=True)
    assert re.search(r"epoch 001:\s+4 / \d+", out)  # the resumed run continued epoch 1 (mid-epoch)
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    ta = sa["extra_state"]["ReweightedTranslationTask"]["reweighter"]["teacher"]
    tb = sb["extra_state"]["ReweightedTranslationTask"]["reweighter"]["teacher"]
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    if str(interval).startswith("running"):
        assert int(ta["out_norm.count"].sum()) >= 6  # every update folded in
    if interval == "prior-reference":  # the meta batches' source contrast was folded in (every fresh direction)
        assert int(ta["reference.count"]) >= 3 and float(ta["reference.sq"]) > 0
    if interval == "contrast-once":  # the corpus pass at update 0 came back with the checkpoint, not recomputed
        ca = sa["extra_state"]["ReweightedTranslationTask"]["source_contrast"]
        cb = sb["extra_state"]["ReweightedTranslationTask"]["source_contrast"]
        assert torch.equal(ca["train"], cb["train"]) and int(ta["reference.count"]) == int(tb["reference.count"]) == 1
        assert "--source-contrast once: scoring" not in out
    if averaged:  # 6 meta updates, a fresh meta batch at updates 0, 2, 4 (the run was cut at 3: a reused one)
        da = sa["extra_state"]["ReweightedTranslationTask"]["meta_direction"]
        db = sb["extra_state"]["ReweightedTranslationTask"]["meta_direction"]
        assert (da["calls"], da["fresh"]) == (db["calls"], db["fresh"]) == (6, 3)
        assert da["avg"].keys() == db["avg"].keys() and all(torch.equal(da["avg"][k], db["avg"][k]) for k in da["avg"])


# ---------------------------------------------------------------------- shards that do not divide evenly
ODD = ["--max-tokens", "500", "--meta-max-tokens", "400"]  # 15 train batches, 3 meta batches (odd_data)


def _num_batches(data, split, max_tokens, multiple):
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    task = TranslationTask.setup_task(TranslationConfig(data=str(data), source_lang="src", target_lang="tgt",
                                                        dataset_impl="mmap"))
    task.load_dataset(split)
    return len(task.get_batch_iterator(task.dataset(split), max_tokens=max_tokens, seed=1,
                                       required_batch_size_multiple=multiple, disable_iterator_cache=True))


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    """1,000 short training pairs whose batches do not divide over 2 workers: every epoch ends with a padding
    batch (fairseq's train_step with ignore_grad=True) on one worker, and the meta split's too."""
    from conftest import make_corpus, preprocess

    root = tmp_path_factory.mktemp("odd")
    make_corpus(root / "raw", n_train=1000, n_meta=100)
    data = preprocess(root / "raw", root / "bin")
    # the premise of the tests below: train (fairseq's default --required-batch-size-multiple 8) and meta
    # (the task's meta iterator) batch counts are odd
    assert _num_batches(data, "train", 500, 8) == 15 and _num_batches(data, "meta", 400, 1) == 3
    return data


DDP_CASES = {
    "none": ("none", []),
    "l2rw": ("l2rw", []),
    "mwnet": ("mwnet", []),
    "deep": ("deep", []),
    "deep-interval2": ("deep", ["--meta-interval", "2"]),
    "deep-refresh-ema": ("deep", ["--meta-refresh", "4", "--meta-ema", "0.9"]),
    "deep-update-freq2": ("deep", ["--update-freq", "2"]),
    "deep-recipe": ("deep", ["--teacher-inputs", "states,token_stats,source_contrast,progress", "--max-weight", "2", "--meta-precondition", "adam"]),
    "deep-tuned-defaults": ("deep", ["--reweight-recipe", "tuned"]),  # warm-up, contrast, refresh/EMA, cap, adam
    "deep-drop-below": ("deep", ["--teacher-lr", "0.05", "--drop-below", "0.5"]),  # epochs shrink, masks all-reduced
    "deep-prior-reference": ("deep", ["--reweight-recipe", "tuned", "--teacher-prior-reference", "meta"]),
}


@pytest.mark.parametrize("case", list(DDP_CASES))
def test_ddp_survives_epochs_that_do_not_divide_over_the_workers(odd_data, tmp_path, case):
    """2 gloo workers, 8 updates per epoch (the last with a padding batch on one worker), meta batches that do
    not divide either: training reaches --max-update across two epoch boundaries, and the teacher is checked
    identical on both workers after every meta update (a mismatch stops the run)."""
    method, extra = DDP_CASES[case]
    max_update = 10 if "--update-freq" in extra else 20  # 4 or 8 updates per epoch: epochs 1, 2 and part of 3
    p = run_ddp(train_cmd(odd_data, tmp_path / "run", method, max_update=max_update, extra=ODD + extra), check=False)
    assert p.returncode == 0, p.stdout[-5000:]
    assert "done training" in p.stdout and "end of epoch 2 " in p.stdout, p.stdout[-3000:]
    assert f"num_updates={max_update}" in p.stdout or f"num_updates {max_update}" in p.stdout
    if method in ("mwnet", "deep"):
        assert "teacher identical on all 2 workers" in p.stdout
        rw = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)["extra_state"][
            "ReweightedTranslationTask"]["reweighter"]
        interval = 2 if "--meta-interval" in extra else 1
        warmup = round(max_update / 3) if "tuned" in extra else 0  # the tuned recipe's plain first third
        assert rw["meta_steps"] == (max_update - warmup) // interval
    if "--drop-below" in extra:  # sentences were left out, the same on both workers (else the batches differ and
        left = [int(n) for n in re.findall(r"epoch \d+ leaves out (\d+) of", p.stdout)]  # the run hangs or fails)
        assert max(left) > 0, left


def test_ddp_source_contrast_once_equals_one_process_pass(odd_data, tmp_path):
    """--source-contrast once, 2 workers: each scores its share of the pass's batches (their number does not divide
    over the workers), one all-reduce joins them; the values every pair gets equal one process's pass with the same
    student (the checkpoint of the update reweighting starts at, and of the refresh 7 updates later for the pairs
    --drop-below has not left out by then), and training goes on across two epoch ends."""
    from fairseq import checkpoint_utils

    import fairseq_reweight.task  # noqa: F401  (registers the task)
    from fairseq_reweight.contrast import contrast_batches, split_contrast
    from fairseq_reweight.criterion import ReweightedLabelSmoothedCrossEntropyCriterion

    # --meta-max-tokens 300: 3 meta batches in the pass (at ODD's 400 the pass joins the third, a single pair, to
    # the second: 2 batches, which divide)
    extra = ODD + ["--reweight-recipe", "tuned", "--source-contrast", "once", "--reweight-warmup", "7",
                   "--source-contrast-refresh", "7", "--drop-below", "0.9", "--save-interval-updates", "7",
                   "--keep-interval-updates", "5",
                   "--meta-max-tokens", "300"]
    p = run_ddp(train_cmd(odd_data, tmp_path / "run", "deep", max_update=20, extra=extra), check=False)
    assert p.returncode == 0, p.stdout[-5000:]
    assert "done training" in p.stdout and "end of epoch 2 " in p.stdout and "teacher identical on all 2" in p.stdout
    assert "again at update 14" in p.stdout
    saved = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)["extra_state"][
        "ReweightedTranslationTask"]["source_contrast"]
    assert (saved["built_at"], saved["passes"]) == (14, 2)
    at14 = next((tmp_path / "run").glob("checkpoint_*_14.pt"))
    skip = torch.load(at14, weights_only=True)["extra_state"]["ReweightedTranslationTask"]["drop"]["dropped"]
    assert 0 < int(skip.sum()) < len(skip), "nothing left out before the refresh: the test does not exercise it"
    for ck, kept in ((tmp_path / "run" / "checkpoint_1_7.pt", skip), (at14, ~skip)):
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(ck)])
        model, crit = models[0].eval(), ReweightedLabelSmoothedCrossEntropyCriterion(task, False, 0.0)
        task.load_dataset("train")
        assert len(contrast_batches(task, model, task._meta_dataset(), 300)) == 3  # the premise: the shares differ
        expected = split_contrast(task, model, crit, task.dataset("train"), max_tokens=500, parts=True,
                                  skip=None if kept is skip else skip.numpy())
        assert (expected[kept] != 0).float().mean() > 0.9
        assert torch.allclose(saved["train"][kept], expected[kept], rtol=0, atol=1e-5), \
            (str(ck), float((saved["train"][kept] - expected[kept]).abs().max()))
    expected = split_contrast(task, model, crit, task._meta_dataset(), max_tokens=300, parts=True)  # at14's
    assert (expected != 0).float().mean() > 0.9
    assert torch.allclose(saved["meta"], expected, rtol=0, atol=1e-5), float((saved["meta"] - expected).abs().max())


def test_ddp_none_on_uneven_shards_equals_one_process(odd_data, tmp_path):
    """The padding batch adds nothing: 2 workers on 15 batches an epoch == 1 worker with --update-freq 2
    (whose last update of an epoch has one batch too), across epoch boundaries."""
    extra = ODD + ["--dropout", "0.0"]
    run_ddp(train_cmd(odd_data, tmp_path / "ddp", "none", max_update=18, extra=extra))
    run(train_cmd(odd_data, tmp_path / "one", "none", max_update=18, extra=extra + ["--update-freq", "2"]))
    a, b = params(tmp_path / "ddp" / "checkpoint_last.pt"), params(tmp_path / "one" / "checkpoint_last.pt")
    # 18 Adam steps of lr 3e-3 amplify the rounding of the two summation orders to ~5e-5 at most (measured);
    # a padding batch that counted, or a batch missing, moves parameters by ~lr per step
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=3e-4), k
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 3e-4


POISON_PLUGIN = '''
import os
import torch
import fairseq_reweight  # registers the task and criterion
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterionConfig
from fairseq_reweight.criterion import ReweightedLabelSmoothedCrossEntropyCriterion


@register_criterion("poisoned_reweighted_label_smoothed_cross_entropy", dataclass=LabelSmoothedCrossEntropyCriterionConfig)
class Poisoned(ReweightedLabelSmoothedCrossEntropyCriterion):
    """One NaN sentence loss on worker 1 at every third training forward."""
    calls = 0

    def per_sentence(self, model, sample, layers=None):
        out = super().per_sentence(model, sample, layers)
        if model.training and layers is not None and torch.distributed.get_rank() == 1:  # a training batch
            Poisoned.calls += 1
            if Poisoned.calls % 3 == 0:
                return out._replace(loss=out.loss.index_fill(0, torch.tensor([0]), float("nan")))
        return out
'''


def test_ddp_nan_loss_on_one_worker_keeps_the_workers_in_step(odd_data, tmp_path):
    """A NaN sentence loss on worker 1 only: that batch is skipped there (it still runs a backward of zero, so
    the gradient all-reduces match), the other worker's batch trains, and the teachers stay identical."""
    plugin = tmp_path / "poison_plugin"
    plugin.mkdir()
    (plugin / "__init__.py").write_text(POISON_PLUGIN)
    cmd = train_cmd(odd_data, tmp_path / "run", "deep", max_update=12, extra=ODD)
    cmd[cmd.index("--user-dir") + 1] = plugin
    cmd[cmd.index("--criterion") + 1] = "poisoned_reweighted_label_smoothed_cross_entropy"
    p = run_ddp(cmd, check=False)
    assert p.returncode == 0, p.stdout[-5000:]
    assert "NaN/inf" in p.stdout and "teacher identical on all 2 workers" in p.stdout and "done training" in p.stdout
    assert re.search(r"nonfinite=[1-9]", p.stdout), p.stdout[-3000:]


def test_shared_warmup_equals_reweight_warmup_from_scratch(tiny_data, tmp_path):
    """The benchmark's shared warm-up: plain training for N updates, then a deep run continuing from that
    checkpoint (--continue-once) ends with the same student and teacher as one deep run with
    --reweight-warmup N from scratch (same per-update seeds, data order, optimizer and lr schedule)."""
    recipe = ["--teacher-inputs", "states,token_stats,source_contrast,progress", "--meta-refresh", "2", "--meta-ema", "0.9", "--max-weight", "2",
              "--meta-precondition", "adam", "--teacher-progress-horizon", "7"]
    run(train_cmd(tiny_data, tmp_path / "scratch", "deep", max_update=7,
                  extra=recipe + ["--reweight-warmup", "3", "--dump-weights", tmp_path / "a.tsv"]))
    run(train_cmd(tiny_data, tmp_path / "warmup", "none", max_update=3))
    out = run(train_cmd(tiny_data, tmp_path / "cont", "deep", max_update=7,
                        extra=recipe + ["--continue-once", tmp_path / "warmup" / "checkpoint_last.pt",
                                        "--dump-weights", tmp_path / "b.tsv"])).stdout
    assert "teacher initialised fresh" in out
    a = [r for r in (tmp_path / "a.tsv").read_text().splitlines()[1:] if int(r.split("\t")[0]) >= 3]
    b = (tmp_path / "b.tsv").read_text().splitlines()[1:]
    assert a == b and len(a) > 0  # every reweighted sentence's weight and loss, updates 3-6
    sa = torch.load(tmp_path / "scratch" / "checkpoint_last.pt", weights_only=True)
    sb = torch.load(tmp_path / "cont" / "checkpoint_last.pt", weights_only=True)
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    ta = sa["extra_state"]["ReweightedTranslationTask"]["reweighter"]
    tb = sb["extra_state"]["ReweightedTranslationTask"]["reweighter"]
    assert ta["meta_steps"] == tb["meta_steps"] == 4
    for k in ta["teacher"]:
        assert torch.equal(ta["teacher"][k], tb["teacher"][k]), k
