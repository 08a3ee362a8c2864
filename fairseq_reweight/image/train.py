"""Training loop for noisy-label image classification with learned data reweighting.

One update (mirrors the fairseq task's ``train_step``): augment a batch, one forward giving
per-example losses and pooled internal states, ``Reweighter.weights`` (which on meta steps takes
the meta-gradient of a clean meta batch through a one-step look-ahead), then SGD on
``sum_i w_i l_i / B``. Methods: ``none``; ``l2rw`` (Ren et al. 2018); ``mwnet`` (Shu et al. 2019);
``deep`` (Fan et al. 2021). Optimisation as in MW-Net: SGD momentum 0.9, weight decay 5e-4,
lr 0.1 with step decays, batch 100, a clean class-balanced meta set of 1000 training images.

A run directory holds ``checkpoint_last.pt`` / ``checkpoint_best.pt`` (model, optimizer, lr
schedule, epoch, update count, RNG states and the teacher), ``log.json`` and ``log.csv`` (one row
per epoch), and ``labels.tsv`` (every training id with its observed and true label and the
``noisy`` flag, to score ``--dump-weights`` files).
"""

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from ..core import ReweightConfig, Reweighter, recipe, WeightDumper, auc, strategies, weight_stats
from . import student
from .augment import Augment
from .data import load_dataset
from .models import build_model
from .noise import balanced_split, check_rate, corrupt

CHECKPOINT_VERSION = 1
# settings a resumed run must share with its checkpoint
RESUME_KEYS = ("dataset", "noise", "noise_rate", "meta_size", "train_size", "data_seed", "arch", "augment", "crop_pad",
               "batch_size", "reweight_method", "teacher_states", "teacher_hidden", "teacher_prior")
# what a checkpoint written before a setting existed ran with
RESUME_LEGACY = {"teacher_prior": "none"}
TEACHER_PRIORS = ("none", "loss")


_R = ReweightConfig.__annotations__


def _like(name: str, default):
    """The field ``name`` of ReweightConfig (its help) with another default."""
    return field(default=default, metadata=ReweightConfig.__dataclass_fields__[name].metadata)


@dataclass
class TrainConfig(ReweightConfig):
    # data and noise
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    download: bool = False
    noise: str = "uniform"
    noise_rate: float = 0.4
    meta_size: int = 1000
    train_size: int = 0  # 0: every training image not in the meta set
    data_seed: int = 0
    augment: bool = True
    crop_pad: int = 4  # random-crop padding in pixels (0: flips only)
    # student and optimisation
    arch: str = "resnet32"
    epochs: int = 120
    batch_size: int = 100
    lr: float = 0.1
    lr_steps: List[int] = field(default_factory=lambda: [80, 100])
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # reweighting: the fields of core.config.ReweightConfig (the flags of the fairseq task), with these defaults:
    # fast, on the last stage and the classifier (--meta-params auto), computed by replaying that tail (core/replay.py:
    # exact per-example products despite BatchNorm); the recipe (core/recipe.py::resolve_image) sets --max-weight,
    # --teacher-weight-decay, --meta-refresh and --meta-ema; no Adam preconditioning (the student is SGD)
    meta_grad: _R["meta_grad"] = _like("meta_grad", "fast")
    teacher_weight_decay: Optional[float] = _like("teacher_weight_decay", None)
    reweight_warmup: _R["reweight_warmup"] = _like("reweight_warmup", 0)
    meta_precondition: _R["meta_precondition"] = _like("meta_precondition", "none")
    # image-only: the teacher starts from the example's loss (the lower, the higher its weight); resolve_image
    teacher_prior: str = "auto"
    teacher_prior_scale: Optional[float] = None
    # image-only: each example's weight averaged over its visits (core/memory.py); resolve_image
    weight_ema: Optional[float] = None
    # run
    save_dir: str = "runs/image"
    resume: bool = False
    seed: int = 1
    device: str = "auto"
    threads: int = 0
    eval_batch_size: int = 500
    progress: bool = True


def check_config(cfg: TrainConfig) -> None:
    m = cfg.reweight_method
    for k, v in recipe.resolve_image(str(cfg.reweight_recipe), str(m), str(cfg.meta_grad), max_weight=cfg.max_weight,
                                     teacher_weight_decay=cfg.teacher_weight_decay, weight_norm=cfg.weight_norm,
                                     meta_refresh=cfg.meta_refresh, meta_ema=cfg.meta_ema,
                                     teacher_prior=cfg.teacher_prior,
                                     teacher_prior_scale=cfg.teacher_prior_scale,
                                     weight_ema=cfg.weight_ema).items():
        setattr(cfg, k, v)
    cfg.validate()
    if cfg.teacher_prior not in TEACHER_PRIORS:
        raise ValueError(f"--teacher-prior must be one of {', '.join(TEACHER_PRIORS)}, got {cfg.teacher_prior!r}")
    if cfg.teacher_prior != "none" and m != "deep":
        raise ValueError(f"--teacher-prior {cfg.teacher_prior} is a prior of the deep teacher; --reweight-method {m} "
                         "keeps its published form: drop it, or use --reweight-method deep")
    if not 0.0 <= cfg.weight_ema < 1.0:
        raise ValueError(f"--weight-ema must be in [0, 1), got {cfg.weight_ema}")
    if cfg.weight_ema > 0 and m not in ("mwnet", "deep"):
        raise ValueError(f"--weight-ema averages a teacher's weights; --reweight-method {m} has no teacher: drop it, "
                         "or use --reweight-method mwnet/deep")
    if str(cfg.meta_precondition) == "adam":
        raise ValueError("--meta-precondition adam needs an Adam student; the image student is SGD: drop it")
    if m != "none" and cfg.meta_size <= 0:
        raise ValueError(f"--reweight-method {m} needs a clean meta set: --meta-size must be > 0")
    check_rate(cfg.noise_rate)
    if cfg.crop_pad < 0:
        raise ValueError(f"--crop-pad must be >= 0, got {cfg.crop_pad}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Step schedule (MW-Net): ``lr * decay^(number of milestones <= epoch)``, epochs counted from 0."""
    return cfg.lr * cfg.lr_decay ** sum(epoch >= s for s in cfg.lr_steps)


def _init_distributed(cfg: TrainConfig):
    """Join the workers started by torchrun (WORLD_SIZE > 1): ``(rank, world)``; ``(0, 1)`` otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if cfg.reweight_method in ("mwnet", "deep") and cfg.meta_grad != "fast":
        raise ValueError(f"--meta-grad {cfg.meta_grad} is a one-process reference: with torchrun use --meta-grad "
                         "fast, which keeps the teacher identical on every worker")
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _all_reduce_sum(t: torch.Tensor) -> None:
    torch.distributed.all_reduce(t)


def _device(name: str, rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    return dev


class Trainer:
    def __init__(self, cfg: TrainConfig):
        check_config(cfg)
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world = _init_distributed(cfg)
        self.device = _device(cfg.device, self.rank)
        self.save_dir = Path(cfg.save_dir)
        if self.rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        self._build_data()
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.arch, self.num_classes, self.data.in_channels).to(self.device)
        # data parallel (torchrun): DDP averages the student's gradients; self.model stays the bare module
        self.net = self.model if self.world == 1 else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.reweighter = Reweighter(cfg.reweight_method, meta_interval=cfg.meta_interval,
                                     teacher_lr=cfg.teacher_lr if cfg.teacher_lr is not None else 1e-3,
                                     teacher_hidden=cfg.teacher_hidden,
                                     passthrough=student.passthrough(cfg.reweight_method, self.num_classes),
                                     all_reduce=_all_reduce_sum if self.world > 1 else None, world_size=self.world,
                                     seed=cfg.seed, max_weight=cfg.max_weight,
                                     teacher_weight_decay=cfg.teacher_weight_decay, warmup=cfg.reweight_warmup or 0,
                                     weight_norm=str(cfg.weight_norm),
                                     # a low loss gets a high weight: the loss column enters the logit negated
                                     teacher_prior_scale=-cfg.teacher_prior_scale,
                                     weight_ema=cfg.weight_ema, num_examples=len(self.train_ids))
        self.layers = (student.parse_teacher_states(cfg.teacher_states, self.model.num_states)
                       if cfg.reweight_method == "deep" else [])
        student.probe_layers(self.model, cfg.meta_params)  # a bad --meta-params fails here, not at the first update
        self._labels: Optional[torch.Tensor] = None  # the training batch's labels (replays of --meta-params stage)
        self.strategy = strategies.build(cfg.meta_grad, self.reweighter, fd_eps=cfg.meta_fd_eps,
                                         probe_layers=lambda: student.probe_layers(
                                             self.model, cfg.meta_params, labels=lambda: self._labels,
                                             fd_eps=cfg.meta_fd_eps),
                                         refresh=cfg.meta_refresh, ema=cfg.meta_ema)
        self._sync_logged = False
        # separate streams: every method sees the same training batches and augmentations
        self.gen_train = torch.Generator().manual_seed(cfg.seed)
        self.gen_meta = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch, self.updates = 0, 0
        self.train_seconds, self.train_iters = 0.0, 0
        self.history: List[Dict[str, float]] = []
        self.best_acc = -1.0
        self.dumper: Optional[WeightDumper] = None
        if cfg.resume:
            self._restore(self.save_dir / "checkpoint_last.pt")

    # ------------------------------------------------------------------ data
    def _build_data(self):
        cfg = self.cfg
        self.data = data = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
        k = self.num_classes = data.num_classes
        if cfg.meta_size > 0:
            meta_idx, pool = balanced_split(data.train_y, k, cfg.meta_size, cfg.data_seed)
        else:
            meta_idx, pool = np.zeros(0, dtype=np.int64), np.arange(len(data.train_y))
        if cfg.train_size:
            sub, _ = balanced_split(data.train_y[pool], k, cfg.train_size, cfg.data_seed + 1)
            pool = pool[sub]
        self.noise = corrupt(data.train_y[pool], k, cfg.noise, cfg.noise_rate, cfg.data_seed)
        if len(pool) < cfg.batch_size:
            raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(pool)} training images")
        dev = self.device
        self.train_ids = torch.as_tensor(pool)
        self.train_x = torch.as_tensor(data.train_x[pool]).to(dev)
        self.train_y = torch.as_tensor(self.noise.labels).to(dev)
        self.train_true = torch.as_tensor(data.train_y[pool]).to(dev)
        self.train_noisy = torch.as_tensor(self.noise.noisy)
        self.meta_x = torch.as_tensor(data.train_x[meta_idx]).to(dev)
        self.meta_y = torch.as_tensor(data.train_y[meta_idx]).to(dev)
        self.test_x = torch.as_tensor(data.test_x).to(dev)
        self.test_y = torch.as_tensor(data.test_y).to(dev)
        info = data.info
        self.augment = Augment(info.mean, info.std, pad=cfg.crop_pad, flip=info.flip, enabled=cfg.augment)
        # --batch-size is per worker; worker r takes the r-th batch of every group of `world` batches
        self.iters_per_epoch = len(pool) // (cfg.batch_size * self.world)
        if self.iters_per_epoch == 0:
            raise ValueError(f"{len(pool)} training images are fewer than --batch-size {cfg.batch_size} x "
                             f"{self.world} workers")
        if self.rank == 0:
            self._write_labels(pool, meta_idx)

    def _write_labels(self, pool: np.ndarray, meta_idx: np.ndarray) -> None:
        rows = ["id\tlabel\ttrue_label\tnoisy\tsplit\n"]
        true = self.data.train_y
        rows += [f"{i}\t{l}\t{t}\t{int(n)}\ttrain\n" for i, l, t, n in
                 zip(pool.tolist(), self.noise.labels.tolist(), true[pool].tolist(), self.noise.noisy.tolist())]
        rows += [f"{i}\t{t}\t{t}\t0\tmeta\n" for i, t in zip(meta_idx.tolist(), true[meta_idx].tolist())]
        (self.save_dir / "labels.tsv").write_text("".join(rows))

    # ------------------------------------------------------------------ training
    def run(self) -> dict:
        cfg = self.cfg
        self._log(f"{cfg.dataset}: {len(self.train_ids)} training images ({self.noise.noisy.mean():.1%} wrong labels, "
                  f"{cfg.noise} {cfg.noise_rate:g}), {len(self.meta_y)} clean meta images, {len(self.test_y)} test "
                  f"images; {cfg.arch} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters); "
                  f"--reweight-method {cfg.reweight_method} on {self.device}")
        if cfg.dump_weights:
            self.dumper = WeightDumper(cfg.dump_weights, rank=self.rank, keep_before=self.updates if cfg.resume else None)
        try:
            while self.epoch < cfg.epochs:
                record = self._train_epoch()
                record.update(self.evaluate())
                self.epoch += 1
                self.history.append(record)
                best = record["test_acc"] > self.best_acc
                self.best_acc = max(self.best_acc, record["test_acc"])
                self._save("checkpoint_last.pt")
                if best:
                    self._save("checkpoint_best.pt")
                self._write_logs(finished=self.epoch >= cfg.epochs)
                self._log(" | ".join(f"{k} {_fmt(v)}" for k, v in record.items()))
        finally:
            if self.dumper is not None:
                self.dumper.close()
        return self.summary(finished=True)

    def _train_epoch(self) -> Dict[str, float]:
        cfg, dev = self.cfg, self.device
        lr = lr_at(cfg, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = cfg.teacher_progress_horizon or cfg.epochs * self.iters_per_epoch
        perm = torch.randperm(len(self.train_ids), generator=self.gen_train)
        sums: Dict[str, float] = {}
        weights, flags, signal = [], [], []
        correct = correct_true = fit_noisy = 0
        bar = tqdm(range(self.iters_per_epoch), desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        self.model.train()
        for it in bar:
            start_i = (it * self.world + self.rank) * cfg.batch_size
            idx = perm[start_i:start_i + cfg.batch_size]
            dev_idx = idx.to(dev)
            y = self.train_y[dev_idx]
            self.reweighter.last_grad_w = None
            w, out, info = self.train_step(self.augment(self.train_x[dev_idx], self.gen_train), y, lr,
                                           min(self.updates / total, 1.0), dev_idx)
            if self.dumper is not None:
                self.dumper.write(self.updates, self.train_ids[idx], w, out.losses)
            self.updates += 1

            pred = out.logits.detach().argmax(1)
            noisy = self.train_noisy[idx].to(dev)
            correct += int((pred == y).sum())
            correct_true += int((pred == self.train_true[dev_idx]).sum())
            fit_noisy += int(((pred == y) & noisy).sum())
            weights.append(w.detach().float().cpu())
            flags.append(noisy.cpu())
            g = self.reweighter.last_grad_w
            if g is not None and bool(noisy.any()) and not bool(noisy.all()):  # the meta-gradient's own ranking
                signal.append(auc((-g).float().cpu().tolist(), (~noisy).long().cpu().tolist()))
            for k, v in {"loss": float(out.losses.detach().mean()), **weight_stats(w), **info}.items():
                sums[k] = sums.get(k, 0.0) + v
            if cfg.progress and (it % 10 == 0 or it == self.iters_per_epoch - 1):
                bar.set_postfix(loss=f"{sums['loss'] / (it + 1):.3f}", acc=f"{100 * correct / ((it + 1) * len(y)):.1f}")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        self.train_iters += self.iters_per_epoch
        record = self._epoch_record(lr, seconds, sums, torch.cat(weights), torch.cat(flags), correct, correct_true,
                                    fit_noisy)
        if signal:  # how well -dL_meta/dw_i ranked clean above noisy labels within a batch (epoch mean)
            record["signal_auc"] = float(np.mean(signal))
        return record

    def train_step(self, x, y, lr: float, progress: float, ids: torch.Tensor):
        """One update on an (augmented) batch of the training examples ``ids``: ``(weights, student output,
        diagnostics)``. The hooks of ``self.strategy`` (core/strategies/__init__.py) around the student's forward
        and backward, as in the fairseq task's ``train_step``."""
        cfg, s, n, step = self.cfg, self.strategy, len(y), self.updates
        self._labels = y
        s.begin_update(step, params=list(self.model.parameters()),
                       meta_loss=lambda: student.meta_loss(self.model, *self._meta_batch()))
        with s.forward(self.device):
            out = student.forward(self.net, x, y, states=bool(self.layers))
        feats = student.teacher_features(cfg.reweight_method, out, y, self.num_classes, self.layers, progress)
        if cfg.teacher_prior == "loss" and self.reweighter.teacher is None:  # set before the teacher is built
            self.reweighter.teacher_prior = student.loss_column(feats, cfg.reweight_method, self.num_classes)
        w, info = s.weights(step, feats, out.losses, lr=cfg.meta_lr if cfg.meta_lr is not None else lr,
                            denom=float(n), lookahead=lambda: student.lookahead(self.model, x, y, *self._meta_batch()),
                            ids=ids)
        loss = (w * out.losses).sum() / n
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.after_backward(w, info, loss_scale=1 / n)
        self.optimizer.step()
        if s.end_update(step) and not self._sync_logged:
            self._sync_logged = True
            self._log(f"teacher identical on all {self.world} workers (checked every meta update)")
        return w, out, info

    def bench_step(self) -> None:
        """One update on the next batch (scripts/bench_speed.py)."""
        cfg = self.cfg
        if not hasattr(self, "_bench_perm") or self._bench_pos + cfg.batch_size > len(self._bench_perm):
            self._bench_perm, self._bench_pos = torch.randperm(len(self.train_ids), generator=self.gen_train), 0
        idx = self._bench_perm[self._bench_pos:self._bench_pos + cfg.batch_size].to(self.device)
        self._bench_pos += cfg.batch_size
        self.model.train()
        self.train_step(self.augment(self.train_x[idx], self.gen_train), self.train_y[idx], cfg.lr, 0.5, idx)
        self.updates += 1

    def _meta_batch(self):
        cfg = self.cfg
        mb = min(cfg.meta_batch_size or cfg.batch_size, len(self.meta_y))
        pick = torch.randperm(len(self.meta_y), generator=self.gen_meta)[:mb].to(self.device)
        return self.augment(self.meta_x[pick], self.gen_meta), self.meta_y[pick]

    def _epoch_record(self, lr, seconds, sums, w, noisy, correct, correct_true, fit_noisy) -> Dict[str, float]:
        n, nb = sums["w_count"], sums["w_batches"]
        mean = sums["w_sum"] / n
        rec = {"epoch": self.epoch + 1, "updates": self.updates, "lr": lr,
               "train_loss": sums["loss"] / nb, "train_acc": 100.0 * correct / n,
               "train_acc_true": 100.0 * correct_true / n,
               "noisy_fit": 100.0 * fit_noisy / max(int(noisy.sum()), 1),
               "weight_auc": auc(w.tolist(), (~noisy).long().tolist()),
               "w_clean": float(w[~noisy].mean()) if bool((~noisy).any()) else math.nan,
               "w_noisy": float(w[noisy].mean()) if bool(noisy.any()) else math.nan,
               "w_std": math.sqrt(max(sums["w_sq"] / n - mean * mean, 0.0)),
               "w_low10": sums["w_low10"] / nb}
        steps = sums.get("meta_steps", 0.0)
        if steps:
            ok = steps - sums.get("meta_skipped", 0.0)
            rec["meta_loss"] = sums.get("meta_loss", 0.0) / ok if ok else math.nan
            rec["meta_skipped"] = sums.get("meta_skipped", 0.0)
        if "l2rw_uniform" in sums:
            rec["l2rw_uniform"] = sums["l2rw_uniform"]
        rec["sec_per_iter"] = seconds / self.iters_per_epoch
        return rec

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        self.model.eval()
        loss = correct = 0.0
        for i in range(0, len(self.test_y), self.cfg.eval_batch_size):
            x = self.augment.normalize(self.test_x[i:i + self.cfg.eval_batch_size])
            y = self.test_y[i:i + self.cfg.eval_batch_size]
            logits = self.model(x)
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        n = max(len(self.test_y), 1)
        return {"test_loss": loss / n, "test_acc": 100.0 * correct / n}

    # ------------------------------------------------------------------ checkpoints and logs
    def _save(self, name: str) -> None:
        """Only tensors and plain containers, so ``torch.load(weights_only=True)`` reads it back."""
        if self.rank != 0:
            return
        dev = self.device
        state = {
            "version": CHECKPOINT_VERSION,
            "config": asdict(self.cfg),
            "epoch": self.epoch, "updates": self.updates,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": {"lr": self.cfg.lr, "steps": list(self.cfg.lr_steps), "decay": self.cfg.lr_decay,
                            "next_epoch": self.epoch},
            "rng": {"torch": torch.get_rng_state(), "train": self.gen_train.get_state(),
                    "meta": self.gen_meta.get_state(),
                    "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None},
            "reweighter": self.reweighter.state_dict(),
            "meta_direction": self.strategy.state_dict(),
            "history": self.history, "best_acc": self.best_acc,
            "train_seconds": self.train_seconds, "train_iters": self.train_iters,
        }
        tmp = self.save_dir / f".{name}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.save_dir / name)

    def _restore(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path} (drop --resume to start a fresh run)")
        state = torch.load(path, map_location=self.device, weights_only=True)
        old = state["config"]
        diff = [f"--{k.replace('_', '-')} {old.get(k, RESUME_LEGACY.get(k))} -> {getattr(self.cfg, k)}"
                for k in RESUME_KEYS if old.get(k, RESUME_LEGACY.get(k)) != getattr(self.cfg, k)]
        if diff:
            raise ValueError(f"--resume: {path} was trained with other settings ({'; '.join(diff)}); use the "
                             "same settings or another --save-dir")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.updates = state["epoch"], state["updates"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        self.gen_train.set_state(state["rng"]["train"].cpu())
        self.gen_meta.set_state(state["rng"]["meta"].cpu())
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        if self.cfg.reset_teacher:
            self._log("--reset-teacher: ignoring the teacher state in the checkpoint")
        else:
            self.reweighter.load_state_dict(state["reweighter"])
            self.strategy.load_state_dict(state.get("meta_direction"))
        self.history, self.best_acc = list(state["history"]), state["best_acc"]
        self.train_seconds, self.train_iters = state["train_seconds"], state["train_iters"]
        teacher = f", teacher after {self.reweighter.meta_steps} meta updates" if self.reweighter.has_teacher else ""
        self._log(f"resumed from {path}: epoch {self.epoch}, {self.updates} updates{teacher}")

    def summary(self, finished: bool) -> dict:
        accs = [r["test_acc"] for r in self.history]
        best = int(np.argmax(accs)) if accs else -1
        return {
            "finished": finished and self.epoch >= self.cfg.epochs,
            "epochs_done": self.epoch, "updates": self.updates,
            "best_test_acc": accs[best] if accs else None, "best_epoch": best + 1 if accs else None,
            "last_test_acc": accs[-1] if accs else None,
            "last_weight_auc": self.history[-1]["weight_auc"] if self.history else None,
            "sec_per_iter": self.train_seconds / self.train_iters if self.train_iters else None,
            "meta_steps": self.reweighter.meta_steps, "meta_skipped": self.reweighter.meta_skipped,
            "wrong_label_fraction": float(self.noise.noisy.mean()),
            "train_images": len(self.train_ids), "meta_images": len(self.meta_y), "test_images": len(self.test_y),
            "device": str(self.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        }

    def _write_logs(self, finished: bool) -> None:
        if self.rank != 0:
            return
        log = {"config": asdict(self.cfg), "summary": self.summary(finished), "epochs": self.history}
        tmp = self.save_dir / ".log.json.tmp"
        tmp.write_text(json.dumps(_finite(log), indent=1))
        os.replace(tmp, self.save_dir / "log.json")
        keys = list(dict.fromkeys(k for r in self.history for k in r))
        with open(self.save_dir / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)

    def _log(self, msg: str) -> None:
        if self.rank != 0:
            return
        tqdm.write(msg) if self.cfg.progress else print(msg, flush=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _finite(o):
    """NaN (e.g. the weight AUC without noisy labels) -> null, so log.json is strict JSON."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
