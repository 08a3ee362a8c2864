"""Image module: data formats, noise, meta split, students, the meta-gradient glue, and training
through the command line -- all on small synthetic CIFAR-format and IDX files written here."""

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fairseq_reweight.core import LayerProbe, first_order, meta_direction, weight_gradient
from fairseq_reweight.image import student
from fairseq_reweight.image.augment import Augment
from fairseq_reweight.image.cli import main, parse_config
from fairseq_reweight.image import data
from fairseq_reweight.image.data import DataError, load_dataset, read_idx
from fairseq_reweight.image.models import build_model
from fairseq_reweight.image.noise import balanced_split, corrupt
from fairseq_reweight.image.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Small models run fastest on one thread; the runs below set it too (--threads 1). Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------- synthetic data
def _images(labels, shape, seed):
    """Class prototypes plus pixel noise: learnable by a tiny network in a few updates."""
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(123).integers(0, 256, size=(10,) + shape)
    x = protos[labels] + rng.normal(0, 25, size=(len(labels),) + shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def _labels(per_class, seed):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), per_class))


def _write_idx(path: Path, arr: np.ndarray, gz: bool):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_fashion(root: Path, per_class=60, test_per_class=20, size=8, gz=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n, seed in (("train", per_class, 0), ("t10k", test_per_class, 1)):
        y = _labels(n, seed)
        _write_idx(root / f"{split}-images-idx3-ubyte{ext}", _images(y, (size, size), seed), gz)
        _write_idx(root / f"{split}-labels-idx1-ubyte{ext}", y, gz)
    return root


def write_cifar(root: Path, num_classes=10, per_class=20) -> Path:
    """The python-pickle layout of cifar-10-batches-py (5 train batches) or cifar-100-python."""
    root.mkdir(parents=True, exist_ok=True)
    y = np.random.default_rng(0).permutation(np.repeat(np.arange(num_classes), per_class))
    x = np.random.default_rng(1).integers(0, 256, size=(len(y), 3072), dtype=np.uint8)
    key = b"labels" if num_classes == 10 else b"fine_labels"
    if num_classes == 10:
        files = {f"data_batch_{i + 1}": part for i, part in enumerate(np.array_split(np.arange(len(y)), 5))}
        files["test_batch"] = np.arange(10)
    else:
        files = {"train": np.arange(len(y)), "test": np.arange(10)}
    for name, idx in files.items():
        with open(root / name, "wb") as f:
            pickle.dump({b"data": x[idx], key: y[idx].tolist()}, f, protocol=2)
    return root


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("fashion"))


def tiny_args(data_dir, save_dir, method, *extra):
    args = ["--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--arch", "resnet8", "--train-size", "200",
            "--meta-size", "50", "--batch-size", "20", "--epochs", "1", "--lr-steps", "", "--eval-batch-size", "200",
            "--reweight-method", method, "--save-dir", str(save_dir), "--no-progress", "--threads", "1"]
    return args + list(extra)


# ---------------------------------------------------------------------- data formats
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_roundtrip(tmp_path, gz):
    root = write_fashion(tmp_path / "f", per_class=3, test_per_class=2, size=5, gz=gz)
    d = load_dataset("fashion-mnist", str(root))
    assert d.train_x.shape == (30, 1, 5, 5) and d.test_x.shape == (20, 1, 5, 5)
    assert np.array_equal(d.train_y, _labels(3, 0)) and d.num_classes == 10 and d.in_channels == 1
    assert np.array_equal(d.train_x[:, 0], _images(_labels(3, 0), (5, 5), 0))


def test_fashion_mnist_errors_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"))
    root = write_fashion(tmp_path / "f", per_class=2, test_per_class=1, size=4)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05ab"))
    with pytest.raises(DataError, match="IDX header"):
        load_dataset("fashion-mnist", str(root))
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(write_fashion(tmp_path / "env", per_class=2, test_per_class=1, size=4)))
    assert len(load_dataset("fashion-mnist").train_y) == 20  # the environment variable is the default


@pytest.mark.parametrize("name,k", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_pickles(tmp_path, name, k):
    sub = "cifar-10-batches-py" if k == 10 else "cifar-100-python"
    write_cifar(tmp_path / sub, num_classes=k, per_class=2)
    for where in (tmp_path / sub, tmp_path):  # the directory itself or its parent
        d = load_dataset(name, str(where))
        assert d.train_x.shape == (2 * k, 3, 32, 32) and d.test_x.shape == (10, 3, 32, 32)
        assert d.num_classes == k and sorted(np.bincount(d.train_y, minlength=k)) == [2] * k


def test_cifar_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    with pytest.raises(DataError, match="--download"):
        load_dataset("cifar10", str(tmp_path / "missing"))
    root = write_cifar(tmp_path / "cifar-10-batches-py", per_class=2)
    with open(root / "test_batch", "wb") as f:  # a pickle that would run code when loaded
        pickle.dump(os.system, f)
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", str(root))
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="3072"):
        load_dataset("cifar10", str(root))
    with pytest.raises(DataError, match="unknown --dataset"):
        load_dataset("mnist")


def test_cifar_download_only_when_asked(tmp_path, monkeypatch):
    src = write_cifar(tmp_path / "src" / "cifar-10-batches-py", per_class=1)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    blob = archive.read_bytes()
    info = dataclasses.replace(data.DATASETS["cifar10"], md5=hashlib.md5(blob).hexdigest())
    monkeypatch.setitem(data.DATASETS, "cifar10", info)
    fetched = []
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: fetched.append(url) or io.BytesIO(blob))
    with pytest.raises(DataError):
        load_dataset("cifar10", str(tmp_path / "dl"))
    assert not fetched
    d = load_dataset("cifar10", str(tmp_path / "dl"), download=True)
    assert fetched == [info.url] and d.train_x.shape == (10, 3, 32, 32)
    assert (tmp_path / "dl" / "cifar-10-batches-py" / "test_batch").is_file()
    load_dataset("cifar10", str(tmp_path / "dl"), download=True)  # present: not fetched again
    assert len(fetched) == 1

    def offline(url, timeout):
        raise OSError("network unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download"):
        load_dataset("cifar10", str(tmp_path / "elsewhere"), download=True)


# ---------------------------------------------------------------------- noise and meta set
def test_uniform_noise_is_exact_and_flagged():
    y = np.repeat(np.arange(10), 500)
    n = corrupt(y, 10, "uniform", 0.4, seed=3)
    for c in range(10):
        assert n.resampled[y == c].sum() == 200  # exactly p of every class is resampled
    assert np.array_equal(n.noisy, n.labels != y) and not n.noisy[~n.resampled].any()
    assert abs(n.noisy.mean() - 0.4 * 9 / 10) < 0.02  # resampled from all classes: p (K-1)/K wrong
    assert abs(np.bincount(n.labels[n.noisy], minlength=10) / n.noisy.sum() - 0.1).max() < 0.03
    again = corrupt(y, 10, "uniform", 0.4, seed=3)
    assert np.array_equal(n.labels, again.labels)
    assert not np.array_equal(n.labels, corrupt(y, 10, "uniform", 0.4, seed=4).labels)
    assert not corrupt(y, 10, "uniform", 0.0, seed=3).noisy.any()


def test_flip_noise_is_exact_and_flagged():
    y = np.repeat(np.arange(10), 50)
    n = corrupt(y, 10, "flip", 0.2, seed=0)
    assert (n.flip_to != np.arange(10)).all()
    assert np.array_equal(n.noisy, n.resampled) and np.array_equal(n.noisy, n.labels != y)
    for c in range(10):
        assert n.noisy[y == c].sum() == 10
        assert (n.labels[(y == c) & n.noisy] == n.flip_to[c]).all()


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_noise_rate_outside_unit_interval(rate, fashion, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        corrupt(np.arange(10), 10, "uniform", rate, 0)
    with pytest.raises(SystemExit):
        main(tiny_args(fashion, tmp_path, "none", "--noise-rate", str(rate)))
    assert "--noise-rate must be in [0, 1)" in capsys.readouterr().err


def test_balanced_split():
    y = np.repeat(np.arange(10), 30)
    taken, rest = balanced_split(y, 10, 100, seed=0)
    assert len(taken) == 100 and (np.bincount(y[taken]) == 10).all()
    assert len(np.intersect1d(taken, rest)) == 0 and len(taken) + len(rest) == 300
    with pytest.raises(ValueError, match="multiple of 10"):
        balanced_split(y, 10, 105, 0)
    with pytest.raises(ValueError, match="fewer than"):
        balanced_split(y, 10, 400, 0)


def test_meta_set_is_clean_balanced_and_fixed(fashion, tmp_path):
    cfgs = [parse_config(tiny_args(fashion, tmp_path / m, m, "--noise-rate", "0.6", "--seed", str(s)))
            for m, s in (("deep", 1), ("none", 7))]
    a, b = Trainer(cfgs[0]), Trainer(cfgs[1])
    true = a.data.train_y
    rows = [line.split("\t") for line in (tmp_path / "deep" / "labels.tsv").read_text().splitlines()[1:]]
    meta_ids = np.array([int(r[0]) for r in rows if r[4] == "meta"])
    train_ids = np.array([int(r[0]) for r in rows if r[4] == "train"])
    assert len(meta_ids) == 50 and (np.bincount(true[meta_ids], minlength=10) == 5).all()
    assert np.array_equal(a.meta_y.numpy(), true[meta_ids])  # clean: the true labels
    assert all(r[3] == "0" for r in rows if r[4] == "meta")
    assert len(np.intersect1d(meta_ids, train_ids)) == 0 and np.array_equal(train_ids, a.train_ids.numpy())
    assert len(train_ids) == 200 and (np.bincount(true[train_ids], minlength=10) == 20).all()
    flags = np.array([int(r[3]) for r in rows if r[4] == "train"], dtype=bool)
    assert np.array_equal(flags, a.train_y.numpy() != true[train_ids]) and flags.any()
    # same data seed: the same meta set and noisy labels for every method and training seed
    assert torch.equal(a.meta_x, b.meta_x) and torch.equal(a.train_y, b.train_y)


# ---------------------------------------------------------------------- students and glue
def test_models_parameters_and_states():
    assert abs(sum(p.numel() for p in build_model("resnet32", 10).parameters()) - 0.46e6) < 0.01e6
    assert abs(sum(p.numel() for p in build_model("wrn-28-10", 10).parameters()) - 36.5e6) < 0.1e6
    for arch in ("resnet8", "wrn-10-2"):
        m = build_model(arch, 7, in_channels=1).eval()
        x = torch.randn(3, 1, 12, 12)
        logits, states = m(x, states=True)
        assert logits.shape == (3, 7) and len(states) == m.num_states == 3
        assert torch.allclose(m.fc(states[-1]), logits)  # the last state is the penultimate features
        assert torch.equal(m(x), logits)
    with pytest.raises(ValueError, match="6n\\+2"):
        build_model("resnet9", 10)
    with pytest.raises(ValueError, match="unknown --arch"):
        build_model("vgg16", 10)
    assert student.parse_teacher_states("last", 3) == [2] and student.parse_teacher_states("1,3", 3) == [0, 2]
    with pytest.raises(ValueError, match="1..3"):
        student.parse_teacher_states("4", 3)


def test_augment():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    aug = Augment([0.5] * 3, [0.25] * 3, pad=2, flip=True)
    a = aug(x, torch.Generator().manual_seed(0))
    assert a.shape == (16, 3, 8, 8) and torch.equal(a, aug(x, torch.Generator().manual_seed(0)))
    plain = aug.normalize(x)
    assert torch.allclose(plain * 0.25 + 0.5, x.float() / 255)
    # flips only: every image is itself or its mirror, and both occur
    flips = Augment([0.5] * 3, [0.25] * 3, pad=0, flip=True)(x, torch.Generator().manual_seed(1))
    same = [torch.equal(f, p) for f, p in zip(flips, plain)]
    mirrored = [torch.equal(f, p.flip(-1)) for f, p in zip(flips, plain)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    # crops: a window of the reflect-padded image
    crop = Augment([0.0], [1.0], pad=2, flip=False)(x[:, :1], torch.Generator().manual_seed(2))
    padded = F.pad(x[:, :1].float() / 255, (2, 2, 2, 2), mode="reflect")
    for img, p in zip(crop, padded):
        assert any(torch.equal(img, p[:, i:i + 8, j:j + 8]) for i in range(5) for j in range(5))
    assert torch.equal(Augment([0.5] * 3, [0.25] * 3, enabled=False)(x), plain)


def _glue_batch(dtype=torch.float32):
    torch.manual_seed(0)
    model = build_model("resnet8", 10, in_channels=1).to(dtype).train()
    x, y = torch.randn(12, 1, 8, 8, dtype=dtype), torch.randint(0, 10, (12,))
    xm, ym = torch.randn(16, 1, 8, 8, dtype=dtype), torch.randint(0, 10, (16,))
    return model, x, y, xm, ym


@pytest.mark.parametrize("mode", ["fd", "exact"])
def test_meta_gradient_leaves_batchnorm_statistics_alone(mode):
    model, x, y, xm, ym = _glue_batch()
    before = {n: b.clone() for n, b in model.named_buffers()}
    out = student.forward(model, x, y, states=False)
    after_forward = {n: b.clone() for n, b in model.named_buffers()}
    assert any(not torch.equal(before[n], after_forward[n]) for n in before)  # the real forward does move them
    fn = student.meta_grad_fn(model, x, y, out.losses, xm, ym, lr=0.1, mode=mode)
    mg = fn(torch.ones(12))
    assert torch.isfinite(mg.grad_w).all() and mg.grad_w.abs().sum() > 0
    for n, b in model.named_buffers():
        assert torch.equal(b, after_forward[n]), n
    out.losses.sum().backward()  # the caller's backward still works


@pytest.mark.parametrize("part", ["block", "stage", "all"])
def test_tail_replay_matches_per_example_autograd(part):
    """--meta-params block/stage/all (core/replay.py): <v, grad l_i> for every example from two replays of the
    tail (or one, from the training forward's losses), against per-example autograd through the batch's own forward (BatchNorm's coupling of the batch
    included); the replays leave the BatchNorm statistics alone."""
    torch.manual_seed(0)
    model = build_model("resnet14", 10, in_channels=1).double().train()  # 2 blocks per stage: block != stage
    x, y = torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (12,))
    tail = student.probe_layers(model, part, labels=lambda: y, fd_eps=1e-6)
    mine = {id(p) for p in tail.parameters().values()}
    prefix = {"block": ("stages.2.1.", "fc."), "stage": ("stages.2.", "fc."), "all": ("",)}[part]
    assert mine == {id(p) for n, p in model.named_parameters() if n.startswith(prefix)}
    v = {n: torch.randn_like(p) for n, p in tail.parameters().items()}
    with tail.watch():
        losses = student.forward(model, x, y, states=False).losses
    params = tail.parameters()
    exact = torch.stack([sum((g * v[n]).sum() for n, g in zip(params, torch.autograd.grad(
        losses[i], list(params.values()), retain_graph=True))) for i in range(12)])
    after_forward = {n: b.clone() for n, b in model.named_buffers()}
    dots = tail.example_dots(v, 12)
    assert torch.allclose(dots, exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max())), (dots, exact)
    # one replay when the training forward's losses are given (a forward difference: the default's path)
    one_sided = tail.example_dots(v, 12, base=losses)
    assert torch.allclose(one_sided, exact, rtol=1e-4, atol=1e-5 * float(exact.abs().max())), (one_sided, exact)
    assert not torch.allclose(tail.example_dots(v, 12, base=losses + 1e-3), exact, rtol=0.01)  # base is read
    for n, b in model.named_buffers():
        assert torch.equal(b, after_forward[n]), n
    # the same inner products from probes of the block's convolutions (the student's backward at their outputs,
    # divided by uneven weights) are off: BatchNorm mixes the other examples' losses into those gradients
    if part == "block":
        convs = [(n, m, 0) for n, m in model.stages[2][1].named_modules() if isinstance(m, torch.nn.Conv2d)]
        probe = LayerProbe(convs + [("fc", model.fc, 0)])
        w = torch.linspace(0.05, 2.0, 12, dtype=torch.float64)
        with probe.watch(capture_grads=True):
            out = student.forward(model, x, y, states=False)
        ((w * out.losses).sum()).backward()
        model.zero_grad()
        vp = {k: v[k if k.startswith("fc.") else "blocks.0." + k] for k in probe.parameters()}
        probed = first_order(probe, vp, torch.tensor(0.0), -1.0, 1.0, 12, weights=w).grad_w
        assert not torch.allclose(probed, exact, rtol=0.05, atol=1e-3 * float(exact.abs().max()))


@pytest.mark.parametrize("part", ["fc", "stage"])
def test_fast_meta_gradient_matches_exact(part):
    """--meta-grad fast (first-order) against the exact second-order meta-gradient with the look-ahead on the same
    parameters: equal up to O(lr). ``fc``: the classifier's probe, from the student's own backward divided by the
    weights; ``stage``: the last stage + classifier by the tail replay (core/replay.py), BatchNorm included."""
    model, x, y, xm, ym = _glue_batch(torch.float64)
    layers = student.probe_layers(model, part, labels=lambda: y, fd_eps=1e-6)
    probe = LayerProbe(layers) if part == "fc" else layers
    before = {n: b.clone() for n, b in model.named_buffers()}
    direction = probe.meta_direction(list(model.parameters()), lambda: student.meta_loss(model, xm, ym))
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n  # the meta pass does not move the BatchNorm statistics
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again
    w = torch.rand(12, dtype=torch.float64) + 0.5
    with probe.watch(capture_grads=True):
        out = student.forward(model, x, y, states=False)
    ((w * out.losses).sum() / 12).backward()
    lr = 1e-3
    fast = first_order(probe, *direction, lr, 12.0, 12, weights=w, loss_scale=1 / 12).grad_w
    model.zero_grad()
    bufs = student.replay_buffers(model)

    def tl(p):
        return F.cross_entropy(torch.func.functional_call(model, {**student.replay_buffers(model), **p}, (x,)), y,
                               reduction="none")

    def ml(p):
        return F.cross_entropy(torch.func.functional_call(model, {**bufs, **p}, (xm,)), ym)

    mine = {id(p) for p in probe.parameters().values()}
    sub = {n: p for n, p in model.named_parameters() if id(p) in mine}
    assert len(sub) == len(mine) and "fc.weight" in sub and (part == "fc") != any(n.startswith("stages.2.") for n in sub)
    exact = weight_gradient(sub, tl, ml, w, lr, 12.0, mode="exact").grad_w
    assert F.cosine_similarity(fast, exact, dim=0) > 0.999
    assert torch.allclose(fast, exact, rtol=0.05, atol=1e-3 * float(exact.abs().max()))
    exact_all = weight_gradient(dict(model.named_parameters()), tl, ml, w, lr, 12.0, mode="exact").grad_w
    print(f"image: cosine(fast on {part}, exact on all parameters) = {F.cosine_similarity(fast, exact_all, dim=0):.3f}")


def test_fd_meta_gradient_matches_exact_on_the_image_student():
    for dtype, fd_eps, min_cos in ((torch.float32, 1e-3, 0.99), (torch.float64, 1e-7, 0.99999)):
        model, x, y, xm, ym = _glue_batch(dtype)
        out = student.forward(model, x, y, states=False)
        w = torch.rand(12, dtype=dtype) + 0.5
        fast = student.meta_grad_fn(model, x, y, out.losses, xm, ym, 0.1, "fd", fd_eps)(w).grad_w
        exact = student.meta_grad_fn(model, x, y, out.losses, xm, ym, 0.1, "exact")(w).grad_w
        assert F.cosine_similarity(fast, exact, dim=0) > min_cos, dtype
    # and the closure is the core's weight_gradient on a functional copy of the student
    params = dict(model.named_parameters())
    bufs = student.replay_buffers(model)

    def tl(p):
        return F.cross_entropy(torch.func.functional_call(model, {**student.replay_buffers(model), **p}, (x,)), y,
                               reduction="none")

    def ml(p):
        return F.cross_entropy(torch.func.functional_call(model, {**bufs, **p}, (xm,)), ym)

    ref = weight_gradient(params, tl, ml, w, 0.1, 12.0, mode="exact").grad_w
    assert torch.allclose(exact, ref)


def test_teacher_features():
    out = student.StudentOutput(torch.zeros(4, 10), torch.tensor([0.5, 1.0, 2.0, 3.0]),
                                [torch.ones(4, 2), torch.ones(4, 3), torch.full((4, 5), 2.0)])
    y = torch.tensor([0, 1, 2, 3])
    assert torch.equal(student.teacher_features("mwnet", out, y, 10, [], 0.3), out.losses[:, None])
    assert student.teacher_features("none", out, y, 10, [], 0.3) is None
    f = student.teacher_features("deep", out, y, 10, [0, 2], 0.3)
    assert f.shape == (4, 2 + 5 + 1 + 10 + 1)
    k = student.passthrough("deep", 10)
    assert k == 11 and torch.equal(f[:, -k:-1], F.one_hot(y, 10).float()) and (f[:, -1] == 0.3).all()
    assert torch.equal(f[:, -k - 1], out.losses)


# ---------------------------------------------------------------------- training through the CLI
@pytest.mark.parametrize("method", ["none", "l2rw", "mwnet", "deep"])
def test_cli_trains_each_method(method, fashion, tmp_path):
    extra = ["--meta-interval", "2"] if method in ("mwnet", "deep") else []
    dump = tmp_path / "w.tsv"
    summary = main(tiny_args(fashion, tmp_path / "run", method, "--dump-weights", str(dump), "--epochs", "2", *extra))
    assert summary["finished"] and summary["updates"] == 20
    assert summary["meta_steps"] == {"none": 0, "l2rw": 20, "mwnet": 10, "deep": 10}[method]
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2] and log["config"]["reweight_method"] == method
    # the tuned recipe (the default) caps and decays the deep teacher; the other methods keep their published forms
    want = (2.0, 3.0) if method == "deep" else (None, 0.0)
    assert (log["config"]["max_weight"], log["config"]["teacher_weight_decay"]) == want
    assert 0 <= log["summary"]["last_test_acc"] <= 100 and log["summary"]["sec_per_iter"] > 0
    assert (tmp_path / "run" / "log.csv").read_text().count("\n") == 3
    rows = [line.split("\t") for line in dump.read_text().splitlines()]
    assert rows[0] == ["update", "id", "weight", "loss"] and len(rows) == 1 + 2 * 200
    ids = {int(r[1]) for r in rows[1:]}
    labels = (tmp_path / "run" / "labels.tsv").read_text().splitlines()[1:]
    assert ids == {int(line.split("\t")[0]) for line in labels if line.endswith("train")}
    w = np.array([float(r[2]) for r in rows[1:]]).reshape(20, 20)
    assert np.allclose(w.mean(1), 1.0, atol=1e-4)
    if method == "none":
        assert (w == 1).all()
    if method == "deep":
        assert w.max() <= 2.0 + 1e-5


def test_cli_weight_norm_running(fashion, tmp_path):
    """--weight-norm running on images (the same core as NMT): after the first update the batch means of the
    weights are the teacher's outputs over their running mean, no longer 1 in every batch."""
    dump = tmp_path / "w.tsv"
    summary = main(tiny_args(fashion, tmp_path / "run", "mwnet", "--dump-weights", str(dump), "--weight-norm",
                             "running", "--max-weight", "3"))
    assert summary["finished"] and summary["updates"] == 10
    rows = [line.split("\t") for line in dump.read_text().splitlines()[1:]]
    w = np.array([float(r[2]) for r in rows]).reshape(10, 20)
    assert w[0].mean() == pytest.approx(1.0, abs=1e-4)  # first update: nothing to average yet
    assert np.abs(w[1:].mean(1) - 1).max() > 1e-3 and w.max() <= 3.0 + 1e-5
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["config"]["weight_norm"] == "running"


def test_image_recipe_paper_and_explicit_flags():
    """--reweight-recipe paper: Fan et al.'s uncapped, undecayed teacher with a fresh meta direction every update;
    explicit flags win over the recipe (--max-weight 0: no cap); fd/exact keep the fast-only flags plain."""
    from fairseq_reweight.image.train import TrainConfig, check_config

    for kw, want in (({}, (2.0, 3.0, 5, 0.9, "loss", 0.5, 0.8)),
                     ({"reweight_recipe": "paper"}, (None, 0.0, 1, 0.0, "none", 2.0, 0.0)),
                     ({"max_weight": 0.0}, (None, 3.0, 5, 0.9, "loss", 0.5, 0.8)),
                     ({"teacher_weight_decay": 1.0, "max_weight": 3.0, "meta_refresh": 2}, (3.0, 1.0, 2, 0.9, "loss", 0.5, 0.8)),
                     ({"reweight_method": "mwnet"}, (None, 0.0, 1, 0.0, "none", 2.0, 0.0)),
                     ({"reweight_method": "mwnet", "weight_ema": 0.5}, (None, 0.0, 1, 0.0, "none", 2.0, 0.5)),
                     ({"meta_grad": "fd"}, (2.0, 3.0, 1, 0.0, "loss", 0.5, 0.8)),
                     ({"teacher_prior": "none", "weight_ema": 0.0}, (2.0, 3.0, 5, 0.9, "none", 0.5, 0.0))):
        cfg = TrainConfig(**kw)
        check_config(cfg)
        assert (cfg.max_weight, cfg.teacher_weight_decay, cfg.meta_refresh, cfg.meta_ema, cfg.teacher_prior,
                cfg.teacher_prior_scale, cfg.weight_ema) == want, kw
    assert TrainConfig().meta_grad == "fast" and TrainConfig().meta_params == "auto"
    with pytest.raises(ValueError, match="--weight-norm must be one of batch, running"):
        check_config(TrainConfig(weight_norm="running-length"))


@pytest.mark.parametrize("method,meta_params,extra", [
    ("l2rw", "auto", []), ("mwnet", "fc", []), ("deep", "stage,fc", []), ("deep", "block", []),
    ("deep", "fc", ["--meta-refresh", "3", "--meta-ema", "0.9"]), ("l2rw", "fc", ["--max-weight", "1.5"]),
])
def test_cli_fast_meta_gradient(method, meta_params, extra, fashion, tmp_path):
    """--meta-grad fast through the CLI: the teacher moves, weights are finite and normalised; with
    --meta-refresh 3 a fresh meta direction is computed at updates 0, 3, 6, 9 only (deep's default, 5: 0, 5)."""
    summary = main(tiny_args(fashion, tmp_path / "run", method, "--meta-grad", "fast", "--meta-params", meta_params,
                             "--dump-weights", str(tmp_path / "w.tsv"), *extra))
    assert summary["finished"] and summary["meta_steps"] == 10 and summary["meta_skipped"] == 0
    saved = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)["meta_direction"]
    assert (saved["calls"], saved["fresh"]) == (10, 4 if "--meta-refresh" in extra else 2 if method == "deep" else 10)
    w = np.loadtxt(tmp_path / "w.tsv", skiprows=1)[:, 2].reshape(10, 20)
    assert np.isfinite(w).all() and w[-1].std() > 1e-4  # not uniform: the teacher (or l2rw) reacted
    full = (w > 0).sum(1) >= 20 / 1.5 if "--max-weight" in extra else np.ones(10, bool)
    assert np.allclose(w.mean(1)[full], 1.0, atol=1e-4) and full.sum() >= 5
    if "--max-weight" in extra:  # l2rw's raw weights are heavy-tailed: the cap binds; a batch with fewer than
        assert w.max() == pytest.approx(1.5, abs=1e-5)  # B / cap helpful examples sums to less than B
        assert (w.mean(1)[~full] < 1).all()


def test_cli_flag_errors(fashion, tmp_path, capsys):
    for method, extra, msg in [
        ("none", ["--teacher-lr", "1e-2"], "--teacher-lr has no effect"),
        ("l2rw", ["--teacher-lr", "1e-2"], "--teacher-lr has no effect"),
        ("l2rw", ["--teacher-weight-decay", "1"], "--teacher-weight-decay has no effect"),
        ("l2rw", ["--meta-interval", "3"], "drop --meta-interval"),
        ("mwnet", ["--teacher-states", "all"], "--teacher-states only applies"),
        ("mwnet", ["--meta-grad", "fd", "--meta-ema", "0.9"], "--meta-refresh/--meta-ema reuse and average"),
        ("deep", ["--meta-size", "0"], "needs a clean meta set"),
        ("none", ["--max-weight", "2"], "--max-weight caps the weights"),
        ("mwnet", ["--max-weight", "0.5"], "--max-weight must be > 1"),
        ("none", ["--resume"], "no checkpoint"),
        ("none", ["--data-dir", str(tmp_path / "void")], "apt-get install"),
        ("mwnet", ["--teacher-prior", "loss"], "keeps its published form"),
        ("l2rw", ["--weight-ema", "0.5"], "--weight-ema averages a teacher's weights"),
        ("deep", ["--weight-ema", "1"], "--weight-ema must be in [0, 1)"),
    ]:
        with pytest.raises(SystemExit):
            main(tiny_args(fashion, tmp_path / "e", method, *extra))
        assert msg in capsys.readouterr().err


def test_module_entry_point(fashion, tmp_path):
    p = subprocess.run([sys.executable, "-m", "fairseq_reweight.image", *tiny_args(fashion, tmp_path, "mwnet"),
                        "--teacher-lr", "1e-2"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "epoch 1 |" in p.stdout and json.loads((tmp_path / "log.json").read_text())["summary"]["finished"]


def test_resume_restores_teacher_and_continues_exactly(fashion, tmp_path):
    def args(name, *extra):  # a fixed progress horizon: the first leg of b is the first epoch of a
        return tiny_args(fashion, tmp_path / name, "deep", "--teacher-progress-horizon", "20", *extra)

    straight = main(args("a", "--epochs", "2", "--dump-weights", str(tmp_path / "a.tsv")))
    main(args("b", "--epochs", "1", "--dump-weights", str(tmp_path / "b.tsv")))
    ckpt = torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=True)  # plain tensors and containers
    saved = ckpt["reweighter"]
    assert saved["meta_steps"] == 10 and ckpt["epoch"] == 1 and ckpt["updates"] == 10
    assert not saved["weight_memory"]["values"].isnan().any()  # --weight-ema (default): every example's weight
    with open(tmp_path / "b.tsv", "a") as f:  # rows of an update after the checkpoint, as if interrupted
        f.write("10\t1\t1.0\t1.0\n")
    cfg = parse_config(args("b", "--epochs", "2", "--resume", "--dump-weights", str(tmp_path / "b.tsv")))
    trainer = Trainer(cfg)
    restored = trainer.reweighter.state_dict()
    assert restored["meta_steps"] == 10
    for k, v in saved["teacher"].items():
        assert torch.equal(restored["teacher"][k], v), k
    resumed = trainer.run()
    assert resumed["updates"] == straight["updates"] == 20 and resumed["meta_steps"] == 20
    a = torch.load(tmp_path / "a" / "checkpoint_last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=True)
    for sa, sb in ((a["model"], b["model"]), (a["reweighter"]["teacher"], b["reweighter"]["teacher"])):
        for k in sa:
            assert torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6), k
    assert (tmp_path / "a.tsv").read_text() == (tmp_path / "b.tsv").read_text()
    assert [r["epoch"] for r in json.loads((tmp_path / "b" / "log.json").read_text())["epochs"]] == [1, 2]
    # a fresh teacher on request, and no resuming into other settings
    fresh = Trainer(parse_config(tiny_args(fashion, tmp_path / "b", "deep", "--epochs", "3", "--resume",
                                           "--reset-teacher")))
    assert fresh.reweighter.state_dict() == {} and fresh.updates == 20
    with pytest.raises(ValueError, match="--noise-rate"):
        Trainer(parse_config(tiny_args(fashion, tmp_path / "b", "deep", "--resume", "--noise-rate", "0.2")))


def test_deep_teacher_separates_flipped_labels(tmp_path):
    """40% flip noise on a small synthetic problem: the deep teacher (states + label + loss) learns to
    give the flipped examples lower weights than the clean ones (AUC of the last epoch's weights), from the
    meta-gradient alone (no loss prior)."""
    root = write_fashion(tmp_path / "data", per_class=220)
    cfg = parse_config(["--dataset", "fashion-mnist", "--data-dir", str(root), "--arch", "resnet8",
                        "--noise", "flip", "--noise-rate", "0.4", "--meta-size", "200", "--batch-size", "50",
                        "--epochs", "9", "--lr-steps", "", "--lr", "0.02", "--teacher-lr", "3e-3", "--no-augment",
                        "--reweight-method", "deep", "--teacher-prior", "none", "--save-dir", str(tmp_path / "run"), "--no-progress"])
    summary = Trainer(cfg).run()
    assert summary["last_weight_auc"] > 0.8, summary
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["epochs"][0]["weight_auc"] < 0.7  # it is learned: the teacher starts near uniform weights
    assert log["epochs"][-1]["w_noisy"] < 0.5 * log["epochs"][-1]["w_clean"]


def test_loss_prior_ranks_by_the_loss_from_the_first_update(fashion, tmp_path):
    """--teacher-prior loss (deep's default): before the teacher has learned anything (its MLP starts at zero; a
    negligible teacher lr keeps it there) the weights of every batch fall as the example's loss rises; without the
    prior they are all one. The prior's scale is saved with the teacher, and resuming without the prior is refused."""
    def run(name, *extra):
        dump = tmp_path / f"{name}.tsv"
        main(tiny_args(fashion, tmp_path / name, "deep", "--teacher-lr", "1e-12", "--teacher-weight-decay", "0",
                       "--dump-weights", str(dump), *extra))
        return np.loadtxt(dump, skiprows=1).reshape(10, 20, 4)  # update, id, weight, loss

    rows = run("prior")  # the default
    for batch in rows:
        order = np.argsort(batch[:, 3])
        w = batch[order, 2]
        assert (np.diff(w) <= 1e-6).all() and w[0] > w[-1] + 0.1
    assert np.allclose(run("plain", "--teacher-prior", "none")[0, :, 2], 1.0)
    saved = torch.load(tmp_path / "prior" / "checkpoint_last.pt", weights_only=True)
    assert saved["config"]["teacher_prior"] == "loss"
    assert float(saved["reweighter"]["teacher"]["prior_scale"]) == pytest.approx(-0.5, abs=1e-6)
    with pytest.raises(ValueError, match="--teacher-prior loss -> none"):
        Trainer(parse_config(tiny_args(fashion, tmp_path / "prior", "deep", "--epochs", "2", "--resume",
                                       "--teacher-prior", "none")))


def test_compare_writes_results_and_skips_finished_runs(fashion, tmp_path, capsys):
    """The grid (noise x method x seed) side by side, the report and results.json, finished runs skipped, rows of
    runs no longer on disk carried over, and per-run flags refused with the fix."""
    from fairseq_reweight.image import compare

    report = tmp_path / "report" / "RESULTS.md"
    args = ["--out", str(tmp_path / "runs"), "--results", str(report), "--methods", "none,deep", "--seeds", "1,2",
            "--noise", "uniform0.4,flip0.3", "--jobs", "2", "--threads", "1",
            *tiny_args(fashion, "unused", "none")[:18], "--deep-args", "--max-weight 1.5 --teacher-weight-decay 2"]
    compare.main(args)  # none would refuse --max-weight: the deep-only flags must reach deep alone
    log = json.loads((tmp_path / "runs" / "flip0.3" / "deep" / "seed2" / "log.json").read_text())
    cfg = log["config"]
    assert (cfg["max_weight"], cfg["teacher_weight_decay"], cfg["noise"], cfg["noise_rate"], cfg["seed"]) == \
        (1.5, 2.0, "flip", 0.3, 2)
    rows = json.loads((tmp_path / "report" / "results.json").read_text())
    assert sorted((r["noise"], r["method"], r["seed"]) for r in rows) == sorted(
        (n, m, s) for n in ("uniform0.4", "flip0.3") for m in ("none", "deep") for s in (1, 2))
    by = {(r["noise"], r["method"], r["seed"]): r for r in rows}
    assert by[("flip0.3", "deep", 2)]["acc"] == log["summary"]["last_test_acc"]
    assert by[("flip0.3", "deep", 2)]["auc"] == log["summary"]["last_weight_auc"]
    assert by[("uniform0.4", "none", 1)]["auc"] is None
    text = report.read_text()
    assert "## uniform noise, p = 0.4" in text and "## flip noise, p = 0.3" in text and "weight AUC of deep >= 0.93" in text
    mean = (by[("flip0.3", "deep", 1)]["acc"] + by[("flip0.3", "deep", 2)]["acc"]) / 2
    assert f"**{mean:.2f}**" in text
    for name in ("accuracy_uniform0.4.png", "weights_flip0.3.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    capsys.readouterr()
    compare.main(args)
    assert capsys.readouterr().out.count("finished run") == 8
    # a fresh machine: the runs are gone, results.json keeps their rows and the report marks them
    import shutil
    shutil.rmtree(tmp_path / "runs" / "flip0.3")
    for name in ("accuracy_flip0.3.png", "weights_flip0.3.png"):
        (tmp_path / "report" / name).unlink()
    compare.main(args[:args.index("--jobs")] + ["--report-only"])
    rows = json.loads((tmp_path / "report" / "results.json").read_text())
    assert len(rows) == 8 and "carried over" in report.read_text() and f"**{mean:.2f}**" in report.read_text()
    # the carried rows keep their curves and histograms, and the plots are drawn from them
    carried = {(r["method"], r["seed"]): r for r in rows if r["noise"] == "flip0.3"}
    assert carried[("deep", 2)]["acc_by_epoch"] == [e["test_acc"] for e in log["epochs"]]
    assert carried[("deep", 2)]["auc_by_epoch"] == [e["weight_auc"] for e in log["epochs"]]
    hist = carried[("deep", 1)]["weight_hist"]
    assert sum(hist["clean"]) + sum(hist["noisy"]) == 200 and sum(hist["noisy"]) > 0  # the last epoch's examples
    uniform = carried[("none", 1)]["weight_hist"]  # every weight 1: one bin
    assert max(uniform["clean"]) == sum(uniform["clean"]) > 0 and max(uniform["noisy"]) == sum(uniform["noisy"]) > 0
    for name in ("accuracy_flip0.3.png", "weights_flip0.3.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    for bad, fix in (("--noise-rate", "--noise TYPE"), ("--noise=gauss0.4", "TYPE one of uniform, flip")):
        with pytest.raises(SystemExit):
            compare.main(["--out", str(tmp_path / "x"), bad] + (["0.2"] if "=" not in bad else []))
        assert fix in capsys.readouterr().err


def test_torchrun_two_workers_keep_one_teacher(fashion, tmp_path):
    """torchrun DDP (2 CPU processes, gloo): each worker takes its own batches, the teacher is checked
    identical on both after every meta update, rank 0 writes the checkpoint and logs, and it resumes."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"

    def launch(*extra):
        cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "fairseq_reweight.image",
               *tiny_args(fashion, tmp_path / "run", "deep", "--meta-grad", "fast", "--dump-weights",
                          str(tmp_path / "w.tsv"), *extra)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout + p.stderr

    out = launch()
    assert "teacher identical on all 2 workers" in out
    # --weight-ema (default): rank 0's memory holds the weights of both workers' examples (summed over workers)
    memory = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)["reweighter"]["weight_memory"]
    assert memory["values"].numel() == 200 and not memory["values"].isnan().any()
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["summary"]["updates"] == 5  # 200 images / (20 per worker x 2 workers)
    a = np.loadtxt(tmp_path / "w.tsv", skiprows=1)
    b = np.loadtxt(tmp_path / "w.tsv.rank1", skiprows=1)
    assert len(a) == len(b) == 100 and not set(a[:, 1]) & set(b[:, 1])  # disjoint batches
    for name in ("w.tsv", "w.tsv.rank1"):  # rows of an update after the checkpoint, as if interrupted
        with open(tmp_path / name, "a") as f:
            f.write("5\t1\t1.0\t1.0\n")
    out = launch("--epochs", "2", "--resume")
    assert json.loads((tmp_path / "run" / "log.json").read_text())["summary"]["updates"] == 10
    for name in ("w.tsv", "w.tsv.rank1"):  # each worker dropped its own stray row (not the other's file)
        rows = np.loadtxt(tmp_path / name, skiprows=1)
        assert len(rows) == 200 and np.array_equal(np.bincount(rows[:, 0].astype(int)), [20] * 10), name


def test_train_image_paper_script_runs_the_mwnet_protocol_with_the_defaults(tmp_path):
    """`scripts/train_image.sh paper DATASET NOISE RATE ARCH METHOD` on synthetic CIFAR-10 files: the MW-Net
    protocol's settings, the tuned deep defaults, the run folder named after the grid point (shortened budget)."""
    import subprocess
    import sys

    root = write_cifar(tmp_path / "cifar-10-batches-py", per_class=30)
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_image.sh"
    env = dict(os.environ, PYTHON=sys.executable, RUNS=str(tmp_path / "runs"), OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", str(script), "paper", "cifar10", "flip", "0.4", "resnet8", "deep", "--data-dir",
                        str(root), "--meta-size", "100", "--epochs", "1", "--batch-size", "50", "--no-progress",
                        "--threads", "1"], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    log = json.loads((tmp_path / "runs" / "paper-cifar10-flip0.4-resnet8-deep" / "log.json").read_text())
    cfg = log["config"]
    assert (cfg["dataset"], cfg["noise"], cfg["noise_rate"], cfg["arch"], cfg["reweight_method"]) == \
        ("cifar10", "flip", 0.4, "resnet8", "deep")
    assert (cfg["lr"], cfg["momentum"], cfg["weight_decay"], cfg["crop_pad"], cfg["lr_steps"]) == \
        (0.1, 0.9, 5e-4, 4, [80, 100])
    assert (cfg["max_weight"], cfg["teacher_weight_decay"]) == (2.0, 3.0)  # the tuned recipe
    assert log["summary"]["finished"] and log["summary"]["meta_images"] == 100


def test_compare_targets_pair_the_seeds_both_methods_have(tmp_path):
    """deep on seed 1 only against mwnet on seeds 1 and 2: the check compares seed 1 with seed 1 (a mean over
    other seeds would call a loss on every common seed a win)."""
    from fairseq_reweight.image import compare

    def row(method, seed, acc):
        return {"method": method, "noise": "flip0.4", "seed": seed, "acc": acc, "auc": None if method == "none" else 0.9,
                "best_acc": acc, "best_epoch": 25, "sec_per_iter": 1.0, "meta_grad": "fast"}

    rows = [row("none", 1, 67.0), row("none", 2, 64.0), row("mwnet", 1, 81.5), row("mwnet", 2, 56.7),
            row("deep", 1, 79.9)]
    text = "\n".join(compare.noise_section(compare.Noise("flip", 0.4), rows, {}, ["none", "mwnet", "deep"], [1, 2],
                                           tmp_path))
    assert "- [ ] last-epoch accuracy of deep >= mwnet (79.90 vs 81.50; seeds 1)" in text
    assert "- [x] last-epoch accuracy of deep >= none + 3 (79.90 vs 70.00; seeds 1)" in text
