"""``reweighted_translation``: fairseq's translation task with learned data reweighting.

Implements *Learning to Reweight with Deep Interactions* (Fan et al., AAAI 2021, arXiv:2007.04649) and,
one flag apart, the baselines L2RW (Ren et al., 2018) and MW-Net (Shu et al., 2019). The task owns the
teacher (saved in the checkpoints), draws clean meta batches from ``--meta-subset`` (meta_batches.py) and
calls the meta-gradient strategy of ``--meta-grad`` (core/strategies/); all reweighting maths lives in
:mod:`fairseq_reweight.core`, the split checks in splits.py, the probed layers in layers.py.
"""

import atexit
import logging
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq import utils
from fairseq.logging import metrics
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II
from torch import nn

from . import compat, splits  # noqa: F401  (compat: checkpoint loading under torch >= 2.6)
from .core import ReweightConfig, Reweighter, WeightDumper, functional_call, parse_states_spec, recipe
from .core import strategies, weight_stats
from .core.selection import EpochDrop, check_threshold
from .core import features as inputs
from .contrast import CorpusContrast, scored
from .criterion import check_model, num_decoder_layers
from .features import FEATURES, Batch
from .layers import probe_layers
from .meta_batches import MetaBatches, rank_world as _rank_world

logger = logging.getLogger(__name__)


@dataclass
class ReweightedTranslationConfig(TranslationConfig, ReweightConfig):
    """fairseq's translation flags, the reweighting flags of :class:`core.config.ReweightConfig`, and these."""

    meta_subset: str = field(default="meta", metadata={"help": "clean data-bin split for the meta loss"})
    meta_max_tokens: Optional[int] = field(default=None, metadata={"help": "meta batch tokens (default --max-tokens)"})
    teacher_inputs: str = field(default="auto", metadata={
        "help": "deep only: comma-separated inputs of the teacher, from " + ", ".join(FEATURES) + "; auto: the "
                "recipe's (tuned: " + recipe.TUNED_DEEP["teacher_inputs"] + "; paper: " + recipe.PLAIN["teacher_inputs"]
                + ")"})
    teacher_prior: str = field(default="auto", metadata={
        "help": "deep only: an input of --teacher-inputs the teacher starts from (its standardised value times "
                "--teacher-prior-scale is added to the teacher's logit; the scale is learned); none: no prior; "
                "auto: the recipe's (tuned: " + recipe.TUNED_DEEP["teacher_prior"] + "; paper: none)"})
    teacher_prior_scale: Optional[float] = field(default=None, metadata={
        "help": "initial scale of --teacher-prior (default: tuned " + str(recipe.TUNED_DEEP["teacher_prior_scale"])
                + ", paper " + str(recipe.PLAIN["teacher_prior_scale"]) + ")"})
    teacher_prior_reference: str = field(default="auto", metadata={
        "help": "deep only: standardise --teacher-prior by the training batches' moments (train), or by the clean "
                "meta set's, centred one standard deviation below its mean (meta); auto: the recipe's (tuned: "
                + recipe.TUNED_DEEP["teacher_prior_reference"] + "; paper: train)"})
    source_contrast: str = field(default="auto", metadata={
        "help": "deep, where the teacher reads source_contrast: compute it in every training batch with the current "
                "student (batch), or once for the whole corpus and the meta set when reweighting starts (once); "
                "auto: the recipe's (tuned: " + recipe.TUNED_DEEP["source_contrast"] + ", per batch for sharded --data)"})
    source_contrast_refresh: Optional[int] = field(default=None, metadata={
        "help": "--source-contrast once: run the corpus pass again every N updates, for the pairs not left out "
                "(0: never); default: the recipe's (tuned: once half-way through the reweighted updates; paper: 0)"})
    teacher_length_ratio: bool = field(default=False, metadata={"help": "replaced by --teacher-inputs (an error)"})
    teacher_source_contrast: bool = field(default=False, metadata={"help": "replaced by --teacher-inputs (an error)"})
    drop_below: Optional[float] = field(default=None, metadata={
        "help": "leave out of every later epoch the training sentences whose mean weight in an epoch was below this "
                "(the teacher as a filter during training; weights have mean 1); 0: none; default: the recipe's "
                "(tuned: " + str(recipe.TUNED_DEEP["drop_below"] or "none") + "; paper: none)"})
    train_subset: str = II("dataset.train_subset")
    rebuild_batches: bool = field(default=False, metadata={
        "help": "build each epoch's batches when it starts (as fairseq's audio tasks; set by --drop-below)"})
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
            meta_precondition=str(cfg.meta_precondition), teacher_inputs=cfg.teacher_inputs,
            reweight_warmup=cfg.reweight_warmup, teacher_prior=cfg.teacher_prior,
            teacher_prior_scale=cfg.teacher_prior_scale, teacher_lr=cfg.teacher_lr, weight_norm=cfg.weight_norm,
            drop_below=cfg.drop_below, teacher_prior_reference=cfg.teacher_prior_reference,
            source_contrast=cfg.source_contrast, source_contrast_refresh=cfg.source_contrast_refresh)
        if cfg.source_contrast in (None, "auto") and resolved["source_contrast"] == "once" and \
                len(utils.split_paths(str(cfg.data))) > 1:
            resolved["source_contrast"] = "batch"  # one value per pair of one split: not for sharded data
            if cfg.source_contrast_refresh is None:
                resolved["source_contrast_refresh"] = 0
        for k, v in resolved.items():
            setattr(cfg, k, v)
        # the recipe's Adam preconditioning falls back to none for a student optimizer without Adam moments
        self._precondition_optional = cfg.meta_precondition == "adam" and not explicit_precondition
        if cfg.reweight_method != "none":
            logger.info(f"--reweight-method {cfg.reweight_method}, --reweight-recipe {cfg.reweight_recipe}: "
                        f"{recipe.describe(resolved)}")
        self._check_flags(cfg)
        self.inputs = inputs.parse(cfg.teacher_inputs, FEATURES) if cfg.reweight_method in ("mwnet", "deep") else []
        if cfg.teacher_prior and (cfg.teacher_prior not in self.inputs or not FEATURES[cfg.teacher_prior].standardise
                                  or cfg.reweight_method != "deep"):
            raise ValueError(f"--teacher-prior {cfg.teacher_prior}: the deep teacher's prior must be one of its "
                             f"standardised --teacher-inputs ({', '.join(n for n in self.inputs if FEATURES[n].standardise)})")
        self.reweighter = Reweighter(
            cfg.reweight_method, meta_interval=cfg.meta_interval, warmup=cfg.reweight_warmup,
            teacher_lr=cfg.teacher_lr if cfg.teacher_lr is not None else 1e-3, teacher_hidden=cfg.teacher_hidden,
            teacher_weight_decay=cfg.teacher_weight_decay,
            passthrough=inputs.passthrough(self.inputs, FEATURES),  # e.g. training progress, already in [0, 1]
            all_reduce=_all_reduce_sum, world_size=_rank_world()[1], seed=cfg.seed, max_weight=cfg.max_weight,
            teacher_prior_scale=cfg.teacher_prior_scale, weight_norm=str(cfg.weight_norm),
            prior_reference=cfg.teacher_prior_reference == "meta")
        self.strategy = strategies.build(
            cfg.meta_grad, self.reweighter, probe_layers=lambda: probe_layers(self._model, cfg.meta_params),
            refresh=cfg.meta_refresh, ema=cfg.meta_ema, precondition=str(cfg.meta_precondition),
            fd_eps=cfg.meta_fd_eps,
            on_probe=lambda p: logger.info(f"--meta-grad fast: meta-gradient on {', '.join(p.names)}"))
        self.meta_batches = MetaBatches(self)
        self._model = None  # the student, for the probes
        self._layers: Optional[List[int]] = None
        self._dumper: Optional[WeightDumper] = None
        self._restored = self._sync_logged = False
        self.drop: Optional[EpochDrop] = None  # --drop-below, built with the training split (get_batch_iterator)
        self._pending_drop, self._left_out, self._train_itr = None, None, None
        self._meta_seen = None  # the meta batch of this update's fresh meta direction (_reference)
        # --source-contrast once: the corpus's source contrast, computed at the first reweighted update (contrast.py)
        self.contrast = CorpusContrast() if (cfg.source_contrast == "once" and "source_contrast" in self.inputs) \
            else None
        if cfg.drop_below is not None:  # a resumed epoch is re-batched once the task has its state (_rebatch_resumed_epoch)
            cfg.rebuild_batches = True
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            atexit.register(_destroy_process_group)

    @staticmethod
    def _check_flags(cfg):
        ReweightConfig.validate(cfg)  # cfg: fairseq's omegaconf view of the dataclass
        for flag, name in (("teacher_length_ratio", "length_ratio"), ("teacher_source_contrast", "source_contrast")):
            if getattr(cfg, flag):
                raise ValueError(f"--{flag.replace('_', '-')} was replaced by --teacher-inputs: name {name} there, "
                                 f"e.g. --teacher-inputs {cfg.teacher_inputs},{name}")
        if cfg.drop_below is not None and cfg.reweight_method == "none":
            raise ValueError("--drop-below leaves out sentences by their weights; with --reweight-method none every "
                             "weight is 1: drop it, or choose l2rw/mwnet/deep")
        if cfg.drop_below is not None:
            check_threshold(cfg.drop_below)
        if cfg.source_contrast not in ("batch", "once"):
            raise ValueError(f"--source-contrast must be batch or once, got {cfg.source_contrast!r}")
        if cfg.source_contrast != "batch" and len(utils.split_paths(str(cfg.data))) > 1:
            raise ValueError(f"--source-contrast {cfg.source_contrast} keeps a value per pair of one training split, "
                             f"but --data has {len(utils.split_paths(str(cfg.data)))} shards (each epoch another): use "
                             "--source-contrast batch")
        if cfg.source_contrast != "batch" and "source_contrast" not in str(cfg.teacher_inputs).split(","):
            raise ValueError(f"--source-contrast {cfg.source_contrast}: the teacher of this run does not read "
                             "source_contrast (its "
                             f"--teacher-inputs are {cfg.teacher_inputs or 'none'}): drop it, or add source_contrast "
                             "to --teacher-inputs (--reweight-method deep)")
        if cfg.source_contrast_refresh < 0:
            raise ValueError(f"--source-contrast-refresh must be >= 0 (updates between passes; 0: never), got "
                             f"{cfg.source_contrast_refresh}")
        if cfg.source_contrast_refresh > 0 and cfg.source_contrast != "once":
            raise ValueError(f"--source-contrast-refresh {cfg.source_contrast_refresh} repeats the corpus pass of "
                             f"--source-contrast once, and this run has --source-contrast {cfg.source_contrast}: drop "
                             "it, or add --source-contrast once")
        if cfg.teacher_prior_reference not in ("train", "meta"):
            raise ValueError(f"--teacher-prior-reference must be train or meta, got {cfg.teacher_prior_reference!r}")
        if cfg.teacher_prior_reference == "meta" and not cfg.teacher_prior:
            raise ValueError("--teacher-prior-reference meta standardises the teacher's prior, and this run has none: "
                             "drop it, or set --teacher-prior (e.g. source_contrast with --reweight-method deep)")
        default = recipe.OTHER_INPUTS.get(str(cfg.reweight_method), "")
        if cfg.reweight_method != "deep" and cfg.teacher_inputs != default:
            raise ValueError(f"--teacher-inputs chooses the inputs of the deep teacher; --reweight-method "
                             f"{cfg.reweight_method} keeps its published form: drop it, or use --reweight-method deep")
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

    # ------------------------------------------------------------------ training
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """One (micro-)batch. The hooks of ``self.strategy`` (core/strategies/__init__.py) around the student's
        forward and backward; ``ignore_grad``: fairseq's padding batch (uniform weights, same collectives)."""
        if not hasattr(criterion, "per_sentence"):
            raise TypeError("--task reweighted_translation needs --criterion reweighted_label_smoothed_cross_entropy")
        model.train()
        model.set_num_updates(update_num)
        inner, device, s = _unwrap(model), sample["target"].device, self.strategy
        self._model = inner
        self._meta_seen = None  # this update's meta forward sets it
        contrast = self._contrast(criterion, model, sample, update_num, real=not ignore_grad)
        s.begin_update(update_num, real=not ignore_grad, params=list(inner.parameters()),
                       meta_loss=lambda: self._meta_loss(inner, criterion, device), optimizer=self._adam(optimizer))
        with torch.autograd.profiler.record_function("forward"), s.forward(device), \
                torch.autocast(device.type, enabled=isinstance(optimizer, AMPOptimizer)):
            out = criterion.per_sentence(model, sample, self._resolve_layers(inner) if self._deep else None)
        if not ignore_grad and not bool(torch.isfinite(out.loss.detach()).all()):
            return self._skip_nonfinite(sample, out, update_num, model, optimizer, criterion.sentence_avg)

        features = self._features(out, update_num, sample, contrast)
        denom = float(sample["target"].size(0) if criterion.sentence_avg else sample["ntokens"])
        lr = self.cfg.meta_lr if self.cfg.meta_lr is not None else optimizer.get_lr()
        weights, info = s.weights(update_num, features, out.loss, lr=lr, denom=denom,
                                  lookahead=lambda: self._lookahead(inner, criterion, sample, device))
        self._reference(inner, criterion, self._meta_seen)  # after s.weights: the teacher exists (also on a resume)
        loss = (weights.to(out.loss.dtype) * out.loss).sum() * (0.0 if ignore_grad else 1.0)
        logging_output = criterion.logging_output(model, sample, out, weights)
        # the [B, T, vocab] logits are not needed by the backward (plain fairseq has freed them by then)
        out = out._replace(net_output=None)
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        s.after_backward(weights, info)

        if self.reweighter.has_teacher and not self._restored and self.reweighter.teacher is not None:
            self._restored = True
            logger.info("teacher initialised fresh (no teacher state restored from a checkpoint)")
        if not ignore_grad:
            if self.drop is not None and update_num >= self.reweighter.warmup:
                self.drop.record(sample["id"], weights)
            logging_output.update(weight_stats(weights))
            logging_output.update(info)
            self._dump(update_num, sample, weights, out.loss)
        return loss, logging_output["sample_size"], _fixed_keys(logging_output, loss)

    def optimizer_step(self, optimizer, model, update_num):
        super().optimizer_step(optimizer, model, update_num)
        if self.strategy.end_update(update_num) and not self._sync_logged:
            self._sync_logged = True
            logger.info(f"teacher identical on all {self.reweighter.world_size} workers after update {update_num} "
                        "(checked every meta update)")

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

    # ------------------------------------------------------------------ what the strategy needs from fairseq
    def _meta_loss(self, inner, criterion, device):
        """The clean per-token NLL of the next meta batch at the current parameters."""
        meta = self._next_meta_batch(inner, device)
        self._meta_seen = meta  # for _reference, after the strategy's probed forward
        out = criterion.per_sentence(inner, meta)
        return out.nll.sum() / out.mask.sum()

    def _reference(self, inner, criterion, meta) -> None:
        """--teacher-prior-reference meta: the meta batch's values of the prior's input, the clean reference the
        teacher standardises its prior by. Its own forward without graph (the RNG untouched: exact resume), as the
        training batches' (source contrast in eval mode)."""
        self._meta_seen = None
        if self.cfg.teacher_prior_reference != "meta" or not self.cfg.teacher_prior or self.reweighter.teacher is None:
            return
        if self.contrast is not None and self.cfg.teacher_prior == "source_contrast":  # the corpus pass's, once
            if self.contrast.reference_pending:
                meta = self.contrast.meta[scored(self.contrast.meta)]
                if self.contrast.passes > 1:  # a refresh: the reference is the new pass's alone
                    self.reweighter.reset_reference(meta[:, 0] - meta[:, 1])
                else:
                    self.reweighter.add_reference(meta[:, 0] - meta[:, 1])
                self.contrast.reference_pending = False
            return
        if meta is None:
            return
        with torch.no_grad(), torch.random.fork_rng(devices=[meta["target"].device]
                                                    if meta["target"].device.type == "cuda" else []), \
                torch.autograd.profiler.record_function("meta_reference"):
            contrast = None
            if self.cfg.teacher_prior == "source_contrast":  # in eval mode, so source_contrast reuses this pass
                was_training = inner.training
                inner.eval()
                try:
                    out = criterion.per_sentence(inner, meta)
                    contrast = criterion.source_contrast(inner, meta, out)
                finally:
                    inner.train(was_training)
            else:
                out = criterion.per_sentence(inner, meta)
            values = FEATURES[self.cfg.teacher_prior].compute(Batch(out, meta, contrast, 0.0))[:, 0]
        self.reweighter.add_reference(values)

    def _lookahead(self, inner, criterion, sample, device):
        """fd/exact: ``(params, train_losses(p), meta_loss(p))`` for the look-ahead (core/strategies/lookahead.py)."""
        student, meta_sample = _Student(inner, criterion), self._next_meta_batch(inner, device)
        self._reference(inner, criterion, meta_sample)
        params = {n: p for n, p in inner.named_parameters() if p.requires_grad}

        def prefixed(p):
            return {"model." + n: t for n, t in p.items()}

        return (params, lambda p: functional_call(student, prefixed(p), (sample,)),
                lambda p: functional_call(student, prefixed(p), (meta_sample, True)))

    def _adam(self, optimizer):
        """The torch optimizer whose Adam moments precondition the meta direction (None: no preconditioning).
        The recipe's preconditioning falls back to none (logged once) for a student without Adam moments."""
        if self.strategy.mode != "fast" or getattr(self.strategy, "precondition", "none") != "adam":
            return None
        inner = optimizer.optimizer
        if self._precondition_optional and not all("betas" in g for g in inner.param_groups):
            logger.info(f"--reweight-recipe {self.cfg.reweight_recipe}: the student's optimizer "
                        f"{type(inner).__name__} is not Adam-type, so the meta direction is not "
                        "preconditioned (--meta-precondition none)")
            self.cfg.meta_precondition = self.strategy.precondition = "none"
            return None
        return inner

    # ------------------------------------------------------------------ teacher inputs
    @property
    def _deep(self) -> bool:
        """Whether the teacher reads decoder states (the criterion then returns those of --teacher-states)."""
        return "states" in self.inputs

    def _active(self, update_num) -> bool:
        return self.reweighter.has_teacher and update_num >= self.reweighter.warmup

    def _features(self, out, update_num, sample, contrast):
        """The teacher's inputs for this batch, where a teacher will read them."""
        return self.teacher_features(out, update_num, sample, contrast) if self._active(update_num) else None

    def _contrast(self, criterion, model, sample, update_num, real=True):
        """The batch's source contrast, where the teacher reads it: from the corpus pass of --source-contrast once
        (run at the first reweighted update, on every worker), or the batch's own (eval-mode passes of the student,
        run before its training forward so that their log-probs never sit beside the training graph). Zeros for
        fairseq's padding batches."""
        if "source_contrast" not in self.inputs or not self._active(update_num):
            return None
        if self.contrast is not None and self.contrast.due(update_num, self.cfg.source_contrast_refresh):
            with torch.autograd.profiler.record_function("source_contrast"):  # left-out pairs keep their values
                self.contrast.build(self, _unwrap(model), criterion, _all_reduce_sum, update_num,
                                    skip=None if self.drop is None else self.drop.dropped)
        if not real:
            return torch.zeros(sample["target"].size(0), device=sample["target"].device)
        if self.contrast is not None:
            self.contrast.check_size(len(self.dataset(self.cfg.train_subset)))
            return self.contrast.values(sample["id"])
        with torch.autograd.profiler.record_function("source_contrast"):
            return criterion.source_contrast(model, sample)

    def teacher_features(self, out, update_num: int, sample=None, contrast=None) -> Optional[torch.Tensor]:
        """The ``[B, D]`` inputs of ``--teacher-inputs`` (features.py) of a batch: ``out`` of criterion.per_sentence
        (with the states of ``--teacher-states`` where ``states`` is an input), ``contrast`` of
        criterion.source_contrast where ``source_contrast`` is; None for a method without a teacher."""
        if not self.inputs:
            return None
        batch = Batch(out, sample, contrast, self._progress(update_num))
        if self.cfg.teacher_prior and self.reweighter.teacher_prior is None:
            self.reweighter.teacher_prior = inputs.column(self.inputs, FEATURES, batch, self.cfg.teacher_prior)
        return inputs.stack(self.inputs, FEATURES, batch)

    def _progress(self, update_num: int) -> float:
        horizon = self.cfg.teacher_progress_horizon or self.cfg.max_update or 10000
        return min(update_num / horizon, 1.0)

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
            sample = {"net_input": {k: v.to(device) for k, v in sample["net_input"].items()}}
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                n = num_decoder_layers(model, sample)
            self._layers = parse_states_spec(self.cfg.teacher_states, n, "decoder layers")
            logger.info(f"deep teacher sees decoder layers {[i + 1 for i in self._layers]} of {n}")
        return self._layers

    # ------------------------------------------------------------------ data and model checks
    def build_model(self, cfg, from_checkpoint=False):
        """fairseq's model, checked at start-up (fairseq-train builds it before loading any checkpoint or
        training data): an unsupported decoder, a --teacher-states layer or --meta-params layers it lacks, and
        a missing or bad meta split fail here, not at the first update."""
        model = super().build_model(cfg, from_checkpoint)
        if not from_checkpoint:  # fairseq-generate & co. load a trained model: nothing to train
            check_model(model)
            if self.reweighter.uses_meta:
                self._meta_dataset()  # a missing, empty or mismatched meta split
            if self._deep:
                self._resolve_layers(model)
            if self.reweighter.uses_meta and self.cfg.meta_grad == "fast":
                probe_layers(model, self.cfg.meta_params)
        return model

    def begin_epoch(self, epoch, model):
        super().begin_epoch(epoch, model)
        if self.reweighter.uses_meta:
            self._meta_dataset()  # fail at the start of training, not at the first update

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        """fairseq's loader; an empty, truncated or corrupt split is an error that names the fix (splits.py)."""
        with splits.explained(self.cfg, split, epoch):
            super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        splits.check_loaded(self.cfg, split, self.datasets[split])

    # ------------------------------------------------------------------ --drop-below: leave out dropped sentences
    def _drops(self, dataset) -> bool:
        return self.cfg.drop_below is not None and dataset is self.datasets.get(self.cfg.train_subset)

    def can_reuse_epoch_itr(self, dataset):
        """The training batches are rebuilt every epoch when sentences are left out."""
        return super().can_reuse_epoch_itr(dataset) and not self._drops(dataset)

    def get_batch_iterator(self, dataset, *args, **kwargs):
        if self._drops(dataset):  # every worker builds its epoch's iterator at the same point: one all-reduce
            if self.drop is None:
                self.drop = EpochDrop(len(dataset), self.cfg.drop_below)
                self.drop.load_state_dict(self._pending_drop)
            epoch = kwargs.get("epoch", 1)
            self._left_out = self.drop.begin_epoch(epoch, _all_reduce_sum).numpy().copy()  # the mask these batches use
            n = int(self._left_out.sum())
            logger.info(f"--drop-below {self.cfg.drop_below}: epoch {epoch} leaves out {n} of {len(dataset)} training "
                        f"sentences ({100.0 * n / max(len(dataset), 1):.1f} %)")
            self._train_itr = super().get_batch_iterator(dataset, *args, **kwargs)
            return self._train_itr
        return super().get_batch_iterator(dataset, *args, **kwargs)

    def _rebatch_resumed_epoch(self) -> None:
        """fairseq's load_checkpoint builds the resumed epoch's iterator (and moves it to the saved position)
        before it hands the task its state; with --drop-below that epoch must leave out the saved mask's
        sentences, so the iterator's batches are rebuilt and it is moved to the same position again."""
        itr, drop = self._train_itr, self.drop
        if itr is None or drop is None or drop.epoch != itr.epoch:
            return
        mask = drop.dropped.numpy().copy()
        if self._left_out is not None and (mask == self._left_out).all():
            return
        self._left_out = mask
        position = itr.iterations_in_epoch
        itr._frozen_batches = None  # fairseq's EpochBatchIterator rebuilds them from its callable batch sampler
        if position > 0:  # moved to the saved position again (else the epoch starts from the rebuilt batches)
            itr.load_state_dict({"version": 2, "epoch": itr.epoch, "iterations_in_epoch": position,
                                 "shuffle": itr.shuffle})
        logger.info(f"--drop-below: resumed epoch {itr.epoch} re-batched without the {int(mask.sum())} sentences "
                    "left out before the checkpoint")

    def filter_indices_by_size(self, indices, dataset, max_positions=None, ignore_invalid_inputs=False):
        indices = super().filter_indices_by_size(indices, dataset, max_positions, ignore_invalid_inputs)
        if self._drops(dataset) and self._left_out is not None:
            indices = indices[~self._left_out[indices]]
        return indices

    def _meta_dataset(self):
        split = self.cfg.meta_subset
        if split not in self.datasets:
            try:
                self.load_dataset(split)  # an empty or truncated split fails there, with the fix
            except FileNotFoundError as e:
                raise FileNotFoundError(splits.missing_meta_message(self.cfg, split, e)) from None
            splits.check_meta_vocab(self.cfg, self.datasets[split], self.src_dict, self.tgt_dict, split, log=logger)
        return self.datasets[split]

    def _next_meta_batch(self, model, device):
        return self.meta_batches.next(model, device)

    def _dump(self, update_num, sample, weights, losses):
        if not self.cfg.dump_weights:
            return
        if self._dumper is None:
            # the first update after a resume is the checkpoint's count: drop rows written after it
            self._dumper = WeightDumper(self.cfg.dump_weights, rank=_rank_world()[0], keep_before=update_num or None)
        self._dumper.write(update_num, sample["id"], weights, losses)
        self._dumper.flush()

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
        direction = self.strategy.state_dict()
        if direction is not None:
            state["meta_direction"] = direction
        meta_itr = self.meta_batches.state_dict()
        if meta_itr is not None:
            state["meta_iterator"] = meta_itr
        if self.drop is not None:
            state["drop"] = self.drop.state_dict()
        if self.contrast is not None and self.contrast.ready:
            state["source_contrast"] = self.contrast.state_dict()
        return state

    def load_state_dict(self, state_dict):
        if not state_dict:
            return
        if self.cfg.reset_teacher:
            logger.info("--reset-teacher: ignoring the teacher state in the checkpoint")
            return
        self.reweighter.load_state_dict(state_dict.get("reweighter", {}))
        self.meta_batches.load_state_dict(state_dict.get("meta_iterator"))
        self.strategy.load_state_dict(state_dict.get("meta_direction"))
        self._pending_drop = state_dict.get("drop")
        if self.contrast is not None:
            self.contrast.load_state_dict(state_dict.get("source_contrast"))
        if self.drop is not None:
            self.drop.load_state_dict(self._pending_drop)
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
        self._rebatch_resumed_epoch()


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


def _all_reduce_sum(t: torch.Tensor) -> None:
    """In-place sum over data-parallel workers (the teacher's gradients and input moments)."""
    if _rank_world()[1] > 1:
        torch.distributed.all_reduce(t)


def _destroy_process_group() -> None:
    """At interpreter exit, before finalisation: fairseq-train leaves the process group alive, and gloo's worker
    threads torn down during finalisation can abort a finished worker (SIGABRT, "terminate called without an
    active exception"; pytorch/pytorch#190489), so a torchrun job that trained to the end reports a failure."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
