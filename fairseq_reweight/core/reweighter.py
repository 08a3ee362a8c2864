"""The reweighting methods behind one interface, shared by the fairseq task and the image trainer.

    rw = Reweighter("deep", teacher_lr=1e-3)
    weights, info = rw.weights(step, features, meta_grad_fn)   # [B], detached, mean 1
    loss = (weights * per_example_losses).sum() / denom

``meta_grad_fn(w) -> MetaGrad`` is a closure over the framework's student and batches, usually
:func:`fairseq_reweight.core.metagrad.weight_gradient` with the batches bound.

Methods:
  ``none``   uniform weights (plain training);
  ``l2rw``   Ren et al. 2018: ``w ∝ max(0, -dL_meta/d eps)`` at eps = 0, every step, no teacher;
  ``mwnet``  Shu et al. 2019: teacher MLP on the example loss only;
  ``deep``   Fan et al. 2021: teacher MLP on the student's internal states + loss statistics +
             training progress (the features are built by the glue; this class does not care).
Before step ``warmup`` every method trains with uniform weights and the teacher is not updated: early
in training nearly every example's gradient agrees with the meta gradient, and the look-ahead then
favours high-loss (often corrupted) examples; a short plain warm-up lets the student first learn
what the clean majority agrees on.
Teacher update (mwnet/deep, every ``meta_interval`` steps): ``w = normalize(teacher(x), max_weight)``, the
meta-gradient ``dL_meta/dw`` at that ``w`` is back-propagated through the normalisation and the
teacher, then one Adam step; the weights returned are recomputed with the updated teacher.
A non-finite meta-gradient or meta loss skips the teacher update (counted in ``info``).

The meta-gradient is rescaled to unit RMS over the batch before it reaches the teacher. Its scale
is proportional to the look-ahead step (the student's learning rate) and to the gradient norms,
both of which change by orders of magnitude over a schedule (warm-up, decays); Adam's second-moment
estimate lags such changes by ~1/(1-beta2) steps, which would all but freeze the teacher after an lr
decay. The direction, which is what ranks the examples, is unchanged.
"""

from typing import Callable, Dict, Optional, Tuple

import torch

from .config import METHODS, WEIGHT_NORMS
from .memory import WeightMemory
from .metagrad import MetaGrad
from .teacher import Teacher
from .weights import check_max_weight, l2rw_weights, normalize

class Reweighter:
    def __init__(
        self,
        method: str,
        meta_interval: int = 1,
        warmup: int = 0,
        teacher_lr: float = 1e-3,
        teacher_hidden: int = 100,
        teacher_layers: int = 1,
        passthrough: int = 0,
        all_reduce: Optional[Callable[[torch.Tensor], None]] = None,
        world_size: int = 1,
        seed: int = 0,
        max_weight: Optional[float] = None,
        teacher_weight_decay: float = 0.0,
        teacher_prior_scale: float = 2.0,
        weight_norm: str = "batch",
        prior_reference: bool = False,
        weight_ema: float = 0.0,
        num_examples: int = 0,
    ):
        if str(method) not in METHODS:
            raise ValueError(f"unknown reweighting method {method!r}; choose one of {', '.join(METHODS)}")
        if meta_interval < 1:
            raise ValueError(f"meta interval must be >= 1, got {meta_interval}")
        check_max_weight(max_weight)
        if weight_norm not in WEIGHT_NORMS:
            raise ValueError(f"--weight-norm must be one of {', '.join(WEIGHT_NORMS)}, got {weight_norm!r}")
        # batch: mean one per batch; running: divided by the teacher's running mean output (decay 0.98); the
        # teacher's gradient is the batch normalisation's under both (core/weights.py)
        self.weight_norm = weight_norm
        self.method = str(method)
        self.max_weight = max_weight  # cap of the normalised weights (None: no cap), see weights.normalize
        self.meta_interval = meta_interval
        self.warmup = warmup  # steps of plain (uniform) training before any reweighting or teacher update
        self.teacher_lr = teacher_lr
        self.teacher_hidden = teacher_hidden
        if not teacher_weight_decay >= 0:
            raise ValueError(f"--teacher-weight-decay must be >= 0, got {teacher_weight_decay}")
        # decoupled (AdamW): each step shrinks the teacher's parameters by lr * decay, which bounds the random
        # walk that a noisy meta-gradient drives on inputs that carry no signal
        self.teacher_weight_decay = teacher_weight_decay
        self.teacher_layers = teacher_layers
        self.passthrough = passthrough  # last feature columns the teacher does not standardise
        # data parallel: an in-place sum over workers; the teacher's gradients, its input moments and the
        # count of meta-gradients are summed in `step_teacher`, so every worker keeps an identical teacher
        self.all_reduce = all_reduce
        self.world_size = world_size
        self.seed = seed  # the teacher's initialisation: the same on every worker, whatever the global RNG
        # an input column the teacher starts from (Teacher's ``prior``); set before the teacher is built
        self.teacher_prior: Optional[int] = None
        self.teacher_prior_scale = teacher_prior_scale
        self.prior_reference = prior_reference  # the prior standardised by a clean reference's moments (Teacher)
        # --weight-ema: each example's teacher output averaged over its visits (core/memory.py; needs example ids)
        self.memory = WeightMemory(weight_ema, num_examples) if weight_ema > 0 else None
        self.teacher: Optional[Teacher] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.meta_steps = 0
        self.meta_skipped = 0
        self._pending: Optional[dict] = None
        self._accumulated = 0  # meta-gradients back-propagated into the teacher since its last step
        # dL_meta/dw of the last finite meta-gradient (diagnostics: the image trainer scores it against the flags)
        self.last_grad_w: Optional[torch.Tensor] = None

    @property
    def has_teacher(self) -> bool:
        return self.method in ("mwnet", "deep")

    @property
    def uses_meta(self) -> bool:
        return self.method != "none"

    def is_meta_step(self, step: int) -> bool:
        if step < self.warmup:
            return False
        return self.method == "l2rw" or (self.has_teacher and step % self.meta_interval == 0)

    # ------------------------------------------------------------------ teacher lifecycle
    def ensure_teacher(self, in_dim: int, device: torch.device) -> Teacher:
        """Build the teacher on first use (its input size is the student's feature size)."""
        if self.teacher is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.teacher = Teacher(in_dim, self.teacher_hidden, self.teacher_layers, self.passthrough,
                                       self.teacher_prior, self.teacher_prior_scale,
                                       running_output=self.weight_norm == "running",
                                       prior_reference=self.prior_reference).to(device)
            if self.teacher_weight_decay > 0:  # the decay pulls the MLP towards zero, not the prior's scale
                prior = [p for n, p in self.teacher.named_parameters() if n == "prior_scale"]
                rest = [p for n, p in self.teacher.named_parameters() if n != "prior_scale"]
                self.optimizer = torch.optim.AdamW(
                    [{"params": rest}] + ([{"params": prior, "weight_decay": 0.0}] if prior else []),
                    lr=self.teacher_lr, weight_decay=self.teacher_weight_decay)
            else:
                self.optimizer = torch.optim.Adam(self.teacher.parameters(), lr=self.teacher_lr)
            if self._pending is not None:
                state, self._pending = self._pending, None
                if state["in_dim"] != in_dim:
                    raise ValueError(
                        f"the checkpoint's teacher takes {state['in_dim']} input features but this student "
                        f"gives {in_dim}: resume with the same --teacher-states/architecture, or start a "
                        "fresh teacher with --reset-teacher"
                    )
                keys = state["teacher"]
                groups = keys["out_norm.mean"].numel() if "out_norm.mean" in keys else 0
                saved = "batch" if groups == 0 else "running" if groups == 1 else "running-length"
                if saved == "running-length":  # sessions 23-24 only
                    raise ValueError(
                        "the checkpoint's teacher was trained with --weight-norm running-length, which was removed "
                        "(session 25: no measured effect): continue with --weight-norm running --reset-teacher")
                if saved != self.weight_norm:
                    raise ValueError(
                        f"the checkpoint's teacher was trained with --weight-norm {saved} but this run uses "
                        f"--weight-norm {self.weight_norm}: resume with the same --weight-norm, or --reset-teacher")
                self.teacher.load_state_dict(state["teacher"])
                self.optimizer.load_state_dict(state["optimizer"])  # moves its state to `device`
                pending = state.get("pending_moments")
                self.teacher.norm._acc = None if pending is None else pending.to(device)
                if self.teacher.out_norm is not None:
                    pending = state.get("pending_out_norm", state.get("pending_output"))  # older name: session 21
                    if pending is not None and pending.numel() == 3:  # [sum, sum of squares, n] before session 23
                        pending = pending[[0, 2]]
                    self.teacher.out_norm._acc = None if pending is None else pending.to(device)
                if self.teacher.reference is not None:
                    pending = state.get("pending_reference")
                    self.teacher.reference._acc = None if pending is None else pending.to(device)
        elif self.teacher.in_dim != in_dim:
            raise ValueError(f"teacher built for {self.teacher.in_dim} features, got {in_dim}")
        return self.teacher

    def state_dict(self) -> dict:
        if self.teacher is None:
            return dict(self._pending) if self._pending is not None else {}
        return {
            "method": self.method,
            "in_dim": self.teacher.in_dim,
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "meta_steps": self.meta_steps,
            "meta_skipped": self.meta_skipped,
            # input moments of batches since the last meta update (--meta-interval > 1), for an exact resume
            "pending_moments": self.teacher.norm._acc,
            "pending_out_norm": None if self.teacher.out_norm is None else self.teacher.out_norm._acc,
            "pending_reference": None if self.teacher.reference is None else self.teacher.reference._acc,
            **({} if self.memory is None else {"weight_memory": self.memory.state_dict()}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved teacher; applied when the teacher is built on the student's device."""
        if not state:
            return
        if state.get("method") != self.method:
            raise ValueError(
                f"the checkpoint's teacher was trained with --reweight-method {state.get('method')} but this run "
                f"uses {self.method}: use the same method, or --reset-teacher to start a fresh teacher"
            )
        self.meta_steps = state.get("meta_steps", 0)
        self.meta_skipped = state.get("meta_skipped", 0)
        if self.memory is not None and "weight_memory" in state:  # a memory saved without one starts empty
            self.memory.load_state_dict(state["weight_memory"])
        self.teacher, self.optimizer, self._pending = None, None, state

    # ------------------------------------------------------------------ weights
    # One protocol for the teacher: ``teacher_weights`` gives the weights (with their graph on meta updates),
    # ``accumulate`` back-propagates a meta-gradient of those weights into the teacher, ``step_teacher`` steps
    # it (all-reducing over data-parallel workers) and ``end_update`` folds in the input moments. The
    # look-ahead strategies (--meta-grad fd/exact) run all of it inside ``weights``, before the student's step;
    # ``--meta-grad fast`` calls the pieces around the student's own backward (core/strategies/).
    def weights(
        self,
        step: int,
        features: Optional[torch.Tensor],
        meta_grad_fn: Optional[Callable[[torch.Tensor], MetaGrad]],
        batch_size: Optional[int] = None,
        device: Optional[torch.device] = None,
        ids: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Normalised weights for this batch (detached) and a dict of diagnostics to log; on a meta step the
        teacher learns from ``meta_grad_fn(w)`` first and the weights come from the updated teacher. ``ids``: the
        examples' indices in the training set (``--weight-ema``)."""
        info: Dict[str, float] = {}
        if features is not None:
            batch_size, device = features.shape[0], features.device
        ones = torch.ones(batch_size, device=device)
        if self.method == "none" or step < self.warmup:
            return ones, info
        if self.method == "l2rw":
            return self.l2rw(meta_grad_fn(torch.zeros_like(ones)), info), info
        meta = self.is_meta_step(step)
        w, w_graph = self.teacher_weights(step, features, ids, stage=not meta)
        if w_graph is None:
            return w, info
        self.zero_teacher_grad()
        self.accumulate(w_graph, meta_grad_fn(w), info)
        self.step_teacher()
        with torch.no_grad():  # the updated teacher's weights are the ones the batch trains with
            return self._normalize(self._remember(self.teacher(features.detach().float()), ids)), info

    def l2rw(self, mg: MetaGrad, info: Dict[str, float]) -> torch.Tensor:
        """L2RW weights from the meta-gradient at ``w = 0`` (uniform if no example helps)."""
        w, fell_back = l2rw_weights(mg.grad_w, self.max_weight)
        self._count(info, mg)
        info["l2rw_uniform"] = float(fell_back)
        return w

    # ------------------------------------------------------------------ deferred teacher update (--meta-grad fast)
    # The student's update uses the teacher's current weights; the meta-gradient of those weights is
    # computed from the student's own backward (see probe.py), back-propagated into the teacher with
    # `accumulate` (once per micro-batch) and applied by `step_teacher` once per update.
    def teacher_weights(self, step: int, features: torch.Tensor, ids: Optional[torch.Tensor] = None,
                        stage: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(weights, weights_with_graph)``: the second is None unless this is a teacher meta step. ``ids``: the
        examples' indices (``--weight-ema``); ``stage``: these are the weights the batch trains with (remembered)."""
        teacher = self.ensure_teacher(features.shape[1], features.device)
        feats = features.detach().float()
        teacher.norm.accumulate(feats[:, : feats.shape[1] - teacher.passthrough])  # folded in by end_update
        if self.is_meta_step(step):
            w = self._normalize(self._remember(teacher(feats), ids, stage), accumulate=True)
            return w.detach(), w
        with torch.no_grad():
            return self._normalize(self._remember(teacher(feats), ids, stage), accumulate=True), None

    def _remember(self, raw: torch.Tensor, ids: Optional[torch.Tensor], stage: bool = True) -> torch.Tensor:
        """The teacher's outputs averaged into the examples' memory (``--weight-ema``; as they are without one)."""
        if self.memory is None:
            return raw
        if ids is None:
            raise ValueError("--weight-ema needs the examples' ids: pass ids= to the strategy's weights()")
        mixed = self.memory.mix(ids, raw)
        if stage:
            self.memory.stage(ids, mixed)
        return mixed

    def _normalize(self, raw: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
        """The teacher's output -> the batch's weights (``--weight-norm``); ``accumulate``: the output's mean
        over batches takes this batch in (folded in by :meth:`end_update`)."""
        out_norm = self.teacher.out_norm
        if out_norm is None:
            return normalize(raw, self.max_weight)
        if accumulate:
            out_norm.accumulate(raw.detach())
        return normalize(raw, self.max_weight, scale=self.teacher.output_scale())

    def add_reference(self, values: torch.Tensor) -> None:
        """Clean reference values of the prior's input (``[B]``, the meta set's), folded in by :meth:`end_update`;
        nothing before the teacher exists or without ``prior_reference``."""
        if self.teacher is not None and self.teacher.reference is not None:
            values = values.detach().float()
            self.teacher.reference.accumulate(values[torch.isfinite(values)][:, None])  # a NaN would stay for good

    def reset_reference(self, values: torch.Tensor) -> None:
        """Replace the clean reference by ``values`` alone (``[B]``: a new pass over the meta set, the same on every
        worker); nothing before the teacher exists or without ``prior_reference``."""
        if self.teacher is not None and self.teacher.reference is not None:
            values = values.detach().float()
            self.teacher.reference.reset(values[torch.isfinite(values)][:, None])

    def accumulate(self, w: torch.Tensor, mg: MetaGrad, info: Dict[str, float]) -> bool:
        """Back-propagate ``dL_meta/dw`` through the weights ``w`` into the teacher's gradients."""
        ok = self._count(info, mg, step=False) and self._backward(w, mg)
        self._accumulated += int(ok)
        return ok

    def end_update(self) -> None:
        """Fold the input moments of this update's batches into the teacher's normaliser (summed over
        data-parallel workers). The one rule for every method and meta-gradient: moments are accumulated
        per batch and folded in once per update, after the optimizer step. Call it on every worker after
        every update (and after :meth:`step_teacher` on meta updates)."""
        if self.teacher is None:
            return
        if self.memory is not None:
            self.memory.commit(self.all_reduce if self.world_size > 1 else None)
        for norm in (self.teacher.norm, self.teacher.out_norm, self.teacher.reference):
            if norm is not None:
                norm.commit(self.all_reduce if self.world_size > 1 else None)

    def step_teacher(self) -> None:
        """Take one teacher step from the accumulated gradients. Call it once per meta update on every
        worker (data parallel: it all-reduces), before :meth:`end_update`."""
        if self.teacher is None:
            return
        params = [p for p in self.teacher.parameters()]
        if self.all_reduce is not None and self.world_size > 1:
            flat = torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in params]
                             + [flat_count(self._accumulated, params[0])])
            self.all_reduce(flat)
            self._accumulated, offset = int(flat[-1].item()), 0
            for p in params:
                p.grad = (flat[offset:offset + p.numel()].view_as(p) / self.world_size).clone()
                offset += p.numel()
        if self._accumulated > 0:

            self.optimizer.step()
            self.meta_steps += 1
        self.zero_teacher_grad()

    def check_in_sync(self, step: int) -> bool:
        """Data parallel: raise if the workers' teachers differ (a checksum of parameters and moments,
        summed over workers). Returns True when a check ran. Call on every worker."""
        if self.teacher is None or self.all_reduce is None or self.world_size <= 1:
            return False
        flat = torch.cat([t.detach().double().flatten()
                          for t in list(self.teacher.parameters()) + list(self.teacher.buffers())]
                         + ([] if self.memory is None else [self.memory.checksum().reshape(1)]))
        s = torch.stack([flat.sum(), (flat * flat).sum()])
        stats = torch.cat([s, s * s])  # sum over workers of the checksums and of their squares
        self.all_reduce(stats)
        n = float(self.world_size)
        spread = (stats[2:] / n - (stats[:2] / n) ** 2).clamp_min(0).sqrt()  # std of each checksum over workers
        if float(spread.max()) > 1e-6 * (1.0 + float(s.abs().max())):
            raise RuntimeError(f"update {step}: the teacher differs between data-parallel workers (checksum spread "
                               f"{float(spread.max()):.3g}); please report this with your command line")
        return True

    def zero_teacher_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self._accumulated = 0

    def _backward(self, w: torch.Tensor, mg: MetaGrad) -> bool:
        w.backward(_unit_rms(mg.grad_w).to(w.dtype))
        return True

    def _count(self, info: Dict[str, float], mg: MetaGrad, step: bool = True) -> bool:
        """Log a meta-gradient; False (and counted as skipped) if it is not finite. ``step``: it is also
        a meta update (l2rw, and the fd/exact teacher step); the deferred path counts in step_teacher."""
        ok = bool(torch.isfinite(mg.grad_w).all()) and bool(torch.isfinite(mg.meta_loss))
        info["meta_steps"] = 1.0
        if ok:
            self.meta_steps += int(step)
            info["meta_loss"] = float(mg.meta_loss)
            self.last_grad_w = mg.grad_w.detach()
        else:
            self.meta_skipped += 1
            info["meta_skipped"] = 1.0
        return ok


def flat_count(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([float(n)], dtype=like.dtype, device=like.device)


def _unit_rms(g: torch.Tensor) -> torch.Tensor:
    rms = g.float().pow(2).mean().sqrt()
    return g / rms if rms > 0 else g
