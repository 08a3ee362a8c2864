"""Meta-gradient through a real fairseq transformer: fast vs exact vs finite differences."""

import fairseq.utils
import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from conftest import ARCHS, USER_DIR
from fairseq_reweight.core import capture_rng, weight_gradient
from fairseq_reweight.task import _Student


def build(data, method="deep", arch="transformer", extra=()):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data), "--user-dir", USER_DIR, "--task", "reweighted_translation",
        "--criterion", "reweighted_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--reweight-method", method, "--batch-size", "8", "--meta-lr", "0.5", "--cpu", *ARCHS[arch], *extra])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def first_batch(task, split, model):
    task.load_dataset(split)
    itr = task.get_batch_iterator(task.dataset(split), max_sentences=8, max_positions=model.max_positions(),
                                  seed=1).next_epoch_itr(shuffle=False)
    return next(itr)


def setup(data, dtype, dropout):
    torch.manual_seed(0)
    cfg, task, model, criterion = build(data, extra=("--dropout", str(dropout)))
    model = model.to(dtype)
    model.train()
    sample = first_batch(task, "train", model)
    out = criterion.per_sentence(model, sample)  # forward with graph, as train_step does
    return task, model, criterion, sample, out


def test_task_meta_grad_fn_fast_matches_exact(tiny_data):
    """The glue (`_meta_grad_fn`) in float32 with dropout, the way users run it."""
    results = {}
    for mode in ("exact", "fast"):
        torch.manual_seed(0)
        cfg, task, model, criterion = build(tiny_data, extra=("--dropout", "0.2", "--meta-grad", mode))
        model.train()
        sample = first_batch(task, "train", model)
        rng = capture_rng(torch.device("cpu"))
        out = criterion.per_sentence(model, sample)
        task._meta_dataset()
        fn = task._meta_grad_fn(model, criterion, sample, out, None, rng, torch.device("cpu"))
        w = torch.linspace(0.5, 1.5, out.loss.numel())
        results[mode] = fn(w).grad_w
    exact, fast = results["exact"], results["fast"]
    assert exact.abs().max() > 0
    cos = torch.nn.functional.cosine_similarity(exact, fast, dim=0)
    rel = (fast - exact).norm() / exact.norm()
    assert cos >= 0.99, cos
    assert rel <= 0.05, rel


def test_exact_matches_finite_difference_float64(tiny_data, monkeypatch):
    # fairseq computes log-softmax in float32 whatever the model's dtype; keep float64 end to end
    monkeypatch.setattr(fairseq.utils, "log_softmax", lambda x, dim, onnx_trace=False: x.log_softmax(dim))
    monkeypatch.setattr(fairseq.utils, "softmax", lambda x, dim, onnx_trace=False: x.softmax(dim))
    task, model, criterion, sample, out = setup(tiny_data, torch.float64, dropout=0.0)
    student = _Student(model, criterion)
    meta_sample = first_batch(task, "meta", model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    lr, denom = 0.5, float(sample["ntokens"])

    def train_losses(p):
        return torch.func.functional_call(student, {"model." + k: v for k, v in p.items()}, (sample,))

    def meta_loss(p):
        return torch.func.functional_call(student, {"model." + k: v for k, v in p.items()}, (meta_sample, True))

    def meta_at(w):  # L_meta(theta'(w)), written out independently of weight_gradient
        g = torch.autograd.grad((w * train_losses(params)).sum() / denom, [params[n] for n in names],
                                allow_unused=True)
        ahead = {n: params[n] if gi is None else params[n] - lr * gi for n, gi in zip(names, g)}
        with torch.no_grad():
            return meta_loss(ahead).item()

    w = torch.linspace(0.6, 1.4, out.loss.numel(), dtype=torch.float64)
    exact = weight_gradient(params, train_losses, meta_loss, w, lr, denom, mode="exact", losses=out.loss).grad_w
    h = 1e-5
    fd = torch.zeros_like(w)
    for i in range(len(w)):
        e = torch.zeros_like(w)
        e[i] = h
        fd[i] = (meta_at(w + e) - meta_at(w - e)) / (2 * h)
    rel = (exact - fd).norm() / fd.norm()
    assert fd.abs().max() > 1e-8
    assert rel <= 1e-3, (rel, exact, fd)
    fast = weight_gradient(params, train_losses, meta_loss, w, lr, denom, mode="fast", fd_eps=1e-4).grad_w
    assert (fast - exact).norm() / exact.norm() <= 1e-3


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_teacher_states_for_any_decoder(tiny_data, arch):
    cfg, task, model, criterion = build(tiny_data, arch=arch)
    task.load_dataset("train")
    ds = task.dataset("train")
    sample = ds.collater([ds[i] for i in range(8)])  # mixed lengths, so targets are padded
    n = criterion.num_decoder_layers(model, sample)
    assert n == (2 if arch == "transformer" else 1)
    out = criterion.per_sentence(model, sample, layers=list(range(n)))
    assert len(out.states) == n and out.states[-1].shape == (sample["target"].size(0), 32)
    assert not any(s.requires_grad for s in out.states)
    # mean-pooling over non-pad target positions only: recompute the last layer by hand
    enc = model.encoder(sample["net_input"]["src_tokens"], src_lengths=sample["net_input"]["src_lengths"])
    feats, _ = model.decoder.extract_features(sample["net_input"]["prev_output_tokens"], encoder_out=enc)
    mask = sample["target"].ne(task.tgt_dict.pad())
    i = int(mask.sum(1).argmin())  # the shortest sentence has padding
    assert mask[i].sum() < mask.shape[1]
    torch.manual_seed(0)
    model.eval()
    out = criterion.per_sentence(model, sample, layers=[n - 1])
    enc = model.encoder(sample["net_input"]["src_tokens"], src_lengths=sample["net_input"]["src_lengths"])
    feats, _ = model.decoder.extract_features(sample["net_input"]["prev_output_tokens"], encoder_out=enc)
    assert torch.allclose(out.states[0][i], feats[i][mask[i]].mean(0), atol=1e-5)
    # per-sentence losses add up to fairseq's own label-smoothed loss
    loss, _, _ = criterion(model, sample)
    assert torch.allclose(out.loss.sum(), loss, rtol=1e-5)


def test_meta_iterator_position_survives_state_dict(tiny_data):
    cfg, task, model, criterion = build(tiny_data, extra=("--meta-batch-size", "16"))
    cpu = torch.device("cpu")
    for _ in range(5):  # 60 meta pairs / 16 per batch: this crosses a meta epoch
        task._next_meta_batch(model, cpu)
    state = task.state_dict()
    expected = [task._next_meta_batch(model, cpu)["id"].tolist() for _ in range(3)]
    _, task2, _, _ = build(tiny_data, extra=("--meta-batch-size", "16"))
    task2.load_state_dict(state)
    got = [task2._next_meta_batch(model, cpu)["id"].tolist() for _ in range(3)]
    assert got == expected
    assert state["meta_iterator"]["epoch"] >= 2
