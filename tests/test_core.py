"""The framework-agnostic core on a small pure-torch student (no fairseq)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fairseq_reweight.core.config import ReweightConfig
from fairseq_reweight.core import (
    MetaGrad, Reweighter, Teacher, WeightDumper, auc, l2rw_weights, normalize, weight_gradient, weight_stats,
)


def _student(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    x, y = torch.randn(12, 5, dtype=dtype), torch.randint(0, 3, (12,))
    xm, ym = torch.randn(20, 5, dtype=dtype), torch.randint(0, 3, (20,))
    params = dict(model.named_parameters())

    def train_losses(p):
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")

    def meta_loss(p):
        return nn.functional.cross_entropy(functional_call(model, p, (xm,)), ym)

    return model, params, train_losses, meta_loss


def _meta_at(params, train_losses, meta_loss, w, lr, denom):
    """L_meta(theta'(w)) evaluated by hand (no weight_gradient code)."""
    names = list(params)
    grads = torch.autograd.grad((w * train_losses(params)).sum() / denom, [params[n] for n in names])
    return meta_loss({n: params[n] - lr * g for n, g in zip(names, grads)}).item()


def test_exact_matches_finite_difference_of_meta_loss():
    _, params, tl, ml = _student()
    w = torch.rand(12, dtype=torch.float64) + 0.5
    lr, denom = 0.5, 7.0
    got = weight_gradient(params, tl, ml, w, lr, denom, mode="exact").grad_w
    h = 1e-6
    ref = torch.zeros_like(w)
    for i in range(len(w)):
        e = torch.zeros_like(w)
        e[i] = h
        ref[i] = (_meta_at(params, tl, ml, w + e, lr, denom) - _meta_at(params, tl, ml, w - e, lr, denom)) / (2 * h)
    assert ref.abs().max() > 1e-6  # the check is not vacuous
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-9), (got, ref)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 2e-2)])
def test_fd_matches_exact(dtype, tol):
    _, params, tl, ml = _student(dtype)
    w = normalize(torch.rand(12, dtype=dtype) + 0.1)
    exact = weight_gradient(params, tl, ml, w, 0.3, 4.0, mode="exact").grad_w
    fast = weight_gradient(params, tl, ml, w, 0.3, 4.0, mode="fd").grad_w
    cos = torch.nn.functional.cosine_similarity(exact, fast, dim=0)
    assert cos > 0.999
    assert ((fast - exact).norm() / exact.norm()) < tol


def test_fd_reuses_precomputed_losses_and_keeps_graph():
    model, params, tl, ml = _student()
    w = torch.ones(12, dtype=torch.float64)
    losses = tl(params)
    a = weight_gradient(params, tl, ml, w, 0.3, mode="fd", losses=losses).grad_w
    b = weight_gradient(params, tl, ml, w, 0.3, mode="fd").grad_w
    assert torch.allclose(a, b)
    losses.sum().backward()  # the caller's own backward still works
    assert model[0].weight.grad is not None


def test_l2rw_at_zero_weights_is_plain_gradient_alignment():
    model, params, tl, ml = _student()
    zeros = torch.zeros(12, dtype=torch.float64)
    got = weight_gradient(params, tl, ml, zeros, lr=0.1, mode="exact").grad_w
    names = list(params)
    gm = torch.autograd.grad(ml(params), [params[n] for n in names])
    for i in range(12):
        gi = torch.autograd.grad(tl(params)[i], [params[n] for n in names])
        ref = -0.1 * sum((a * b).sum() for a, b in zip(gm, gi))
        assert torch.allclose(got[i], ref, rtol=1e-8)
    w, fell_back = l2rw_weights(got)
    assert not fell_back and torch.allclose(w.mean(), torch.tensor(1.0, dtype=w.dtype))
    assert torch.equal(w == 0, got >= 0)


def test_l2rw_all_zero_falls_back_to_uniform():
    w, fell_back = l2rw_weights(torch.tensor([0.1, 0.2, 0.0]))
    assert fell_back and torch.equal(w, torch.ones(3))
    w, fell_back = l2rw_weights(torch.tensor([float("nan"), -1.0]))
    assert fell_back


def test_normalize_mean_one_and_teacher_starts_uniform():
    r = torch.tensor([0.2, 0.4, 1.4])
    assert torch.allclose(normalize(r), torch.tensor([0.3, 0.6, 2.1]))
    t = Teacher(4)
    x = torch.randn(6, 4)
    t.norm.update(x)
    assert torch.allclose(t(x), torch.full((6,), 0.5))
    with pytest.raises(ValueError, match="features of shape"):
        t(torch.randn(6, 5))


def _capped_reference(r, cap):
    """Water-filling by bisection on the scale: w = min(cap, s r) with mean 1 (an independent reference)."""
    lo, hi = 0.0, 1e12
    for _ in range(400):
        s = (lo + hi) / 2
        lo, hi = (s, hi) if float(torch.clamp(s * r, max=cap).mean()) < 1 else (lo, s)
    return torch.clamp(hi * r, max=cap)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_normalize_with_max_weight_caps_and_keeps_mean_one(seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(40, generator=g, dtype=torch.float64) ** 6  # heavy tail: several rounds of water-filling
    for cap in (1.5, 2.0, 4.0):
        w = normalize(r, max_weight=cap)
        assert float(w.max()) <= cap + 1e-12 and float(w.mean()) == pytest.approx(1.0, abs=1e-12)
        assert torch.allclose(w, _capped_reference(r, cap), atol=1e-9)
        assert int((w == cap).sum()) >= 2  # the cap binds for more than the largest weight
        order = torch.argsort(r)
        assert bool((w[order].diff() >= -1e-12).all())  # the ranking is kept
    assert torch.equal(normalize(r, max_weight=1e9), normalize(r))  # a cap that does not bind changes nothing


def test_normalize_with_max_weight_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(3)
    r = (torch.rand(12, generator=g, dtype=torch.float64) ** 4).requires_grad_()
    v = torch.randn(12, generator=g, dtype=torch.float64)
    w = normalize(r, max_weight=2.0)
    assert 0 < int((w == 2.0).sum()) < 12
    (grad,) = torch.autograd.grad((w * v).sum(), r)
    h = 1e-6
    for i in range(12):
        e = torch.zeros(12, dtype=torch.float64)
        e[i] = h
        fd = ((normalize(r + e, 2.0) - normalize(r - e, 2.0)) * v).sum() / (2 * h)
        assert float(grad[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)


def test_normalize_with_max_weight_few_positive_and_flags():
    w = normalize(torch.tensor([0.0, 3.0, 0.0, 0.0, 1.0, 0.0]), max_weight=2.0)
    assert torch.equal(w, torch.tensor([0.0, 2.0, 0.0, 0.0, 2.0, 0.0]))  # fewer than B/C positive: sum < B
    w, fell_back = l2rw_weights(torch.tensor([-5.0, -1.0, -1.0, -1.0]), max_weight=1.5)
    assert not fell_back and float(w.max()) == 1.5 and float(w.mean()) == pytest.approx(1.0)
    for bad in (1.0, 0.5, -2.0):
        with pytest.raises(ValueError, match="--max-weight must be > 1"):
            Reweighter("deep", max_weight=bad)
    with pytest.raises(ValueError, match="--max-weight caps"):
        ReweightConfig(reweight_method="none", max_weight=2.0).validate()
    feats = torch.tensor([[0.0], [0.0], [0.0], [10.0], [-10.0]])
    got = {}
    for cap in (None, 1.5):  # the same teacher, which strongly prefers two examples, with and without the cap
        rw = Reweighter("mwnet", max_weight=cap)
        rw.ensure_teacher(1, torch.device("cpu"))
        torch.manual_seed(0)
        torch.nn.init.normal_(rw.teacher.out.weight, std=1.0)
        got[cap] = rw.teacher_weights(0, feats)[0]
    assert float(got[None].max()) > 2 and float(got[1.5].max()) == pytest.approx(1.5)
    assert float(got[1.5].mean()) == pytest.approx(1.0)


def test_weight_stats_and_auc():
    s = weight_stats(torch.ones(20))
    assert s["w_sum"] == 20 and s["w_low10"] == pytest.approx(0.1)
    s = weight_stats(torch.tensor([0.0, 0.0, 1.0, 3.0] + [2.0] * 6))
    assert s["w_low10"] == 0.0 and s["w_min"] == 0.0 and s["w_max"] == 3.0
    assert auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert auc([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == 0.5
    assert auc([0.3, 0.1, 0.2, 0.3], [1, 0, 1, 0]) == pytest.approx(0.625)


def test_reweighter_teacher_learns_to_downweight_harmful_examples():
    """Noisy labels on half of a linear problem: the mwnet teacher (loss only) learns to push
    the weights of corrupted examples below those of clean ones."""
    torch.manual_seed(1)
    d, n = 8, 64
    wtrue = torch.randn(d)
    x = torch.randn(n, d)
    y = (x @ wtrue > 0).long()
    noisy = torch.arange(n) % 2 == 0
    y_obs = torch.where(noisy, 1 - y, y)
    xm = torch.randn(200, d)
    ym = (xm @ wtrue > 0).long()
    model = nn.Linear(d, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rw = Reweighter("mwnet", teacher_lr=1e-2)
    for step in range(300):
        params = dict(model.named_parameters())

        def tl(p):
            return nn.functional.cross_entropy(functional_call(model, p, (x,)), y_obs, reduction="none")

        def ml(p):
            return nn.functional.cross_entropy(functional_call(model, p, (xm,)), ym)

        losses = tl(params)
        w, info = rw.weights(step, losses.detach()[:, None], lambda w: weight_gradient(params, tl, ml, w, 0.5, n, "fd", losses=losses))
        assert "meta_loss" in info
        opt.zero_grad()
        ((w * losses).sum() / n).backward()
        opt.step()
    assert rw.meta_steps == 300
    assert auc(w.tolist(), (~noisy).long().tolist()) > 0.8
    # state round trip
    rw2 = Reweighter("mwnet", teacher_lr=1e-2)
    rw2.load_state_dict(rw.state_dict())
    feats = losses.detach()[:, None]
    rw2.ensure_teacher(1, torch.device("cpu"))
    assert torch.equal(rw2.teacher(feats), rw.teacher(feats))
    with pytest.raises(ValueError, match="--reweight-method"):
        Reweighter("deep").load_state_dict(rw.state_dict())


def test_reweighter_skips_non_finite_meta_gradient():
    rw = Reweighter("deep")
    feats = torch.randn(4, 3)
    teacher = rw.ensure_teacher(3, torch.device("cpu"))
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_()
    before = [p.clone() for p in teacher.parameters()]
    bad = MetaGrad(torch.tensor([float("nan")] * 4), torch.tensor(1.0))
    w, info = rw.weights(0, feats, lambda w: bad)
    assert info.get("meta_skipped") == 1.0 and rw.meta_skipped == 1 and "meta_loss" not in info
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert torch.isfinite(w).all() and torch.allclose(w.mean(), torch.tensor(1.0))


def test_weight_dumper(tmp_path):
    d = WeightDumper(str(tmp_path / "w.tsv"))
    d.write(3, torch.tensor([5, 7]), torch.tensor([0.5, 1.5]), torch.tensor([2.0, 1.0]))
    d.close()
    lines = (tmp_path / "w.tsv").read_text().splitlines()
    assert lines == ["update\tid\tweight\tloss", "3\t5\t0.5\t2", "3\t7\t1.5\t1"]


def test_teacher_update_ignores_meta_gradient_scale():
    """A learning-rate decay rescales the meta-gradient; the teacher's steps must not shrink with it."""
    torch.manual_seed(0)
    feats = torch.randn(8, 3)
    direction = torch.randn(8)
    teachers = []
    for scales in ([1.0] * 6, [1.0, 1.0, 1.0, 1e-3, 1e-3, 1e-3]):
        rw = Reweighter("deep", teacher_lr=1e-2)
        torch.manual_seed(1)
        for step, s in enumerate(scales):
            rw.weights(step, feats, lambda w, s=s: MetaGrad(s * direction, torch.tensor(1.0)))
        teachers.append(rw.teacher)
    for a, b in zip(teachers[0].parameters(), teachers[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_functional_call_keeps_shared_modules_and_tied_weights():
    """fairseq's --share-all-embeddings: one embedding module under two paths, tied to the output
    projection. torch.func.functional_call's own tie handling leaves such a model untied after the
    call (regression: the fd/exact meta-gradients silently froze the output projection); ours does not."""
    from fairseq_reweight.core import functional_call as safe_call

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_emb = nn.Embedding(5, 3)
            self.dec_emb = self.enc_emb
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.enc_emb.weight

        def forward(self, x):
            return self.out(self.dec_emb(x))

    m = Shared()
    orig = m.enc_emb.weight
    new = orig.detach() + 1
    x = torch.tensor([1, 2])
    y = safe_call(m, {name: new for name, _ in m.named_parameters()}, (x,))
    assert torch.allclose(y, new[x] @ new.t())  # every use of the parameter saw the substitute
    assert m.enc_emb.weight is orig and m.dec_emb.weight is orig and m.out.weight is orig
    functional_call(m, {name: new for name, _ in m.named_parameters()}, (x,))  # torch's own
    assert m.out.weight is not m.enc_emb.weight or m.enc_emb.weight is not orig  # the bug this guards against


@pytest.mark.parametrize("reduced", [False, True], ids=["gradients", "dots"])
def test_probe_frees_each_steps_activations(reduced):
    """A gradient hook that referenced the recorded call (which holds the hooked output) made a cycle
    through autograd's C++ hooks: every step's activations stayed alive (~20 MB per update on Multi30k
    until the process ran out of memory). After the next step they must be collectable (also when the hooks
    reduce the gradients to per-example products, ``watch(dots=...)``)."""
    import gc
    import weakref

    from fairseq_reweight.core.probe import LayerProbe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    probe = LayerProbe([("0", model[0], 0), ("2", model[2], 0)])
    direction = {n: torch.randn_like(p) for n, p in probe.parameters().items()}
    refs = []
    for _ in range(3):
        with probe.watch(capture_grads=True, dots=direction if reduced else None):
            loss = model(torch.randn(5, 4)).sum()
        refs += [weakref.ref(c.inp) for c in probe.calls]
        loss.backward()
        if reduced:
            assert all(c.box.dot is not None and c.box.dot.shape == (5,) for c in probe.calls)
        else:
            assert all(c.grad is not None for c in probe.calls)
            refs += [weakref.ref(c.out) for c in probe.calls] + [weakref.ref(c.grad) for c in probe.calls]
        del loss
    probe.calls = []
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def test_meta_direction_refresh_and_average():
    """--meta-refresh K computes a fresh direction at every K-th meta update and reuses it in between;
    --meta-ema gives the bias-corrected exponential average of the fresh ones (checked against the
    weights written out by hand); a non-finite fresh direction is passed on but never averaged in."""
    from fairseq_reweight.core import MetaDirection

    torch.manual_seed(0)
    fresh = [{"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)} for _ in range(7)]
    made = []

    def compute():
        made.append(len(made))
        return fresh[len(made) - 1], torch.tensor(float(len(made)))

    md, decay = MetaDirection(refresh=3, decay=0.8), 0.8
    for call in range(7):  # fresh at calls 0, 3, 6
        d, loss = md.get(compute)
        n = len(made)
        assert n == call // 3 + 1 and float(loss) == n
        weights = torch.tensor([(1 - decay) * decay ** (n - 1 - k) for k in range(n)], dtype=torch.float64)
        weights /= weights.sum()
        for key in ("w", "b"):
            want = sum(wk * fresh[k][key] for k, wk in enumerate(weights))
            assert torch.allclose(d[key], want, atol=1e-12), (call, key)

    plain = MetaDirection()  # the defaults: a fresh direction every meta update, no averaging
    made.clear()
    for call in range(3):
        d, _ = plain.get(compute)
        assert len(made) == call + 1 and d is fresh[call]

    state = md.state_dict()
    bad = MetaDirection(refresh=1, decay=0.8)
    bad.load_state_dict(state)
    before = bad._value()
    nan = {"w": torch.full((3, 2), float("nan"), dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    d, _ = bad.get(lambda: (nan, torch.tensor(1.0)))
    assert torch.isnan(d["w"]).all()  # passed on: the caller skips this meta update
    d, _ = bad.get(lambda: (fresh[0], torch.tensor(1.0)))
    assert bad.fresh == state["fresh"] + 1
    want = (decay * before["w"] * (1 - decay ** state["fresh"]) + (1 - decay) * fresh[0]["w"]) / (1 - decay ** bad.fresh)
    assert torch.allclose(d["w"], want, atol=1e-12)

    for kwargs, message in (({"refresh": 0}, "--meta-refresh must be >= 1"), ({"decay": 1.0}, "--meta-ema must be")):
        with pytest.raises(ValueError, match=message):
            MetaDirection(**kwargs)


def test_teacher_weight_decay_bounds_drift_under_pure_noise():
    """A meta-gradient that is pure noise (no input carries signal) makes an Adam-trained teacher's weights
    random-walk apart; --teacher-weight-decay (decoupled, AdamW) keeps them near uniform. The decay itself
    is checked exactly: with a zero gradient one step scales every parameter by 1 - lr * decay."""
    spread = {}
    for wd in (0.0, 5.0):
        rw = Reweighter("deep", teacher_lr=1e-2, teacher_weight_decay=wd, seed=0)
        g = torch.Generator().manual_seed(0)
        for step in range(600):
            feats = torch.randn(32, 20, generator=g)
            noise = torch.randn(32, generator=g)
            w, _ = rw.weights(step, feats, lambda w: MetaGrad(noise, torch.tensor(1.0)))
        spread[wd] = float(w.std())
    assert spread[0.0] > 3 * spread[5.0], spread

    rw = Reweighter("mwnet", teacher_lr=0.1, teacher_weight_decay=2.0)
    teacher = rw.ensure_teacher(3, torch.device("cpu"))
    before = [p.detach().clone() for p in teacher.parameters()]
    for p in teacher.parameters():
        p.grad = torch.zeros_like(p)
    rw.optimizer.step()
    for a, p in zip(before, teacher.parameters()):
        assert torch.allclose(p, a * (1 - 0.1 * 2.0))
    for bad, msg in ((-1.0, "must be >= 0"),):
        with pytest.raises(ValueError, match=msg):
            Reweighter("deep", teacher_weight_decay=bad)
    with pytest.raises(ValueError, match="--teacher-weight-decay has no effect"):
        ReweightConfig(reweight_method="l2rw", teacher_weight_decay=1.0).validate()


def test_adam_precondition_with_torch_adam():
    """torch.optim.AdamW (tensor step counts): direction / (sqrt(v / (1 - beta2^t)) + eps), v by hand;
    unchanged before the first step; clear errors for parameters the optimizer does not hold."""
    from fairseq_reweight.core import adam_precondition

    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    params = dict(lin.named_parameters())
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    direction = {n: torch.randn_like(p) for n, p in params.items()}
    assert adam_precondition(direction, params, opt) is direction
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(5, 4)).pow(3).sum().backward()
        for n, p in params.items():
            v[n] = 0.9 * v[n] + 0.1 * p.grad ** 2
        opt.step()
    got = adam_precondition(direction, params, opt)
    for n in params:
        assert torch.allclose(got[n], direction[n] / ((v[n] / (1 - 0.9 ** 3)).sqrt() + 1e-6), rtol=1e-5), n
    with pytest.raises(ValueError, match="does not hold the model's own parameters"):
        adam_precondition(direction, params, torch.optim.Adam([nn.Parameter(torch.zeros(1))]))
    with pytest.raises(ValueError, match="Adam-type student optimizer, not SGD"):
        adam_precondition(direction, params, torch.optim.SGD(lin.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="--meta-precondition adam preconditions"):
        ReweightConfig(reweight_method="none", meta_fd_eps=1e-4, meta_precondition="adam").validate()


def test_weight_dumper_resume_drops_rows_after_the_checkpoint(tmp_path):
    """keep_before=N (a resume at update N): rows of updates >= N and a last row cut mid-write go; the rank's
    own file only; without it (a fresh run) nothing is dropped."""
    path = tmp_path / "w.tsv"
    rows = "update\tid\tweight\tloss\n0\t1\t1\t2\n1\t2\t1\t2\n2\t3\t1\t2\n3\t4\t1\t2\n"
    path.write_text(rows + "4\t5\t0.9")  # the interruption cut the last row
    (tmp_path / "w.tsv.rank1").write_text(rows)
    d = WeightDumper(str(path), keep_before=2)
    d.write(2, torch.tensor([7]), torch.tensor([0.5]), torch.tensor([1.0]))
    d.close()
    assert path.read_text() == "update\tid\tweight\tloss\n0\t1\t1\t2\n1\t2\t1\t2\n2\t7\t0.5\t1\n"
    assert (tmp_path / "w.tsv.rank1").read_text() == rows
    WeightDumper(str(path), rank=1).close()
    assert (tmp_path / "w.tsv.rank1").read_text() == rows


@pytest.mark.parametrize("which", ["fairseq", "torch-amsgrad"])
def test_adam_precondition_is_the_optimizers_own_step(which):
    """With beta1 = 0 (first moment = this step's gradient g) the optimizer's own update is exactly
    -lr * P g: P from adam_precondition must reproduce the step fairseq's FairseqAdam (eps added before the
    bias correction: effectively eps / sqrt(1 - beta2^t)) and torch's Adam with AMSGrad (the running maximum
    of the second moments) really take. Gradients ~1e-8 make eps matter."""
    from fairseq_reweight.core import adam_precondition

    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, dtype=torch.float64))  # float64: the step is read off as a difference
    if which == "fairseq":
        from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig

        opt = FairseqAdam(FairseqAdamConfig(adam_betas="(0.0, 0.98)", adam_eps=1e-8, lr=[0.1]), [w]).optimizer
    else:
        opt = torch.optim.Adam([w], lr=0.1, betas=(0.0, 0.98), eps=1e-8, amsgrad=True)
    for step in range(3):
        scale = 1e-8 if step != 1 else 3e-8  # a larger middle step: AMSGrad's maximum differs from v
        g = torch.randn(6, dtype=torch.float64) * scale
        w.grad = g.clone()
        before = w.detach().clone()
        opt.step()
    moved = w.detach() - before
    got = adam_precondition({"w": g}, {"w": w}, opt)["w"]
    assert torch.allclose(-0.1 * got, moved, rtol=1e-9, atol=0), (got, moved)


def test_meta_lr_is_refused_where_it_cancels():
    """--meta-lr scales dL/dw by the look-ahead step; with --meta-grad fast the teacher sees the meta-gradient
    rescaled to unit RMS and l2rw normalises it over the batch, so it would do nothing: refused there."""
    for method in ("l2rw", "mwnet", "deep"):
        with pytest.raises(ValueError, match="--meta-lr sets the look-ahead step of --meta-grad fd/exact"):
            ReweightConfig(reweight_method=method, teacher_lr=None if method == "l2rw" else 1e-3, meta_lr=0.1).validate()
        ReweightConfig(reweight_method=method, teacher_lr=None if method == "l2rw" else 1e-3, meta_grad="fd", meta_lr=0.1).validate()
    with pytest.raises(ValueError, match="no effect with --reweight-method none"):
        ReweightConfig(reweight_method="none", meta_grad="fd", meta_lr=0.1).validate()


def test_core_noise_and_image_start_without_fairseq():
    """The framework-agnostic parts import without fairseq (~3 s saved per start); fairseq's --user-dir, which
    imports the package with fairseq loaded, still registers the task (tests/test_cli.py)."""
    import subprocess
    import sys

    code = ("import sys; import fairseq_reweight.core, fairseq_reweight.noise, fairseq_reweight.image.train, "
            "fairseq_reweight.image.compare; assert 'fairseq' not in sys.modules, 'fairseq was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import fairseq, fairseq_reweight; from fairseq.tasks import TASK_REGISTRY; "
            "assert 'reweighted_translation' in TASK_REGISTRY")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_recipe_resolves_unset_flags_and_keeps_explicit_ones():
    from fairseq_reweight.core import recipe

    tuned = recipe.resolve("tuned", "deep", "fast", 1200)
    assert tuned == {"meta_refresh": 4, "meta_ema": 0.9, "max_weight": 2.0, "meta_precondition": "adam",
                     "teacher_inputs": "states,token_stats,source_contrast,progress", "reweight_warmup": 400,
                     "teacher_lr": 1e-4, "teacher_prior_scale": 4.0, "teacher_prior": "source_contrast",
                     "weight_norm": "running", "drop_below": 0.25, "teacher_prior_reference": "meta",
                     "source_contrast": "once", "source_contrast_refresh": 400}
    paper = recipe.resolve("paper", "deep", "fast", 1200)
    assert paper == {"meta_refresh": 1, "meta_ema": 0.0, "max_weight": None, "meta_precondition": "none",
                     "teacher_inputs": "states,token_stats,progress", "reweight_warmup": 0,
                     "teacher_lr": 1e-3, "teacher_prior_scale": 2.0, "teacher_prior": "", "weight_norm": "batch",
                     "drop_below": None, "teacher_prior_reference": "train", "source_contrast": "batch",
                     "source_contrast_refresh": 0}
    for method in ("none", "l2rw", "mwnet"):  # the published forms under both recipes
        assert recipe.resolve("tuned", method, "fast", 1200) == {
            **paper, "teacher_inputs": "loss" if method == "mwnet" else "",
            "teacher_lr": 1e-3 if method == "mwnet" else None}
    # the recipe's prior only where the teacher reads that input; "none" switches it off
    assert recipe.resolve("tuned", "deep", "fast", 1200, teacher_inputs="states,progress")["teacher_prior"] == ""
    assert recipe.resolve("tuned", "deep", "fast", 1200, teacher_prior="none")["teacher_prior"] == ""
    assert recipe.resolve("paper", "deep", "fast", 1200, teacher_inputs="states,source_contrast",
                          teacher_prior="source_contrast", teacher_lr=3e-4)["teacher_prior"] == "source_contrast"
    # explicit flags win; --max-weight 0 is no cap; fast-only flags stay plain with fd/exact
    mine = recipe.resolve("tuned", "deep", "fast", 1200, meta_refresh=1, max_weight=0, reweight_warmup=0,
                          meta_precondition="none")
    assert mine["meta_refresh"] == 1 and mine["max_weight"] is None and mine["reweight_warmup"] == 0
    assert mine["meta_ema"] == 0.9 and mine["meta_precondition"] == "none"
    assert recipe.resolve("tuned", "deep", "fast", 1200, weight_norm="batch")["weight_norm"] == "batch"
    mine = recipe.resolve("tuned", "deep", "fast", 1200, drop_below=0.3, teacher_prior_reference="meta")
    assert mine["drop_below"] == 0.3 and mine["teacher_prior_reference"] == "meta"
    assert recipe.resolve("tuned", "deep", "fast", 1200, drop_below=0)["drop_below"] is None  # 0: none
    assert recipe.resolve("tuned", "deep", "fast", 1200, source_contrast="batch")["source_contrast"] == "batch"
    # the corpus pass again half-way through the reweighted updates (rounded up: none at the last update), explicit wins
    assert recipe.resolve("tuned", "deep", "fast", 1061)["source_contrast_refresh"] == 354  # 354 + 2 x 354 > 1060
    assert recipe.resolve("tuned", "deep", "fast", 1200, source_contrast_refresh=0)["source_contrast_refresh"] == 0
    assert recipe.resolve("tuned", "deep", "fast", 1200, source_contrast="batch")["source_contrast_refresh"] == 0
    assert recipe.resolve("tuned", "deep", "fast", 0)["source_contrast_refresh"] == 0  # no --max-update: never
    # the corpus pass only where the teacher reads the contrast
    assert recipe.resolve("tuned", "deep", "fast", 1200, teacher_inputs="states,progress")["source_contrast"] == "batch"
    # the prior's clean reference only where there is a prior
    assert recipe.resolve("tuned", "deep", "fast", 1200, teacher_prior="none")["teacher_prior_reference"] == "train"
    fd = recipe.resolve("tuned", "deep", "fd", 1200)
    assert (fd["meta_refresh"], fd["meta_ema"], fd["meta_precondition"]) == (1, 0.0, "none")
    assert fd["max_weight"] == 2.0 and "source_contrast" in fd["teacher_inputs"] and fd["reweight_warmup"] == 400
    assert recipe.resolve("tuned", "deep", "fast", 0)["reweight_warmup"] == 0  # no --max-update: no warm-up
    with pytest.raises(ValueError, match="--reweight-recipe must be one of tuned, paper"):
        recipe.resolve("best", "deep", "fast", 10)


def test_teacher_prior_ranks_by_its_input_from_the_start_and_learns_its_scale():
    """--teacher-prior: at initialisation (output layer zero) the teacher's logit is scale x the standardised
    prior column (clipped to [-3, 3]), so its weights rank examples by that input alone; the scale is a
    parameter the meta-gradient moves; a prior column outside the standardised inputs is refused."""
    torch.manual_seed(0)
    x = torch.randn(64, 5) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0]) + 4.0
    x[:, 4] = 0.3  # a passthrough column (progress)
    t = Teacher(5, hidden=8, passthrough=1, prior=1, prior_scale=2.0)
    t.norm.update(x[:, :4])
    r = t(x)
    var = (t.norm.sq[1] - t.norm.mean[1] ** 2).clamp_min(t.norm.min_var)
    z = ((x[:, 1] - t.norm.mean[1]) / var.sqrt()).clamp(-3, 3)
    assert torch.allclose(r, torch.sigmoid(2.0 * z), atol=1e-5)
    assert auc(r.tolist(), (x[:, 1] > x[:, 1].median()).int().tolist()) == 1.0
    plain = Teacher(5, hidden=8, passthrough=1)
    plain.norm.update(x[:, :4])
    assert torch.allclose(plain(x), torch.full((64,), 0.5))  # without a prior: uniform at the start
    loss = (normalize(r) * torch.linspace(-1, 1, 64)).sum()
    loss.backward()
    assert t.prior_scale.grad is not None and t.prior_scale.grad.abs() > 0
    with pytest.raises(ValueError, match="prior column 4 must be a standardised input"):
        Teacher(5, passthrough=1, prior=4)


def test_teacher_prior_reference_standardises_the_prior_by_the_clean_reference():
    """--teacher-prior-reference meta: once reference values (the meta set's) are folded in, the prior's column is
    standardised by their moments and shifted up by the margin, so a batch that is all like the reference gets the
    prior's high weight whatever its own spread (the training batches' standardisation gives its lower half a low
    one); before any reference value, and for a teacher saved without a reference, it reads the training
    standardisation; the reference moments fold in with the others (Reweighter.end_update) and resume."""
    torch.manual_seed(0)
    clean = torch.randn(256, 3) + torch.tensor([0.0, 2.0, 0.0])  # column 1 (the prior): clean pairs around 2
    t = Teacher(3, hidden=8, prior=1, prior_scale=4.0, prior_reference=True)
    t.norm.update(clean)
    plain = Teacher(3, hidden=8, prior=1, prior_scale=4.0)
    plain.norm.update(clean)
    assert torch.equal(t(clean), plain(clean))  # no reference yet: the training standardisation
    assert float((plain(clean) < 0.1).float().mean()) > 0.2  # which gives a clean batch's lower part a low weight
    t.reference.update(clean[:, 1:2])
    ref_z = (clean[:, 1] - t.reference.mean[0]) / (t.reference.sq[0] - t.reference.mean[0] ** 2).sqrt()
    assert torch.allclose(t(clean), torch.sigmoid(4.0 * (ref_z + Teacher.PRIOR_MARGIN).clamp(-3, 3)), atol=1e-5)
    assert float((t(clean) < 0.1).float().mean()) < 0.1  # all but the tail of clean pairs keep a high weight
    noise = clean.clone()
    noise[:, 1] = 2.0 - 4.0 + 0.3 * torch.randn(256)  # 4 sd below the clean mean (misaligned pairs' contrast)
    assert float(t(noise).max()) < 0.05
    saved = {k: v for k, v in t.state_dict().items() if not k.startswith("reference.")}
    again = Teacher(3, hidden=8, prior=1, prior_scale=4.0, prior_reference=True)
    again.load_state_dict(saved)  # a teacher saved before the reference existed: loads, reference empty
    assert int(again.reference.count) == 0 and torch.equal(again(clean), plain(clean))
    rw = Reweighter("deep", weight_norm="running", prior_reference=True)
    rw.teacher_prior = 1
    rw.add_reference(clean[:, 1])  # before the teacher exists: nothing to fold into
    rw.teacher_weights(1, clean)
    rw.add_reference(clean[:8, 1])
    state = rw.state_dict()
    assert state["pending_reference"] is not None
    back = Reweighter("deep", weight_norm="running", prior_reference=True)
    back.teacher_prior = 1
    back.load_state_dict(state)
    back.ensure_teacher(3, torch.device("cpu"))
    rw.end_update()
    back.end_update()
    assert int(rw.teacher.reference.count) == 1 and torch.equal(back.teacher.reference.mean, rw.teacher.reference.mean)
    assert float(rw.teacher.reference.mean[0]) == pytest.approx(float(clean[:8, 1].mean()), abs=1e-6)
    rw.add_reference(torch.tensor([float("nan"), float("inf"), 5.0]))  # a non-finite meta NLL is left out
    rw.end_update()
    assert torch.isfinite(rw.teacher.reference.mean).all() and torch.isfinite(rw.teacher.reference.sq).all()
    expected = float(clean[:8, 1].mean()) * (1 - rw.teacher.reference.momentum) + 5.0 * rw.teacher.reference.momentum
    assert float(rw.teacher.reference.mean[0]) == pytest.approx(expected, abs=1e-5)


def test_normalize_running_scale_keeps_the_batch_gradient_and_lets_bad_batches_weigh_less():
    """--weight-norm running: the weights are the teacher's outputs divided by their mean over batches (capped),
    so a batch of low outputs keeps a low total weight instead of mean one; the gradient is the batch
    normalisation's (checked against finite differences of the batch-normalised objective)."""
    g = torch.Generator().manual_seed(0)
    raw = (torch.rand(12, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    scale = torch.tensor(0.5, dtype=torch.float64)
    w = normalize(raw, max_weight=2.0, scale=scale)
    assert torch.allclose(w.detach(), (raw.detach() / 0.5).clamp_max(2.0))
    assert float(w.mean()) < 0.25 and float(normalize(raw.detach(), max_weight=2.0).mean()) == pytest.approx(1.0)
    big = torch.tensor([0.1, 5.0, 0.2], dtype=torch.float64)
    assert float(normalize(big, max_weight=2.0, scale=torch.tensor(1.0, dtype=torch.float64)).max()) == 2.0
    c = torch.randn(12, generator=g, dtype=torch.float64)
    (w * c).sum().backward()
    eps, fd = 1e-6, torch.zeros(12, dtype=torch.float64)
    for i in range(12):
        e = torch.zeros(12, dtype=torch.float64)
        e[i] = eps
        fd[i] = ((normalize(raw.detach() + e, 2.0) * c).sum() - (normalize(raw.detach() - e, 2.0) * c).sum()) / (2 * eps)
    assert torch.allclose(raw.grad, fd, atol=1e-6)


def test_reweighter_running_weight_norm_tracks_the_output_mean_and_resumes():
    """The running mean of the teacher's output starts from the first update's batch mean and moves by 2 % per
    update; it is saved with the teacher, and a checkpoint of the other normalisation is refused."""
    torch.manual_seed(0)
    rw = Reweighter("deep", weight_norm="running", teacher_prior_scale=4.0)
    rw.teacher_prior = 0
    batches = [torch.randn(16, 3) + torch.tensor([float(i % 3) - 1.0, 0.0, 0.0]) for i in range(5)]
    w0, _ = rw.teacher_weights(1, batches[0])  # first batch: nothing folded in yet, so batch normalisation
    assert float(w0.mean()) == pytest.approx(1.0)
    with torch.no_grad():
        expected = float(rw.teacher(batches[0]).mean())  # the output mean at the inputs' moments of that update
    rw.end_update()
    assert float(rw.teacher.output_scale()) == pytest.approx(expected, rel=1e-5)
    for i, x in enumerate(batches[1:], 2):
        with torch.no_grad():
            raw = rw.teacher(x)
        w, _ = rw.teacher_weights(i, x)
        assert torch.allclose(w, (raw / rw.teacher.output_scale()).clamp_max(float("inf")), atol=1e-6)
        rw.end_update()
        expected = 0.98 * expected + 0.02 * float(raw.mean())
        assert float(rw.teacher.output_scale()) == pytest.approx(expected, rel=1e-4)
    means = [float(rw.teacher_weights(9, x)[0].mean()) for x in batches[:3]]
    assert max(means) - min(means) > 0.1  # batches differ in total weight (batch normalisation: all 1)
    state = rw.state_dict()
    again = Reweighter("deep", weight_norm="running", teacher_prior_scale=4.0)
    again.teacher_prior = 0
    again.load_state_dict(state)
    again.ensure_teacher(3, torch.device("cpu"))
    assert float(again.teacher.output_scale()) == pytest.approx(float(rw.teacher.output_scale()))
    other = Reweighter("deep", teacher_prior_scale=4.0)
    other.teacher_prior = 0
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="--weight-norm running but this run uses --weight-norm batch"):
        other.ensure_teacher(3, torch.device("cpu"))
    with pytest.raises(ValueError, match="--weight-norm must be one of batch, running"):
        Reweighter("deep", weight_norm="global")


def test_a_running_length_checkpoint_is_refused_with_the_way_on():
    """--weight-norm running-length (sessions 23-24: the running mean output per source-length bucket, 32 of them)
    was removed; its checkpoints name what to do instead rather than failing on a buffer's shape."""
    rw = Reweighter("deep", weight_norm="running")
    rw.teacher_weights(1, torch.randn(8, 3))
    rw.end_update()
    state = rw.state_dict()
    state["teacher"] = dict(state["teacher"], **{"out_norm.mean": torch.zeros(32),
                                                 "out_norm.count": torch.zeros(32, dtype=torch.long)})
    again = Reweighter("deep", weight_norm="running")
    again.load_state_dict(state)
    with pytest.raises(ValueError, match="running-length, which was removed .* --weight-norm running --reset-teacher"):
        again.ensure_teacher(3, torch.device("cpu"))
    with pytest.raises(ValueError, match="--weight-norm must be one of batch, running, got 'running-length'"):
        Reweighter("deep", weight_norm="running-length")


def test_running_weight_norm_resumes_a_checkpoint_of_the_older_format():
    """Before session 23 the running mean output was a RunningNorm(1) (mean, sq, scalar count; pending [sum, sum of
    squares, n]): such a checkpoint still resumes, with the same mean and pending batches."""
    rw = Reweighter("deep", weight_norm="running")
    x = torch.randn(8, 3)
    rw.teacher_weights(1, x)
    rw.end_update()
    rw.teacher_weights(2, x + 1)
    state = rw.state_dict()
    old = dict(state, teacher=dict(state["teacher"]))
    mean, count = old["teacher"]["out_norm.mean"], old["teacher"]["out_norm.count"]
    old["teacher"]["out_norm.sq"], old["teacher"]["out_norm.count"] = mean * mean, count.reshape(())
    s, n = state["pending_out_norm"]
    old["pending_output"] = torch.stack([s, s * s, n])
    del old["pending_out_norm"]
    again = Reweighter("deep", weight_norm="running")
    again.load_state_dict(old)
    again.ensure_teacher(3, torch.device("cpu"))
    rw.end_update()
    again.end_update()
    assert torch.equal(again.teacher.out_norm.mean, rw.teacher.out_norm.mean)
    assert again.teacher.out_norm.count.tolist() == [2]


def test_weight_ema_averages_each_examples_weight_over_its_visits():
    """--weight-ema d: an example's weight is the batch-normalised average of the teacher's outputs at its visits,
    m <- d m + (1 - d) teacher(x) (the output itself at the first visit), written once per update (end_update);
    the meta-gradient reaches the teacher through the (1 - d) teacher(x) term; the memory is saved and restored."""
    from fairseq_reweight.core.memory import WeightMemory

    torch.manual_seed(0)
    d, ids = 0.75, torch.tensor([0, 2, 4, 6, 8, 9])
    feats = [torch.randn(6, 3) for _ in range(3)]
    rw = Reweighter("deep", teacher_lr=1e-2, meta_interval=100, weight_ema=d, num_examples=10)
    mg = MetaGrad(torch.randn(6), torch.tensor(1.0))
    w0, _ = rw.weights(0, feats[0], lambda w: mg, ids=ids)  # a meta update: the teacher steps first
    with torch.no_grad():
        m0 = rw.teacher(feats[0])
    assert torch.allclose(w0, normalize(m0), atol=1e-6)  # the first visit: the teacher's own weights
    assert torch.isnan(rw.memory.values).all()  # staged, not yet written
    rw.end_update()
    assert torch.allclose(rw.memory.values[ids], m0) and torch.isnan(rw.memory.values[[1, 3, 5, 7]]).all()
    # the second visit (no meta update): the average, normalised over the batch
    w1, _ = rw.weights(1, feats[1], None, ids=ids)
    with torch.no_grad():
        r1 = rw.teacher(feats[1])
    want = normalize(d * m0 + (1 - d) * r1)
    assert torch.allclose(w1, want, atol=1e-6) and not torch.allclose(w1, normalize(r1), atol=1e-3)
    rw.end_update()
    # a batch of old and new examples, on a meta update: the gradient through the teacher is the average's
    mixed_ids = torch.tensor([1, 2, 3, 4, 5, 6])
    prev = rw.memory.values[mixed_ids].clone()
    rw.meta_interval = 1
    w2, graph = rw.teacher_weights(2, feats[2], mixed_ids)
    raw = rw.teacher(feats[2])
    # an unvisited example's memory starts at the output: its value, with the (1 - d) gradient of every visit
    ref = normalize(d * torch.where(torch.isnan(prev), raw.detach(), prev) + (1 - d) * raw)
    assert torch.allclose(w2, ref.detach(), atol=1e-6)
    v = torch.randn(6)
    params = list(rw.teacher.parameters())
    for a, b in zip(torch.autograd.grad(graph @ v, params, allow_unused=True),
                    torch.autograd.grad(ref @ v, params, allow_unused=True)):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)
    rw.zero_teacher_grad()
    rw.end_update()
    assert torch.allclose(rw.memory.values[mixed_ids],
                          torch.where(torch.isnan(prev), raw, d * torch.nan_to_num(prev) + (1 - d) * raw).detach())
    # saved and restored with the teacher; refused on a training set of another size; ids are checked
    again = Reweighter("deep", teacher_lr=1e-2, weight_ema=d, num_examples=10)
    again.load_state_dict(rw.state_dict())
    assert torch.equal(again.memory.values.nan_to_num(-1), rw.memory.values.nan_to_num(-1))
    with pytest.raises(ValueError, match="same data, or --reset-teacher"):
        Reweighter("deep", weight_ema=d, num_examples=11).load_state_dict(rw.state_dict())
    with pytest.raises(IndexError, match=r"within \[0, 10\)"):
        rw.weights(3, feats[0], None, ids=ids + 5)
    with pytest.raises(ValueError, match="ids"):
        rw.weights(3, feats[0], None)
    with pytest.raises(ValueError, match=r"--weight-ema must be in \[0, 1\)"):
        WeightMemory(1.0, 10)
