"""``reweighted_translation``: fairseq's translation task with learned data reweighting.

Implements *Learning to Reweight with Deep Interactions* (Fan et al., AAAI 2021,
arXiv:2007.04649) and, one flag apart, the baselines L2RW (Ren et al., 2018) and MW-Net
(Shu et al., 2019). The task owns the teacher (saved in the checkpoints' ``task_state``) and
draws clean meta batches from ``--meta-subset``; all reweighting maths lives in
:mod:`fairseq_reweight.core`.
"""

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq import utils
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II
from torch import nn

from . import compat  # noqa: F401  (checkpoint loading under torch >= 2.6)
from .core import recipe
from .core.recipe import RECIPES
from .core import (
    METHODS, LayerProbe, MetaDirection, MetaGrad, Reweighter, WeightDumper, adam_precondition, capture_rng,
    check_flags, first_order, fixed_rng, functional_call, meta_direction, parse_states_spec, weight_gradient,
    weight_stats,
)
from .criterion import check_model, num_decoder_layers

logger = logging.getLogger(__name__)


@dataclass
class ReweightedTranslationConfig(TranslationConfig):
    reweight_method: ChoiceEnum(METHODS) = field(
        default="deep",
        metadata={"help": "none: uniform weights (plain training); l2rw: Ren et al. 2018; mwnet: Shu et al. "
                  "2019 (teacher sees the loss); deep: Fan et al. 2021 (teacher sees decoder states)"},
    )
    reweight_recipe: ChoiceEnum(RECIPES) = field(
        default="tuned",
        metadata={"help": "what unset flags of deep mean: tuned (the best measured recipe: plain warm-up, source "
                  "contrast, averaged and Adam-preconditioned meta direction, weights capped at 2) or paper (Fan et "
                  "al. 2021 as published); l2rw/mwnet are the published forms under both"},
    )
    meta_subset: str = field(default="meta", metadata={"help": "clean data-bin split for the meta loss"})
    meta_interval: int = field(default=1, metadata={"help": "update the teacher every N updates"})
    reweight_warmup: Optional[int] = field(
        default=None, metadata={"help": "train with uniform weights (no teacher/meta updates) for the first N updates "
                                "(default: a third of --max-update for deep with --reweight-recipe tuned, else 0)"}
    )
    meta_grad: ChoiceEnum(["fast", "fd", "exact"]) = field(
        default="fast",
        metadata={"help": "fast: first-order meta-gradient on the layers of --meta-params, from activations the "
                  "student's own forward/backward computes (one extra forward of the meta batch); fd: all "
                  "parameters, one-step look-ahead, finite difference of per-sentence losses (no double "
                  "backward); exact: second-order autograd through the look-ahead (the reference)"},
    )
    meta_params: str = field(
        default="auto",
        metadata={"help": "fast only: layers whose parameters the meta-gradient uses, comma-separated: embed "
                  "(the token embeddings), ffn (the last decoder layer's fc1/fc2), decoder / encoder (every "
                  "transformer layer's fc1/fc2), output (the output projection); auto: encoder for transformers, else "
                  "embed (else output)"},
    )
    meta_precondition: ChoiceEnum(["auto", "none", "adam"]) = field(
        default="auto",
        metadata={"help": "fast only: adam scores each sentence along the step the student's Adam would take (the "
                  "look-ahead of an Adam student); none: along the raw gradient, as in the papers; auto: adam for "
                  "deep with --reweight-recipe tuned and an Adam student, else none"},
    )
    meta_lr: Optional[float] = field(
        default=None, metadata={"help": "fd/exact only: step size of the look-ahead (default: the current learning rate)"}
    )
    meta_max_tokens: Optional[int] = field(default=None, metadata={"help": "meta batch tokens (default --max-tokens)"})
    meta_batch_size: Optional[int] = field(
        default=None, metadata={"help": "meta batch sentences (default --batch-size)"}
    )
    meta_refresh: Optional[int] = field(
        default=None,
        metadata={"help": "fast only: a fresh meta direction (one meta forward/backward) every N meta updates, reused "
                  "in between (default: 4 for deep with --reweight-recipe tuned, else 1)"},
    )
    meta_ema: Optional[float] = field(
        default=None,
        metadata={"help": "fast only: exponential average of the fresh meta directions with this decay; 0: the "
                  "latest direction (default: 0.9 for deep with --reweight-recipe tuned, else 0)"},
    )
    meta_fd_eps: float = field(
        default=1e-3, metadata={"help": "fd only: finite-difference step relative to the parameter norm"}
    )
    max_weight: Optional[float] = field(
        default=None,
        metadata={"help": "cap each normalised weight at this value (> 1; weights have mean 1 over the batch); 0: no "
                  "cap (default: 2 for deep with --reweight-recipe tuned, else no cap)"},
    )
    max_weight_gradient: ChoiceEnum(["zero", "through"]) = field(
        default="zero",
        metadata={"help": "the teacher's gradient for a sentence at --max-weight: zero (the cap's exact gradient) or "
                  "through (as if uncapped, so a sentence at the cap can still be pushed down)"},
    )
    teacher_lr: Optional[float] = field(default=None, metadata={"help": "teacher Adam lr (mwnet/deep; default 1e-3)"})
    teacher_hidden: int = field(default=100, metadata={"help": "teacher MLP hidden size"})
    teacher_weight_decay: float = field(
        default=0.0,
        metadata={"help": "decoupled (AdamW) weight decay of the teacher: each step shrinks its parameters by "
                  "teacher-lr x this, bounding the drift a noisy meta-gradient drives on uninformative inputs"},
    )
    teacher_states: str = field(
        default="last",
        metadata={"help": "decoder layers the deep teacher sees: last, all, or 1-based indices like 1,3"},
    )
    teacher_length_ratio: bool = field(
        default=False,
        metadata={"help": "deep only: also give the teacher log(target length / source length), a surface feature "
                  "that flags misaligned pairs (scripts/meta_signal.py: raises what a teacher can fit of the "
                  "meta-gradient on noisy Multi30k from AUC 0.61 to 0.70)"},
    )
    teacher_source_contrast: bool = field(
        default=False,
        metadata={"help": "deep only: also give the teacher how much each target's per-token NLL rises when the "
                  "decoder reads another sentence's source (one extra decoder forward without graph; on by "
                  "default with --reweight-recipe tuned)"},
    )
    teacher_progress_horizon: int = field(
        default=0, metadata={"help": "updates that count as progress 1.0 (default --max-update, else 10000)"}
    )
    reset_teacher: bool = field(default=False, metadata={"help": "ignore the teacher state in the checkpoint"})
    dump_weights: Optional[str] = field(
        default=None, metadata={"help": "append per-sentence 'update id weight loss' rows to this TSV file"}
    )
    seed: int = II("common.seed")
    max_tokens: Optional[int] = II("dataset.max_tokens")
    batch_size: Optional[int] = II("dataset.batch_size")
    max_update: int = II("optimization.max_update")
    fp16: bool = II("common.fp16")
    bf16: bool = II("common.bf16")
    amp: bool = II("common.amp")


class _Student(nn.Module):
    """Per-sentence losses of a batch as a module, so ``torch.func.functional_call`` can swap parameters."""

    def __init__(self, model, criterion):
        super().__init__()
        self.model = model
        object.__setattr__(self, "criterion", criterion)  # not a submodule

    def forward(self, sample, meta: bool = False):
        out = self.criterion.per_sentence(self.model, sample)
        return out.nll.sum() / out.mask.sum() if meta else out.loss


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _split_files(data: str, split: str, is_train: bool, epoch: int, ext: str) -> List[str]:
    """The ``SPLIT.*.EXT`` files of the data-bin fairseq reads ``split`` from (the same shard choice)."""
    import glob

    paths = utils.split_paths(data)
    path = paths[(epoch - 1) % len(paths)] if is_train else paths[0]
    return sorted(glob.glob(os.path.join(glob.escape(path), f"{glob.escape(split)}.*.{ext}")))


def _truncated(dataset) -> Optional[str]:
    """Why a loaded split's mmap ``.bin`` files are shorter than their ``.idx`` says, else None."""
    if hasattr(dataset, "_index") and hasattr(dataset, "_bin_buffer"):  # fairseq's MMapIndexedDataset
        index = dataset._index
        if len(index):
            need = int(index._pointers[-1]) + int(index._sizes[-1]) * index._dtype_size
            have = len(dataset._bin_buffer)
            if need > have:
                return f"is truncated: {dataset._path}.bin has {have} bytes but its .idx needs {need}"
        return None
    children = [getattr(dataset, a, None) for a in ("src", "tgt", "dataset")] + list(getattr(dataset, "datasets", []))
    for child in children:
        if child is not None and child is not dataset:
            problem = _truncated(child)
            if problem:
                return problem
    return None


@register_task("reweighted_translation", dataclass=ReweightedTranslationConfig)
class ReweightedTranslationTask(TranslationTask):
    """Translation with per-sentence weights from a teacher trained on a clean meta set."""

    cfg: ReweightedTranslationConfig

    def __init__(self, cfg: ReweightedTranslationConfig, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        explicit_precondition = str(cfg.meta_precondition) == "adam"
        resolved = recipe.resolve(
            str(cfg.reweight_recipe), str(cfg.reweight_method), str(cfg.meta_grad), cfg.max_update,
            meta_refresh=cfg.meta_refresh, meta_ema=cfg.meta_ema, max_weight=cfg.max_weight,
            meta_precondition=str(cfg.meta_precondition), teacher_source_contrast=cfg.teacher_source_contrast,
            reweight_warmup=cfg.reweight_warmup)
        for k, v in resolved.items():
            setattr(cfg, k, v)
        # the recipe's Adam preconditioning falls back to none for a student optimizer without Adam moments
        self._precondition_optional = cfg.meta_precondition == "adam" and not explicit_precondition
        if cfg.reweight_method != "none":
            logger.info(f"--reweight-method {cfg.reweight_method}, --reweight-recipe {cfg.reweight_recipe}: "
                        f"{recipe.describe(resolved)}")

        check_flags(cfg.reweight_method, cfg.teacher_lr, cfg.meta_interval, cfg.teacher_states, cfg.meta_grad,
                    cfg.meta_fd_eps, cfg.meta_refresh, cfg.meta_ema, cfg.max_weight, cfg.teacher_weight_decay,
                    cfg.meta_precondition, cfg.meta_lr)
        for flag in ("teacher_length_ratio", "teacher_source_contrast"):
            if getattr(cfg, flag) and cfg.reweight_method != "deep":
                name = "--" + flag.replace("_", "-")
                raise ValueError(f"{name} is an input of the deep teacher, not of --reweight-method "
                                 f"{cfg.reweight_method}: drop it or use --reweight-method deep")
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        if world_env > 1 and _rank_world()[1] == 1:
            raise RuntimeError(
                f"this process was started as one of {world_env} workers (WORLD_SIZE={world_env}, e.g. by torchrun) "
                f"but fairseq did not join them, so each would train alone into the same --save-dir. Add "
                f"--distributed-world-size {world_env} (on CPUs also --distributed-backend gloo "
                "--distributed-init-method env:// --distributed-no-spawn --distributed-rank -1 --ddp-backend "
                "legacy_ddp; see the README, 'Running at scale')")
        half = [f"--{k}" for k in ("fp16", "bf16", "amp") if getattr(cfg, k, False)]
        if half and cfg.reweight_method != "none":
            raise ValueError(f"{' '.join(half)} with --reweight-method {cfg.reweight_method} is not supported yet "
                             "(the meta-gradient paths are validated in float32 only): train in float32 (drop "
                             f"{' '.join(half)}), or use --reweight-method none")
        if _rank_world()[1] > 1 and cfg.reweight_method in ("mwnet", "deep") and cfg.meta_grad != "fast":
            raise ValueError(f"--meta-grad {cfg.meta_grad} is a one-process reference: with data-parallel training "
                             "use --meta-grad fast (the default), which keeps the teacher identical on every worker")
        self.reweighter = Reweighter(
            cfg.reweight_method,
            meta_interval=cfg.meta_interval,
            warmup=cfg.reweight_warmup,
            teacher_lr=cfg.teacher_lr if cfg.teacher_lr is not None else 1e-3,
            teacher_hidden=cfg.teacher_hidden,
            teacher_weight_decay=cfg.teacher_weight_decay,
            passthrough=1 if cfg.reweight_method == "deep" else 0,  # training progress, already in [0, 1]
            all_reduce=_all_reduce_sum,
            world_size=_rank_world()[1],
            seed=cfg.seed,
            max_weight=cfg.max_weight,
            cap_gradient=str(cfg.max_weight_gradient),
        )
        self._layers: Optional[List[int]] = None
        self._meta_epoch_itr = None
        self._meta_itr = None
        self._meta_itr_state = None
        self._dumper: Optional[WeightDumper] = None
        self._restored = False
        self._probe: Optional[LayerProbe] = None
        self._direction = None  # (meta gradient on the probed layers, meta loss) for the current update
        self._meta_dir = MetaDirection(cfg.meta_refresh, cfg.meta_ema)  # fresh, reused or averaged
        self._direction_update = -1
        self._sync_logged = False

    # ------------------------------------------------------------------ meta data
    def begin_epoch(self, epoch, model):
        super().begin_epoch(epoch, model)
        if self.reweighter.uses_meta:
            self._meta_dataset()  # fail at the start of training, not at the first update

    def _meta_dataset(self):
        split = self.cfg.meta_subset
        if split not in self.datasets:
            try:
                self.load_dataset(split)  # an empty or truncated split fails there, with the fix
            except FileNotFoundError as e:
                raise FileNotFoundError(
                    f"--reweight-method {self.cfg.reweight_method} needs a clean meta split '{split}' in "
                    f"{self.cfg.data} ({e}). Binarize one with the training dictionaries, e.g. "
                    f"{self._binarize_hint(split)} (scripts/prepare_multi30k.sh does this), or point "
                    "--meta-subset at an existing split"
                ) from None
            self._check_meta_vocab(split)
        return self.datasets[split]

    def _binarize_hint(self, split):
        s, t, data = self.cfg.source_lang, self.cfg.target_lang, utils.split_paths(self.cfg.data)[0]
        return (f"`fairseq-preprocess --source-lang {s} --target-lang {t} --srcdict {data}/dict.{s}.txt "
                f"--tgtdict {data}/dict.{t}.txt --testpref PREFIX --destdir TMP` and rename TMP/test.* to "
                f"{data}/{split}.*")

    def _check_meta_vocab(self, split, max_sentences=5000):
        """A meta split binarized with other dictionaries than the training data's fails at its first batch
        (token id out of range) or, with ids in range, feeds the teacher's meta loss garbage; catch what is
        visible in the ids: ids beyond the training dictionary, or mostly <unk>. (A same-size dictionary in
        another order is indistinguishable from the right one.)"""
        ds = self.datasets[split]
        where = f"meta split '{split}' in {utils.split_paths(self.cfg.data)[0]}"
        fix = (f"Re-binarize the meta split with --srcdict/--tgtdict of the training data-bin (after the same "
               f"tokenization/BPE as the training text): {self._binarize_hint(split)}")
        step = max(1, len(ds) // max_sentences)
        for side, data, d, lang in (("source", ds.src, self.src_dict, self.cfg.source_lang),
                                    ("target", ds.tgt, self.tgt_dict, self.cfg.target_lang)):
            if data is None or len(data) == 0:
                continue
            toks = torch.cat([data[i].long().view(-1) for i in range(0, len(data), step)])
            if toks.numel() and int(toks.max()) >= len(d):
                raise ValueError(
                    f"{where}: its {side} side has token id {int(toks.max())} but dict.{lang}.txt of the training "
                    f"data has only {len(d)} entries, so it was binarized with a different dictionary. {fix}")
            words = toks[(toks >= d.nspecial) | (toks == d.unk())]
            unk = float((words == d.unk()).float().mean()) if words.numel() else 0.0
            if unk > 0.5:
                raise ValueError(
                    f"{where}: {unk:.0%} of its {side} tokens are <unk> under dict.{lang}.txt of the training "
                    f"data: it was binarized with a different dictionary, or from text not tokenized like the "
                    f"training data. {fix}")
            if unk > 0.1:
                logger.warning(f"{where}: {unk:.0%} of its {side} tokens are <unk> under the training dictionary")

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        """fairseq's loader; an empty, truncated or corrupt split is an error that names the fix (fairseq
        fails deep inside numpy, or only at the first batch that reads past the end of a cut .bin file)."""
        try:
            super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 -- reported with the original error, which stays chained
            bins = _split_files(self.cfg.data, split, split == self.cfg.train_subset, epoch, "bin")
            empty = bool(bins) and all(os.path.getsize(f) == 0 for f in bins)
            problem = "is empty (0 sentence pairs)" if empty else (
                f"cannot be read ({type(e).__name__}: {e}): its .bin/.idx files are truncated, corrupt, or not "
                f"fairseq-preprocess output (of this --dataset-impl)")
            raise ValueError(self._bad_split_message(split, problem)) from e
        ds = self.datasets[split]
        problem = _truncated(ds)
        if problem is None and len(ds) == 0 and split in (self.cfg.train_subset, self.cfg.meta_subset):
            problem = "is empty (0 sentence pairs)"
        if problem is not None:
            raise ValueError(self._bad_split_message(split, problem))

    def _bad_split_message(self, split, problem):
        s, t, data = self.cfg.source_lang, self.cfg.target_lang, utils.split_paths(self.cfg.data)[0]
        where = f"split '{split}' in {self.cfg.data} {problem}"
        if split == self.cfg.meta_subset:
            return (f"meta {where}: --reweight-method {self.cfg.reweight_method} needs clean sentence pairs there. "
                    f"Re-binarize it from non-empty text with the training dictionaries, e.g. "
                    f"{self._binarize_hint(split)}, or point --meta-subset at another split")
        return (f"{where}. Re-run fairseq-preprocess on complete, non-empty text for it (keep the dictionaries: "
                f"--srcdict {data}/dict.{s}.txt --tgtdict {data}/dict.{t}.txt), or copy the data-bin again if it was "
                f"cut short (full disk, interrupted copy)")

    def _next_meta_batch(self, model, device):
        # starting a DataLoader iteration draws a seed from the global RNG: keep the training run's dropout
        # stream independent of when meta epochs start (an exact resume depends on it)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return self._next_meta_batch_unseeded(model, device)

    def _next_meta_batch_unseeded(self, model, device):
        if self._meta_epoch_itr is None:
            rank, world = _rank_world()
            self._meta_epoch_itr = self.get_batch_iterator(
                dataset=self._meta_dataset(),
                max_tokens=self.cfg.meta_max_tokens or self.cfg.max_tokens,
                max_sentences=self.cfg.meta_batch_size or self.cfg.batch_size,
                max_positions=utils.resolve_max_positions(self.max_positions(), model.max_positions()),
                ignore_invalid_inputs=True,
                seed=self.cfg.seed,
                num_shards=world,
                shard_id=rank,
                disable_iterator_cache=True,
            )
            if self._meta_itr_state is not None:
                self._meta_epoch_itr.load_state_dict(self._meta_itr_state)
            self._meta_itr = self._meta_epoch_itr.next_epoch_itr(shuffle=True)
        for _ in range(3):  # a worker's shard is padded with empty batches when the batches do not divide evenly
            if not self._meta_itr.has_next():
                self._meta_itr = self._meta_epoch_itr.next_epoch_itr(shuffle=True)
            sample = next(self._meta_itr)
            if sample and "net_input" in sample:
                break
        else:
            raise ValueError(f"meta split '{self.cfg.meta_subset}' is too small to give each of the "
                             f"{_rank_world()[1]} workers a meta batch: add clean pairs to it")
        return utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample

    # ------------------------------------------------------------------ model checks
    def build_model(self, cfg, from_checkpoint=False):
        """fairseq's model, checked at start-up (fairseq-train builds it before loading any checkpoint or
        training data): an unsupported decoder, a --teacher-states layer or --meta-params layers it lacks, and
        a missing or bad meta split fail here, not at the first update."""
        model = super().build_model(cfg, from_checkpoint)
        if not from_checkpoint:  # fairseq-generate & co. load a trained model: nothing to train
            check_model(model)
            if self.reweighter.uses_meta:
                self._meta_dataset()  # a missing, empty or mismatched meta split
            if self.cfg.reweight_method == "deep":
                self._resolve_layers(model)
            if self.reweighter.uses_meta and self.cfg.meta_grad == "fast":
                probe_layers(model, self.cfg.meta_params)
        return model

    # ------------------------------------------------------------------ teacher inputs
    def _resolve_layers(self, model) -> List[int]:
        """``--teacher-states`` as 0-based indices into the decoder layers ``model`` exposes, counted once with
        a dry forward of a 1-token pair (under ``fork_rng``: an exact resume needs the RNG untouched)."""
        if self._layers is None:
            tok = self.src_dict.nspecial if len(self.src_dict) > self.src_dict.nspecial else self.src_dict.eos()
            out_tok = self.tgt_dict.nspecial if len(self.tgt_dict) > self.tgt_dict.nspecial else self.tgt_dict.eos()
            sample = {"net_input": {
                "src_tokens": torch.tensor([[tok, self.src_dict.eos()]]),
                "src_lengths": torch.tensor([2]),
                "prev_output_tokens": torch.tensor([[self.tgt_dict.eos(), out_tok]]),
            }}
            device = next(model.parameters()).device
            sample = utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                n = num_decoder_layers(model, sample)
            self._layers = parse_states_spec(self.cfg.teacher_states, n, "decoder layers")
            logger.info(f"deep teacher sees decoder layers {[i + 1 for i in self._layers]} of {n}")
        return self._layers

    def _progress(self, update_num: int) -> float:
        horizon = self.cfg.teacher_progress_horizon or self.cfg.max_update or 10000
        return min(update_num / horizon, 1.0)

    def teacher_features(self, out, update_num: int, sample=None, contrast=None) -> Optional[torch.Tensor]:
        """mwnet: the sentence loss; deep: pooled decoder states + token-NLL statistics (+ the log length
        ratio with --teacher-length-ratio, + ``contrast`` = criterion.source_contrast with
        --teacher-source-contrast) + progress."""
        if self.cfg.reweight_method == "mwnet":
            return out.loss.detach().float().unsqueeze(1)
        if self.cfg.reweight_method != "deep":
            return None
        nll, mask = out.token_nll.float(), out.mask
        length = mask.sum(1).clamp_min(1).float()
        mean = nll.sum(1) / length
        mx = nll.masked_fill(~mask, float("-inf")).max(1).values.clamp_min(0)
        std = (((nll - mean[:, None]) ** 2 * mask).sum(1) / length).sqrt()
        progress = torch.full_like(mean, self._progress(update_num))
        cols = [mean, mx, std, length.log()]
        if self.cfg.teacher_length_ratio:
            if sample is None:
                raise ValueError("--teacher-length-ratio needs the batch (source lengths) for the teacher's inputs")
            src = sample["net_input"]["src_lengths"].to(length).clamp_min(1)
            cols.append(length.log() - src.log())
        if self.cfg.teacher_source_contrast:
            if contrast is None:
                raise ValueError("--teacher-source-contrast needs criterion.source_contrast for the teacher's inputs")
            cols.append(contrast.to(length))
        stats = torch.stack(cols + [progress], 1)
        return torch.cat([s.float() for s in out.states] + [stats], 1)

    # ------------------------------------------------------------------ training
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if not hasattr(criterion, "per_sentence"):
            raise TypeError("--task reweighted_translation needs --criterion reweighted_label_smoothed_cross_entropy")
        model.train()
        model.set_num_updates(update_num)
        inner = _unwrap(model)
        device = sample["target"].device
        rw = self.reweighter
        layers = self._resolve_layers(inner) if self.cfg.reweight_method == "deep" else None
        meta_step = rw.uses_meta and not ignore_grad and rw.is_meta_step(update_num)
        fast = meta_step and self.cfg.meta_grad == "fast"
        if fast and self._direction_update != update_num:  # first micro-batch of this update
            with torch.autograd.profiler.record_function("meta_direction"):
                self._direction = self._meta_direction(inner, criterion, device)
                if self.cfg.meta_precondition == "adam" and self._adam_student(optimizer):  # along Adam's step
                    direction, meta_loss = self._direction
                    self._direction = (adam_precondition(direction, self._get_probe(inner).parameters(),
                                                         optimizer.optimizer), meta_loss)
            self._direction_update = update_num
            rw.zero_teacher_grad()
        probe = self._get_probe(inner) if fast else None
        rng = capture_rng(device)
        with torch.autograd.profiler.record_function("forward"):
            with torch.autocast(device.type, enabled=isinstance(optimizer, AMPOptimizer)):
                with probe.watch(capture_grads=rw.has_teacher) if probe else contextlib.nullcontext():
                    out = criterion.per_sentence(model, sample, layers)

        if not ignore_grad and not bool(torch.isfinite(out.loss.detach()).all()):
            return self._skip_nonfinite(sample, out, update_num, model, optimizer, criterion.sentence_avg)
        info, w_graph, contrast = {}, None, None
        if self.cfg.teacher_source_contrast and not ignore_grad and (meta_step or update_num >= rw.warmup):
            with torch.autograd.profiler.record_function("source_contrast"):
                contrast = criterion.source_contrast(model, sample, out)
        denom = float(sample["target"].size(0) if criterion.sentence_avg else sample["ntokens"])
        lr = self.cfg.meta_lr if self.cfg.meta_lr is not None else optimizer.get_lr()
        with torch.autograd.profiler.record_function("reweight"):
            if not meta_step and (ignore_grad or not rw.has_teacher or update_num < rw.warmup):
                # dummy batch (loss zeroed), none, or warm-up: uniform
                weights = torch.ones_like(out.loss, dtype=torch.float32)
            elif fast and rw.method == "l2rw":
                probe.output_grads(out.loss.sum())
                weights = rw.l2rw(self._first_order(probe, lr, denom, out.loss.shape[0]), info)
            elif rw.has_teacher and self.cfg.meta_grad == "fast":  # w_graph: None unless a meta update
                weights, w_graph = rw.teacher_weights(update_num, self.teacher_features(out, update_num, sample, contrast))
            else:
                meta_fn = self._meta_grad_fn(inner, criterion, sample, out, optimizer, rng, device) if meta_step else None
                weights, info = rw.weights(update_num, self.teacher_features(out, update_num, sample, contrast), meta_fn,
                                           batch_size=out.loss.shape[0], device=device)
        if ignore_grad and rw.has_teacher and rw.teacher is None and update_num >= rw.warmup:
            # a padding batch at the first reweighted update: build the teacher like the other workers did, so
            # every worker takes part in the teacher's all-reduces from now on
            fake = torch.zeros_like(out.loss) if self.cfg.teacher_source_contrast else None
            rw.ensure_teacher(self.teacher_features(out, update_num, sample, fake).shape[1], device)
        if rw.has_teacher and not self._restored:
            self._restored = True
            logger.info("teacher initialised fresh (no teacher state restored from a checkpoint)")

        loss = (weights.to(out.loss.dtype) * out.loss).sum()
        if ignore_grad:
            loss *= 0
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        if w_graph is not None:  # the teacher's meta-gradient from this backward (probe.py)
            with torch.autograd.profiler.record_function("reweight"):
                mg = self._first_order(probe, lr, denom, out.loss.shape[0], weights)
                rw.accumulate(w_graph, mg, info)

        logging_output = criterion.logging_output(model, sample, out, weights)
        if not ignore_grad:
            logging_output.update(weight_stats(weights))
            logging_output.update(info)
            self._dump(update_num, sample, weights, out.loss)
        return loss, logging_output["sample_size"], _fixed_keys(logging_output, loss)

    def _skip_nonfinite(self, sample, out, update_num, model, optimizer, sentence_avg):
        """A NaN/inf sentence loss: the batch's gradient is zero for the student and it gives no meta-gradient
        to the teacher; counted as ``nonfinite`` in the log. Data parallel: following fairseq's convention for
        batches without a gradient, the backward still runs (of an exact zero built from the parameters, not
        through the non-finite graph), so every worker issues the same gradient all-reduces (pytorch_ddp's
        hooks) whatever its batch. In one process there is no backward: the parameters' gradients stay unset,
        so Adam skips them rather than stepping on its momentum alone."""
        bad = int((~torch.isfinite(out.loss.detach())).sum())
        logger.warning(f"update {update_num}: {bad} of {out.loss.numel()} sentence losses are NaN/inf; this batch is "
                       "skipped (no student or teacher gradient from it)")
        zero = sum((p.view(-1)[:1] * 0).sum() for p in model.parameters() if p.requires_grad)
        if _rank_world()[1] > 1:
            optimizer.backward(zero)

        bsz = sample["target"].size(0)
        size = bsz if sentence_avg else sample["ntokens"]
        # it counts as a batch with zero loss and gradient (fairseq's loss averages need its size)
        log = {"loss": 0.0, "nll_loss": 0.0, "ntokens": sample["ntokens"], "nsentences": bsz, "sample_size": size,
               "nonfinite": 1.0}
        return zero.detach(), size, _fixed_keys(log, zero)

    def optimizer_step(self, optimizer, model, update_num):
        super().optimizer_step(optimizer, model, update_num)
        rw = self.reweighter
        meta = rw.has_teacher and rw.is_meta_step(update_num)
        if meta and self.cfg.meta_grad == "fast":
            rw.step_teacher()
        rw.end_update()  # the input moments of this update's batches (all workers)
        if meta:
            if rw.check_in_sync(update_num) and not self._sync_logged:
                self._sync_logged = True
                logger.info(f"teacher identical on all {rw.world_size} workers after update {update_num} (checked "
                            "every meta update)")

    # ------------------------------------------------------------------ meta-gradients
    def _adam_student(self, optimizer) -> bool:
        """False (once logged) when the recipe asked for Adam preconditioning of a student without Adam moments."""
        if self._precondition_optional and not all("betas" in g for g in optimizer.optimizer.param_groups):
            logger.info(f"--reweight-recipe {self.cfg.reweight_recipe}: the student's optimizer "
                        f"{type(optimizer.optimizer).__name__} is not Adam-type, so the meta direction is not "
                        "preconditioned (--meta-precondition none)")
            self.cfg.meta_precondition = "none"
            return False
        return True

    def _get_probe(self, inner) -> LayerProbe:
        if self._probe is None:
            self._probe = LayerProbe(probe_layers(inner, self.cfg.meta_params))
            logger.info(f"--meta-grad fast: meta-gradient on {', '.join(self._probe.names)}")
        return self._probe

    def _meta_direction(self, inner, criterion, device):
        """Gradient of the clean meta loss on the probed layers (fresh, reused or averaged: --meta-refresh,
        --meta-ema)."""
        def meta_loss():
            out = criterion.per_sentence(inner, self._next_meta_batch(inner, device))
            return out.nll.sum() / out.mask.sum()

        def fresh():
            return meta_direction(self._get_probe(inner), list(inner.parameters()), meta_loss)

        return self._meta_dir.to(device).get(fresh)

    def _first_order(self, probe, lr, denom, batch_size, weights=None) -> MetaGrad:
        return first_order(probe, *self._direction, lr, denom, batch_size, weights)

    def _meta_grad_fn(self, inner, criterion, sample, out, optimizer, rng, device):
        student = _Student(inner, criterion)
        params = {n: p for n, p in inner.named_parameters() if p.requires_grad}
        meta_sample = self._next_meta_batch(inner, device)
        meta_rng = capture_rng(device)
        lr = self.cfg.meta_lr if self.cfg.meta_lr is not None else optimizer.get_lr()
        denom = float(sample["target"].size(0) if criterion.sentence_avg else sample["ntokens"])

        def prefixed(p):
            return {"model." + n: t for n, t in p.items()}

        def train_losses(p):
            with fixed_rng(rng, device):
                return functional_call(student, prefixed(p), (sample,))

        def meta_loss(p):
            with fixed_rng(meta_rng, device):
                return functional_call(student, prefixed(p), (meta_sample, True))

        def fn(w):
            with torch.autograd.profiler.record_function("meta_gradient"):
                return weight_gradient(params, train_losses, meta_loss, w, lr, denom, mode=self.cfg.meta_grad,
                                       fd_eps=self.cfg.meta_fd_eps, losses=out.loss)

        return fn

    def _dump(self, update_num, sample, weights, losses):
        if not self.cfg.dump_weights:
            return
        if self._dumper is None:
            # the first update after a resume is the checkpoint's count: drop rows written after it
            self._dumper = WeightDumper(self.cfg.dump_weights, rank=_rank_world()[0], keep_before=update_num or None)
        self._dumper.write(update_num, sample["id"], weights, losses)
        self._dumper.flush()

    # ------------------------------------------------------------------ metrics
    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)

        def total(key):
            return sum(float(log.get(key, 0)) for log in logging_outputs)

        n, nb = total("w_count"), total("w_batches")
        if n > 0:
            mean = total("w_sum") / n
            metrics.log_scalar("w_mean", mean, n, round=3)
            metrics.log_scalar("w_std", math.sqrt(max(total("w_sq") / n - mean * mean, 0.0)), n, round=3)
            metrics.log_scalar("w_min", total("w_min") / nb, nb, round=3)
            metrics.log_scalar("w_max", total("w_max") / nb, nb, round=3)
            metrics.log_scalar("w_low10", total("w_low10") / nb, nb, round=4)
        if total("nonfinite") > 0:
            metrics.log_scalar_sum("nonfinite", total("nonfinite"))
        steps = total("meta_steps")
        if steps > 0:
            ok = steps - total("meta_skipped")
            if ok > 0:
                metrics.log_scalar("meta_loss", total("meta_loss") / ok / math.log(2), ok, round=4)  # base 2, like nll_loss
            metrics.log_scalar_sum("meta_skipped", total("meta_skipped"))
            if total("l2rw_uniform") > 0:
                metrics.log_scalar_sum("l2rw_uniform", total("l2rw_uniform"))
                logger.warning("l2rw: every sentence had a non-negative meta-gradient; used uniform weights")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        state = {"reweighter": self.reweighter.state_dict()}
        if self._meta_dir.calls:
            state["meta_direction"] = self._meta_dir.state_dict()
        if self._meta_epoch_itr is not None:
            state["meta_iterator"] = self._meta_epoch_itr.state_dict()
        elif self._meta_itr_state is not None:
            state["meta_iterator"] = self._meta_itr_state
        return state

    def load_state_dict(self, state_dict):
        if not state_dict:
            return
        if self.cfg.reset_teacher:
            logger.info("--reset-teacher: ignoring the teacher state in the checkpoint")
            return
        self.reweighter.load_state_dict(state_dict.get("reweighter", {}))
        self._meta_itr_state = state_dict.get("meta_iterator")
        self._meta_dir.load_state_dict(state_dict.get("meta_direction"))
        self._meta_epoch_itr = self._meta_itr = None
        if state_dict.get("reweighter"):
            self._restored = True
            r = self.reweighter
            logger.info(f"restored the {r.method} teacher from the checkpoint ({r.meta_steps} meta updates so far)")

    # fairseq's trainer does not read task_state back on resume; it does hand get_checkpoint_dict()
    # (saved in extra_state) to set_checkpoint_dict(). The teacher is small, so it is stored in both.
    def get_checkpoint_dict(self):
        return {type(self).__name__: self.state_dict()}

    def set_checkpoint_dict(self, state):
        self.load_state_dict(state)


# fairseq sums the workers' logging outputs with one all-reduce of their values in key order, tensors and
# numbers in separate buffers (trainer._fast_stat_sync_sum): every worker's dict must have the same keys, in
# the same order and of the same kind, on every batch -- fairseq's padding batches (ignore_grad), meta and
# non-meta updates, skipped ones included -- or the all-reduce sizes differ and gloo/NCCL abort or hang
_TENSOR_KEYS = ("loss", "nll_loss")
_NUMBER_KEYS = ("ntokens", "nsentences", "sample_size", "n_correct", "total", "w_count", "w_batches", "w_sum", "w_sq",
                "w_min", "w_max", "w_low10", "meta_steps", "meta_loss", "meta_skipped", "l2rw_uniform", "nonfinite")


def _fixed_keys(log: dict, like: torch.Tensor) -> dict:
    """``log`` with exactly the keys of ``_TENSOR_KEYS + _NUMBER_KEYS`` (absent ones 0) in that order; the first
    ones tensors on ``like``'s device, the others Python numbers."""
    unknown = set(log) - set(_TENSOR_KEYS) - set(_NUMBER_KEYS)
    if unknown:
        raise KeyError(f"logging keys {sorted(unknown)} are not in task._NUMBER_KEYS (add them there)")
    out = {k: torch.as_tensor(log.get(k, 0.0), dtype=torch.float32 if like.dtype != torch.float64 else like.dtype,
                              device=like.device).detach() for k in _TENSOR_KEYS}
    for k in _NUMBER_KEYS:
        v = log.get(k, 0)
        out[k] = v.item() if torch.is_tensor(v) else v
    return out


def _rank_world():

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> None:
    """In-place sum over data-parallel workers (the teacher's gradients and input moments)."""
    if _rank_world()[1] > 1:
        torch.distributed.all_reduce(t)


def probe_layers(model, spec: str):
    """``--meta-params`` -> ``[(name, nn.Linear, batch_dim)]`` for :class:`LayerProbe`."""
    decoder = model.decoder
    stack = getattr(decoder, "layers", None)
    last = stack[-1] if stack is not None and len(stack) else None
    has_ffn = all(isinstance(getattr(last, n, None), nn.Linear) for n in ("fc1", "fc2"))
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if parts == ["auto"]:
        # the encoder's FFNs carry the clean-vs-corrupted signal of the meta-gradient; the embeddings/output
        # projection carry none on misaligned Multi30k (scripts/meta_signal.py, examples/multi30k/meta_signal.md)
        enc_layers = getattr(model.encoder, "layers", None)
        embeds = [getattr(getattr(model, side, None), "embed_tokens", None) for side in ("encoder", "decoder")]
        if enc_layers is not None and len(enc_layers) and has_ffn and all(
                isinstance(getattr(layer, n, None), nn.Linear) for layer in enc_layers for n in ("fc1", "fc2")):
            parts = ["encoder"]
        else:
            parts = ["embed"] if all(isinstance(e, nn.Embedding) for e in embeds) else ["output"]
    layers = []
    for part in parts:
        if part == "ffn":
            if not has_ffn:
                raise ValueError(f"--meta-params ffn: the decoder of {type(model).__name__} has no transformer "
                                 "layers with fc1/fc2; use --meta-params output (or --meta-grad fd)")
            i = len(stack) - 1
            # fairseq's transformer layers are time-major: [T, B, C]
            layers += [(f"decoder.layers.{i}.fc1", last.fc1, 1), (f"decoder.layers.{i}.fc2", last.fc2, 1)]
        elif part in ("decoder", "encoder"):
            sub = getattr(model, part)
            if getattr(sub, "layers", None) is None or not has_ffn:
                raise ValueError(f"--meta-params {part}: only for transformer models; use --meta-params output")
            # feed-forward blocks only: fairseq's attention calls its projections' weights directly
            layers += [(f"{part}.layers.{i}.{fc}", getattr(layer, fc), 1)
                       for i, layer in enumerate(sub.layers) for fc in ("fc1", "fc2")]
        elif part == "embed":
            for side in ("encoder", "decoder"):
                emb = getattr(getattr(model, side), "embed_tokens", None)
                if not isinstance(emb, nn.Embedding):
                    raise ValueError(f"--meta-params embed: the {side} has no nn.Embedding embed_tokens")
                layers.append((f"{side}.embed_tokens", emb, 0))  # one module shared by both sides: watched once
            # tied output projection (--share-decoder-input-output-embed / --share-all-embeddings): the same
            # parameter, so `embed` is that parameter's whole gradient, lookups and output projection
            proj = getattr(decoder, "output_projection", None)
            if isinstance(proj, nn.Linear) and proj.weight is getattr(decoder.embed_tokens, "weight", None):
                layers.append(("decoder.output_projection", proj, 0))

        elif part == "output":
            for name in ("output_projection", "fc_out"):
                if isinstance(getattr(decoder, name, None), nn.Linear):
                    layers.append((f"decoder.{name}", getattr(decoder, name), 0))
                    break
            else:
                raise ValueError(f"--meta-params output: the decoder of {type(model).__name__} has no nn.Linear "
                                 "output projection (adaptive softmax, or an LSTM with tied embeddings); use "
                                 "--meta-params ffn or --meta-grad fd")
        else:
            raise ValueError(f"--meta-params {spec!r}: use auto, or a comma-separated list of ffn, decoder, "
                             "encoder, embed, output")
    return layers
