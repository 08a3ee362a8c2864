"""Meta-gradient through a real fairseq transformer: fast and fd vs exact vs finite differences."""

import fairseq.utils
import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from conftest import ARCHS, USER_DIR
from fairseq_reweight.core import capture_rng, first_order, weight_gradient
from fairseq_reweight.core.strategies.lookahead import replayed
from fairseq_reweight.criterion import num_decoder_layers
from fairseq_reweight.task import _Student


def build(data, method="deep", arch="transformer", extra=()):
    # --meta-lr: the look-ahead step of fd/exact (refused with fast, where it cancels)
    lookahead = ("--meta-lr", "0.5") if ("fd" in extra or "exact" in extra) else ()
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data), "--user-dir", USER_DIR, "--task", "reweighted_translation",
        "--criterion", "reweighted_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--reweight-method", method, "--batch-size", "8", *lookahead, "--cpu", *ARCHS[arch],
        *(() if "--reweight-recipe" in extra else ("--reweight-recipe", "paper")), *extra])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def probe_of(task, model):
    task._model = model  # the student the strategy's probes watch (train_step sets it)
    return task.strategy.probe


def fresh_direction(task, model, criterion):
    """The strategy's fresh meta direction of the task's next meta batch (what a meta update computes)."""
    probe_of(task, model)
    return task.strategy.fresh_direction(list(model.parameters()),
                                         lambda: task._meta_loss(model, criterion, torch.device("cpu")))


def first_order_of(task, probe, lr, denom, b, weights=None):
    return first_order(probe, *task.strategy.direction, lr, denom, b, weights)


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


def test_task_meta_grad_fn_fd_matches_exact(tiny_data):
    """The glue (`_meta_grad_fn`) in float32 with dropout, the way users run it."""
    results = {}
    for mode in ("exact", "fd"):
        torch.manual_seed(0)
        cfg, task, model, criterion = build(tiny_data, extra=("--dropout", "0.2", "--meta-grad", mode))
        model.train()
        sample = first_batch(task, "train", model)
        rng = capture_rng(torch.device("cpu"))
        out = criterion.per_sentence(model, sample)
        task._meta_dataset()
        fn = replayed(task._lookahead(model, criterion, sample, torch.device("cpu")), out.loss, task.cfg.meta_lr,
                      float(sample["ntokens"]), mode, task.cfg.meta_fd_eps, rng)
        w = torch.linspace(0.5, 1.5, out.loss.numel())
        results[mode] = fn(w).grad_w
    exact, fast = results["exact"], results["fd"]
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
    fast = weight_gradient(params, train_losses, meta_loss, w, lr, denom, mode="fd", fd_eps=1e-4).grad_w
    assert (fast - exact).norm() / exact.norm() <= 1e-3


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_teacher_states_for_any_decoder(tiny_data, arch):
    cfg, task, model, criterion = build(tiny_data, arch=arch)
    task.load_dataset("train")
    ds = task.dataset("train")
    sample = ds.collater([ds[i] for i in range(8)])  # mixed lengths, so targets are padded
    n = num_decoder_layers(model, sample)
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


# ---------------------------------------------------------------------- --meta-grad fast (probe.py)
def _float64_softmax(monkeypatch):
    monkeypatch.setattr(fairseq.utils, "log_softmax", lambda x, dim, onnx_trace=False: x.log_softmax(dim))
    monkeypatch.setattr(fairseq.utils, "softmax", lambda x, dim, onnx_trace=False: x.softmax(dim))


def _fast_setup(data, meta_params, arch="transformer", extra=()):
    torch.manual_seed(0)
    cfg, task, model, criterion = build(data, arch=arch, extra=("--dropout", "0.0", "--meta-params", meta_params,
                                                               *extra))
    model = model.double()
    model.train()
    sample = first_batch(task, "train", model)
    task._meta_dataset()
    task.strategy.direction = fresh_direction(task, model, criterion)
    return task, model, criterion, sample


@pytest.mark.parametrize("arch,meta_params", [("transformer", "ffn"), ("transformer", "embed,ffn,output"),
                                              ("transformer", "auto"), ("transformer", "encoder,decoder"),
                                              ("lstm", "auto"), ("tied", "embed,encoder"), ("tied", "embed"),
                                              ("tied", "embed,output")])
def test_fast_probe_inner_products_are_exact(tiny_data, tied_data, monkeypatch, arch, meta_params):
    """The probe's per-sentence <grad L_meta, grad l_i> on the probed layers equals the same inner
    product from per-sentence autograd, both from a partial backward (l2rw) and from the weighted
    backward divided by the weights (mwnet/deep); its meta gradient equals autograd's. ``tied``:
    --share-all-embeddings, one embedding module under two names tied to the output projection: `embed`
    is the whole tied parameter (lookups on both sides and the output projection), each use counted once."""
    _float64_softmax(monkeypatch)
    tied = arch == "tied"
    task, model, criterion, sample = _fast_setup(tied_data if tied else tiny_data, meta_params,
                                                 "transformer" if tied else arch,
                                                 ("--share-all-embeddings",) if tied else ())
    if tied:
        assert model.encoder.embed_tokens is model.decoder.embed_tokens
        assert model.decoder.output_projection.weight is model.decoder.embed_tokens.weight
    probe = probe_of(task, model)
    named = probe.parameters()
    params = list(named.values())
    assert len(params) >= (1 if (tied and "encoder" not in meta_params) else 2)  # tied: embed = output
    if arch == "transformer" and meta_params == "auto":  # the default: every encoder layer's FFN
        assert {n.rsplit(".", 1)[0] for n in named} == {f"encoder.layers.{i}.{fc}" for i in range(2)
                                                          for fc in ("fc1", "fc2")}, list(named)
    direction, _ = task.strategy.direction

    # reference per-sentence inner products
    out = criterion.per_sentence(model, sample)
    flat_v = [direction[n] for n in named]
    ref = torch.stack([
        sum((g * v).sum() for g, v in zip(torch.autograd.grad(out.loss[i], params, retain_graph=True), flat_v))
        for i in range(out.loss.numel())])
    assert ref.abs().max() > 0
    lr, denom, b = 0.5, 10.0, out.loss.numel()

    with probe.watch():
        out = criterion.per_sentence(model, sample)
    probe.output_grads(out.loss.sum())
    got = first_order_of(task, probe, lr, denom, b).grad_w
    assert torch.allclose(got, -lr / denom * ref, rtol=1e-9, atol=1e-12)

    w = torch.linspace(0.2, 1.8, b, dtype=torch.float64)
    with probe.watch(capture_grads=True):
        out = criterion.per_sentence(model, sample)
    (w * out.loss).sum().backward()
    got = first_order_of(task, probe, lr, denom, b, weights=w).grad_w
    assert torch.allclose(got, -lr / denom * ref, rtol=1e-9, atol=1e-12)

    # what the training pass does: the products reduced during the backward, no gradient or output kept
    with probe.watch(capture_grads=True, dots=direction):
        out = criterion.per_sentence(model, sample)
    (w * out.loss).sum().backward()
    assert all(c.grad is None and c.out is None and c.inp is None for c in probe.calls)
    got = first_order_of(task, probe, lr, denom, b, weights=w).grad_w
    assert torch.allclose(got, -lr / denom * ref, rtol=1e-9, atol=1e-12)


def test_fast_meta_direction_is_the_meta_loss_gradient(tiny_data, monkeypatch):
    _float64_softmax(monkeypatch)
    torch.manual_seed(0)
    cfg, task, model, criterion = build(tiny_data, extra=("--dropout", "0.0", "--meta-params", "ffn"))
    model = model.double()
    task._meta_dataset()
    state = task.state_dict()
    direction, meta_loss = fresh_direction(task, model, criterion)
    task.load_state_dict(state)  # replay the same meta batch
    meta_sample = task._next_meta_batch(model, torch.device("cpu"))
    out = criterion.per_sentence(model, meta_sample)
    lm = out.nll.sum() / out.mask.sum()
    probe = probe_of(task, model)
    grads = torch.autograd.grad(lm, list(probe.parameters().values()))
    mine = [direction[n] for n in probe.parameters()]
    assert torch.allclose(lm, meta_loss)
    for g, m in zip(grads, mine):
        assert torch.allclose(g, m, rtol=1e-9, atol=1e-12)


def test_fast_matches_exact_on_the_probed_layers(tiny_data, monkeypatch):
    """The first-order approximation (theta' -> theta) against the exact second-order meta-gradient
    with the look-ahead on the same layers: they agree as lr -> 0 (documented bound: cos >= 0.99 at the
    lr of a real run). Against the exact meta-gradient over ALL parameters the cosine is lower; it is
    measured here and reported in the README (printed with -s)."""
    _float64_softmax(monkeypatch)
    task, model, criterion, sample = _fast_setup(tiny_data, "ffn")
    probe = probe_of(task, model)
    student = _Student(model, criterion)
    b = int(sample["target"].size(0))
    lr, denom = 1e-3, float(sample["ntokens"])
    w = torch.linspace(0.6, 1.4, b, dtype=torch.float64)
    with probe.watch(capture_grads=True):
        out = criterion.per_sentence(model, sample)
    (w * out.loss).sum().backward()
    fast = first_order_of(task, probe, lr, denom, b, weights=w).grad_w
    model.zero_grad()

    # the meta batch the fresh direction used: the first of an identically seeded meta iterator
    _, task2, _, _ = build(tiny_data)
    task2._meta_dataset()
    meta_sample = task2._next_meta_batch(model, torch.device("cpu"))

    def losses(p):
        return torch.func.functional_call(student, {"model." + k: v for k, v in p.items()}, (sample,))

    def meta(p):
        return torch.func.functional_call(student, {"model." + k: v for k, v in p.items()}, (meta_sample, True))

    probed = {n: p for n, p in model.named_parameters() if any(p is q for q in probe.parameters().values())}
    exact_probed = weight_gradient(probed, losses, meta, w, lr, denom, mode="exact").grad_w
    cos = torch.nn.functional.cosine_similarity(fast, exact_probed, dim=0)
    assert cos >= 0.99, cos
    allp = {n: p for n, p in model.named_parameters()}
    exact_all = weight_gradient(allp, losses, meta, w, lr, denom, mode="exact").grad_w
    cos_all = torch.nn.functional.cosine_similarity(fast, exact_all, dim=0)
    print(f"cosine(fast on ffn, exact on all parameters) = {cos_all:.3f}; on the probed layers {cos:.4f}")
    assert cos_all >= 0.98, cos_all  # the README quotes 0.985
    # the agreement on the probed layers is the O(lr) limit, not a look-ahead that does nothing: at a 100x larger
    # step the exact meta-gradient moves away from the first-order one by far more
    far = weight_gradient(probed, losses, meta, w, 0.1, denom, mode="exact").grad_w
    cos_far = torch.nn.functional.cosine_similarity(fast, far, dim=0)
    print(f"probed layers: 1 - cos = {1 - cos:.2e} at lr {lr}, {1 - cos_far:.2e} at lr 0.1")
    assert 1 - cos_far > 10 * (1 - cos) and 1 - cos_far > 1e-6, (cos, cos_far)


def test_teacher_length_ratio_feature(tiny_data):
    """--teacher-inputs ...,length_ratio adds log(target length / source length) before training progress."""
    feats = {}
    ratio = ("--teacher-inputs", "states,token_stats,length_ratio,progress")
    for extra in ((), ratio):
        torch.manual_seed(0)
        cfg, task, model, criterion = build(tiny_data, extra=extra)
        model.eval()
        sample = first_batch(task, "train", model)
        out = criterion.per_sentence(model, sample, task._resolve_layers(model))
        feats[extra] = task.teacher_features(out, 3, sample)
    plain, with_ratio = feats[()], feats[ratio]
    assert with_ratio.shape[1] == plain.shape[1] + 1
    tgt = sample["target"].ne(task.target_dictionary.pad()).sum(1).float()
    src = sample["net_input"]["src_lengths"].float()
    assert torch.allclose(with_ratio[:, -2], (tgt / src).log())
    assert torch.allclose(with_ratio[:, :-2], plain[:, :-1]) and torch.equal(with_ratio[:, -1], plain[:, -1])


def test_teacher_source_contrast_feature(tiny_data):
    """--teacher-inputs ...,source_contrast: the per-token NLL increase of each target when the decoder reads the
    next sentence's source, against a reference computed by hand (re-encoding the rotated sources, the
    model in eval mode), in eval and in training mode alike (the contrast has no dropout noise); the training pass's
    dropout state and the RNG stream are left alone."""
    torch.manual_seed(0)
    cfg, task, model, criterion = build(tiny_data, extra=("--teacher-inputs", "states,token_stats,source_contrast,progress", "--dropout", "0.3"))
    sample = first_batch(task, "train", model)
    pad = task.target_dictionary.pad()

    def token_nll(net_input):
        lprobs = model.get_normalized_probs(model(**net_input), log_probs=True)
        nll = -lprobs.gather(-1, sample["target"].unsqueeze(-1)).squeeze(-1)
        return (nll * sample["target"].ne(pad)).sum(1)

    model.eval()  # the reference: no dropout anywhere
    with torch.no_grad():
        ni = sample["net_input"]
        order = torch.roll(torch.arange(sample["target"].size(0)), 1)
        rotated = dict(ni, src_tokens=ni["src_tokens"][order], src_lengths=ni["src_lengths"][order])
        ntok = sample["target"].ne(pad).sum(1)
        own_nll = token_nll(ni)
        want = (token_nll(rotated) - own_nll) / ntok
    out = criterion.per_sentence(model, sample, task._resolve_layers(model))
    got = criterion.source_contrast(model, sample, out)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert want.abs().max() > 1e-3  # the sources matter to the (random) model: the check can fail

    model.train()  # in training: dropout in the training pass, none in the contrast; RNG untouched
    out = criterion.per_sentence(model, sample, task._resolve_layers(model))
    assert not torch.allclose(out.nll, own_nll, atol=1e-3)  # the training pass has dropout
    state = torch.get_rng_state()
    got = criterion.source_contrast(model, sample, out)
    assert torch.allclose(got, want, atol=1e-5), (got, want)  # dropout in `out` does not reach the contrast
    assert torch.equal(state, torch.get_rng_state()) and model.training and model.decoder.training
    feats = task.teacher_features(out, 3, sample, got)
    assert torch.equal(feats[:, -2], got.float())  # just before training progress
    with pytest.raises(ValueError, match="needs criterion.source_contrast"):
        task.teacher_features(out, 3, sample)



def test_fast_adam_preconditioned_matches_the_exact_adam_lookahead(tiny_data, monkeypatch):
    """--meta-precondition adam through train_step: before fairseq's Adam has stepped the direction is the raw
    meta gradient; after two steps it is that gradient over sqrt(v_hat) + eps, with v_hat from the
    second-moment recurrence by hand (eps as fairseq's Adam applies it, tested against its real step in
    test_core.py); and the fast meta-gradient with it matches the exact second-order
    meta-gradient through the look-ahead theta' = theta - lr P grad (Adam's step) on the probed layers."""
    from fairseq import optim

    _float64_softmax(monkeypatch)
    torch.manual_seed(0)
    betas, eps = (0.9, 0.98), 1e-8
    cfg, task, model, criterion = build(tiny_data, method="l2rw", extra=(
        "--dropout", "0.0", "--meta-params", "ffn", "--meta-precondition", "adam", "--optimizer", "adam",
        "--adam-betas", str(betas), "--adam-eps", str(eps), "--lr", "1e-3"))
    model = model.double()
    optimizer = optim.build_optimizer(cfg.optimizer, list(model.parameters()))
    sample = first_batch(task, "train", model)
    task._meta_dataset()
    cpu = torch.device("cpu")
    probed = probe_of(task, model).parameters()
    v = {n: torch.zeros_like(p) for n, p in probed.items()}
    for update in range(3):
        optimizer.zero_grad()
        state = task.state_dict()
        task.train_step(sample, model, criterion, optimizer, update)
        direction = task.strategy.direction[0]
        task.load_state_dict(state)  # replay the same meta batch without the preconditioner
        raw, _ = fresh_direction(task, model, criterion)
        for n in probed:
            # fairseq's Adam adds eps before the bias correction: eps / sqrt(1 - beta2^t) after it
            bc2 = 1 - betas[1] ** update
            expected = raw[n] if update == 0 else raw[n] / ((v[n] / bc2).sqrt() + eps / bc2 ** 0.5)
            assert torch.allclose(direction[n], expected, rtol=1e-9, atol=0), (update, n)
        if update < 2:
            for n, p in probed.items():
                v[n] = betas[1] * v[n] + (1 - betas[1]) * p.grad ** 2
            optimizer.step()
    precond = {n: 1 / ((v[n] / (1 - betas[1] ** 2)).sqrt() + eps / (1 - betas[1] ** 2) ** 0.5) for n in probed}
    assert precond[next(iter(probed))].std() > 0  # not a uniform rescaling

    # fast (first order, preconditioned) against the exact meta-gradient through Adam's look-ahead
    probe, student = probe_of(task, model), _Student(model, criterion)
    b, lr, denom = int(sample["target"].size(0)), 1e-3, float(sample["ntokens"])
    w = torch.linspace(0.6, 1.4, b, dtype=torch.float64)
    model.zero_grad()
    with probe.watch(capture_grads=True):
        out = criterion.per_sentence(model, sample)
    (w * out.loss).sum().backward()
    fast = first_order_of(task, probe, lr, denom, b, weights=w).grad_w
    task.strategy.direction = (raw, task.strategy.direction[1])
    fast_raw = first_order_of(task, probe, lr, denom, b, weights=w).grad_w
    task.load_state_dict(state)
    meta_sample = task._next_meta_batch(model, cpu)
    names = {id(p): n for n, p in model.named_parameters()}
    by_model_name = {names[id(p)]: (n, p) for n, p in probed.items()}

    def call(p, *args):
        return torch.func.functional_call(student, {"model." + k: t for k, t in p.items()}, args)

    wv = w.clone().requires_grad_()
    params = {k: p for k, (_, p) in by_model_name.items()}
    grads = torch.autograd.grad((wv * call(params, sample)).sum() / denom, list(params.values()), create_graph=True)
    ahead = {k: p - lr * precond[by_model_name[k][0]] * g for (k, p), g in zip(params.items(), grads)}
    exact = torch.autograd.grad(call(ahead, meta_sample, True), wv)[0]
    cos = torch.nn.functional.cosine_similarity(fast, exact, dim=0)
    cos_raw = torch.nn.functional.cosine_similarity(fast_raw, exact, dim=0)
    print(f"cosine with the exact Adam look-ahead: preconditioned {cos:.4f}, raw direction {cos_raw:.4f}")
    assert cos >= 0.99 and cos > cos_raw + 0.01, (cos, cos_raw)


@pytest.mark.parametrize("extra,message", [
    (("--meta-grad", "fd"), "--meta-precondition adam preconditions the meta direction of --meta-grad fast"),
    (("--optimizer", "sgd"), "needs an Adam-type student optimizer, not SGD"),
])
def test_meta_precondition_errors(tiny_data, extra, message):
    from fairseq import optim

    with pytest.raises(ValueError, match=message):
        cfg, task, model, criterion = build(tiny_data, extra=("--meta-precondition", "adam", "--lr", "1e-3", *extra))
        optimizer = optim.build_optimizer(cfg.optimizer, list(model.parameters()))
        task._meta_dataset()
        task.train_step(first_batch(task, "train", model), model, criterion, optimizer, 0)


@pytest.mark.parametrize("method", ["none", "deep"])
def test_train_step_frees_the_logits_before_the_backward(tiny_data, method):
    """The [B, T, vocab] logits are the largest tensor of a forward and the backward does not need them (plain
    fairseq's criterion has dropped them when the trainer calls backward); train_step must not keep them alive
    through the student's backward either (they were most of deep's extra peak memory)."""
    import weakref

    from fairseq import optim

    torch.manual_seed(0)
    cfg, task, model, criterion = build(tiny_data, method=method, extra=("--reweight-recipe", "tuned",
                                                                         "--reweight-warmup", "0", "--optimizer", "adam",
                                                                         "--lr", "1e-3"))
    optimizer = optim.build_optimizer(cfg.optimizer, list(model.parameters()))
    logits, alive = [], []
    per_sentence, backward = criterion.per_sentence, optimizer.backward

    def recording(*args, **kwargs):
        out = per_sentence(*args, **kwargs)
        if out.net_output[0].requires_grad:  # the training forward (not the meta batch's or the contrast's)
            logits.append(weakref.ref(out.net_output[0]))
        return out

    def checking(loss):
        alive.append(logits[-1]() is not None)
        return backward(loss)

    criterion.per_sentence, optimizer.backward = recording, checking
    task._meta_dataset()
    sample = first_batch(task, "train", model)
    for update in range(2):
        task.train_step(sample, model, criterion, optimizer, update)
        optimizer.step()
        optimizer.zero_grad()
    assert len(alive) == 2 and not any(alive), alive
