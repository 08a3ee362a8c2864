"""End to end through fairseq's real command-line tools on a tiny generated corpus."""

import re

import pytest
import torch

from conftest import BIN, USER_DIR, run, train_cmd

FLOAT = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def inner_logs(text, key):
    return [float(m) for m in re.findall(rf"\| train_inner \|.* {key}=({FLOAT})", text)]


def load(path):
    # weights_only=True (torch's default): the plugin's allow-list must make fairseq checkpoints load
    import fairseq_reweight.compat  # noqa: F401

    return torch.load(path, map_location="cpu")


def test_none_reproduces_plain_fairseq(tiny_data, tmp_path):
    common = ["--dropout", "0.3"]
    plain = train_cmd(tiny_data, tmp_path / "plain", method="none", max_update=8, extra=common)
    i = plain.index("--task")
    plain[i + 1] = "translation"
    plain[plain.index("--criterion") + 1] = "label_smoothed_cross_entropy"
    for flag in ("--user-dir", "--reweight-method"):  # plain fairseq knows neither
        j = plain.index(flag)
        del plain[j:j + 2]
    ours = train_cmd(tiny_data, tmp_path / "ours", method="none", max_update=8, extra=common)
    a, b = run(plain).stdout, run(ours).stdout
    la, lb = inner_logs(a, "loss"), inner_logs(b, "loss")
    assert len(la) == len(lb) == 8
    assert la == pytest.approx(lb, abs=2e-3)  # logged with 3 decimals
    ma, mb = load(tmp_path / "plain/checkpoint_last.pt")["model"], load(tmp_path / "ours/checkpoint_last.pt")["model"]
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.allclose(ma[k], mb[k], rtol=1e-4, atol=1e-6), k
    # and training did move the parameters (the comparison is not between two untouched inits)
    run(train_cmd(tiny_data, tmp_path / "one", method="none", max_update=1, extra=common))
    m1 = load(tmp_path / "one/checkpoint_last.pt")["model"]
    moved = sum(not torch.allclose(m1[k], mb[k]) for k in mb)
    assert moved > len(mb) // 2


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
@pytest.mark.parametrize("method", ["none", "l2rw", "mwnet", "deep"])
def test_train_resume_generate(tiny_data, tmp_path, method, arch):
    save = tmp_path / "ck"
    extra = ["--dump-weights", tmp_path / "w.tsv"]
    if method == "deep" and arch == "transformer":
        extra += ["--teacher-states", "all", "--meta-grad", "exact"]
    elif method == "deep":  # the optional inputs, through another architecture's reorder_encoder_out
        extra += ["--teacher-inputs", "states,token_stats,length_ratio,source_contrast,progress"]
    elif method == "l2rw":  # l2rw's raw weights are heavy-tailed: the cap binds
        extra += ["--max-weight", "1.5"]
    elif method == "mwnet" and arch == "transformer":  # the meta direction along Adam's step, across a resume
        extra += ["--meta-precondition", "adam"]
    p = run(train_cmd(tiny_data, save, method, arch, max_update=4, extra=extra))
    assert "done training" in p.stdout
    state = load(save / "checkpoint_last.pt")
    task_state = state["task_state"]
    rw = task_state["reweighter"]
    if method in ("mwnet", "deep"):
        assert rw["method"] == method and rw["meta_steps"] == 4
        teacher_before = {k: v.clone() for k, v in rw["teacher"].items()}
        assert "meta_loss=" in p.stdout and "w_std=" in p.stdout
    elif method == "l2rw":
        assert rw == {} and "meta_loss=" in p.stdout
    else:
        assert rw == {} and "meta_loss=" not in p.stdout
    rows = (tmp_path / "w.tsv").read_text().splitlines()
    assert rows[0] == "update\tid\tweight\tloss" and len(rows) > 4
    if method == "l2rw":
        w = [float(r.split("\t")[2]) for r in rows[1:]]
        assert max(w) == pytest.approx(1.5, abs=1e-4), "--max-weight 1.5 should bind on l2rw's weights"

    # resume from checkpoint_last.pt: the teacher comes back and keeps learning
    p = run(train_cmd(tiny_data, save, method, arch, max_update=7, extra=extra))
    assert "Loaded checkpoint" in p.stdout
    resumed = load(save / "checkpoint_last.pt")["task_state"]["reweighter"]
    if method in ("mwnet", "deep"):
        assert f"restored the {method} teacher from the checkpoint (4 meta updates so far)" in p.stdout
        assert "teacher initialised fresh" not in p.stdout
        assert resumed["meta_steps"] == 7
        assert any(not torch.equal(teacher_before[k], resumed["teacher"][k]) for k in teacher_before)
        assert "meta_iterator" in load(save / "checkpoint_last.pt")["task_state"]

    if method == "deep":  # generation from a reweighted checkpoint through the real CLI
        g = run([BIN / "fairseq-generate", tiny_data, "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
                 "--beam", "2", "--max-tokens", "400", "--cpu", "--gen-subset", "test"])
        assert "Translated 40 sentences" in g.stdout


def test_checkpoints_need_the_plugin_allow_list(tiny_data, tmp_path):
    """Without the plugin's allow-list torch 2.6+ refuses fairseq checkpoints; with it they load."""
    save = tmp_path / "ck"
    run(train_cmd(tiny_data, save, "none", max_update=1))
    code = "import torch,sys; torch.load(sys.argv[1], map_location='cpu'); print('LOADED')"
    bare = run([BIN / "python", "-c", code, save / "checkpoint_last.pt"], check=False)
    assert bare.returncode != 0 and "weights_only" in bare.stdout
    ok = run([BIN / "python", "-c", "import fairseq_reweight.compat;" + code, save / "checkpoint_last.pt"])
    assert "LOADED" in ok.stdout


def test_finetune_plain_translation_checkpoint(tiny_data, tmp_path):
    plain = train_cmd(tiny_data, tmp_path / "plain", "none", max_update=2)
    plain[plain.index("--task") + 1] = "translation"
    plain[plain.index("--criterion") + 1] = "label_smoothed_cross_entropy"
    for flag in ("--user-dir", "--reweight-method"):
        j = plain.index(flag)
        del plain[j:j + 2]
    run(plain)
    p = run(train_cmd(tiny_data, tmp_path / "ft", "deep", max_update=4,
                      extra=["--finetune-from-model", tmp_path / "plain/checkpoint_last.pt"]))
    assert "Loaded checkpoint" in p.stdout and "teacher initialised fresh" in p.stdout


@pytest.mark.parametrize("extra,message", [
    (["--meta-subset", "nosuch"], "needs a clean meta split 'nosuch'"),
    (["--reweight-method", "l2rw", "--teacher-lr", "0.1"], "--teacher-lr has no effect"),
    (["--teacher-states", "5"], "exposes decoder layers 1..2"),
    (["--reweight-method", "mwnet", "--teacher-inputs", "loss,length_ratio"], "mwnet keeps its published form"),
    (["--teacher-inputs", "states,nosuch"], "unknown input(s) nosuch; choose from states"),
    (["--teacher-prior", "progress"], "--teacher-prior progress: the deep teacher's prior must be one of its standardised"),
    (["--teacher-prior", "none", "--teacher-prior-reference", "meta"], "--teacher-prior-reference meta standardises"),
    (["--teacher-source-contrast"], "--teacher-source-contrast was replaced by --teacher-inputs: name source_contrast"),
    (["--meta-params", "attention"], "--meta-params 'attention': use auto, or a comma-separated list"),
    (["--meta-grad", "fd", "--meta-ema", "0.9"], "--meta-refresh/--meta-ema reuse and average the meta direction"),
    (["--reweight-method", "none", "--max-weight", "2"], "--max-weight caps the weights of a reweighting method"),
    (["--max-weight", "1"], "--max-weight must be > 1"),
    (["--reweight-method", "l2rw", "--weight-norm", "running"], "--weight-norm running divides a teacher's outputs"),
])
def test_clear_errors(tiny_data, tmp_path, extra, message):
    cmd = train_cmd(tiny_data, tmp_path / "ck", "deep", max_update=2)
    if "--reweight-method" in extra:
        i = cmd.index("--reweight-method")
        del cmd[i:i + 2]
    p = run(cmd + extra, check=False)
    assert p.returncode != 0
    assert message in p.stdout, p.stdout[-2000:]
    assert "begin training epoch" not in p.stdout, "the error should fire at start-up, before any training"



def test_deep_defaults_run_the_tuned_recipe(tiny_data, tmp_path):
    """`--reweight-method deep` with nothing else runs the tuned recipe (logged; a third of the updates plain);
    with a student optimizer that has no Adam moments its Adam preconditioning falls back to none, while an
    explicit --meta-precondition adam stays an error there."""
    p = run(train_cmd(tiny_data, tmp_path / "tuned", "deep", max_update=6, extra=["--reweight-recipe", "tuned"]))
    assert ("--reweight-recipe tuned: meta_refresh=4, meta_ema=0.9, max_weight=2.0, meta_precondition=adam, "
            "teacher_inputs=states,token_stats,source_contrast,progress, teacher_lr=") in p.stdout
    assert ("teacher_prior_scale=4.0, weight_norm=running, reweight_warmup=2, teacher_prior=source_contrast, "
            "teacher_prior_reference=meta, drop_below=0.25, source_contrast=once") in p.stdout
    rw = load(tmp_path / "tuned" / "checkpoint_last.pt")["task_state"]["reweighter"]
    assert rw["meta_steps"] == 4 and rw["in_dim"] == 32 + 6  # decoder states + 4 stats + contrast + progress
    assert "prior_scale" in rw["teacher"]  # the teacher starts from source contrast
    assert int(rw["teacher"]["out_norm.count"]) == 4  # weights divided by the running mean output
    assert int(rw["teacher"]["reference.count"]) >= 1  # the prior standardised by the meta set's source contrast (the pass)
    sgd = ["--reweight-recipe", "tuned", "--optimizer", "sgd"]
    p = run(train_cmd(tiny_data, tmp_path / "sgd", "deep", max_update=4, extra=sgd))
    assert "is not Adam-type, so the meta direction is not preconditioned" in p.stdout
    p = run(train_cmd(tiny_data, tmp_path / "sgd2", "deep", max_update=4, extra=sgd + ["--meta-precondition", "adam"]),
            check=False)
    assert p.returncode != 0 and "needs an Adam-type student optimizer" in p.stdout
