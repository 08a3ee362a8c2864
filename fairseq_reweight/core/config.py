"""The reweighting flags, declared once: the fairseq task's config inherits :class:`ReweightConfig`, the image
CLI generates its flags from it (:func:`add_arguments`), and :meth:`ReweightConfig.validate` rejects
combinations that would be silently ignored, for both."""

from dataclasses import MISSING, dataclass, field, fields
from enum import Enum, EnumMeta
from typing import Optional, Sequence, Union, get_args, get_origin

from .probe import MetaDirection
from .weights import check_max_weight

METHODS = ("none", "l2rw", "mwnet", "deep")
META_GRADS = ("fast", "fd", "exact")
RECIPES = ("tuned", "paper")
WEIGHT_NORMS = ("batch", "running")


class _ChoiceMeta(EnumMeta):
    def __contains__(cls, item):
        return any(item == m.value for m in cls)


class StrEnum(Enum, metaclass=_ChoiceMeta):
    """A choice that compares and prints as its string (what fairseq's ``ChoiceEnum`` gives, without fairseq)."""

    def __str__(self):
        return self.value

    def __eq__(self, other):
        return self.value == (other.value if isinstance(other, Enum) else other)

    def __repr__(self):
        return self.value

    def __hash__(self):
        return hash(str(self))


def choices(values: Sequence[str]):
    return StrEnum("Choices", {v: v for v in values})


@dataclass
class ReweightConfig:
    reweight_method: choices(METHODS) = field(default="deep", metadata={
        "help": "none: uniform weights (plain training); l2rw: Ren et al. 2018; mwnet: Shu et al. 2019 (teacher "
                "sees the loss); deep: Fan et al. 2021 (teacher sees the student's internal states)"})
    reweight_recipe: choices(RECIPES) = field(default="tuned", metadata={
        "help": "what unset flags of deep mean: tuned (the best measured recipe) or paper (Fan et al. 2021 as "
                "published); l2rw/mwnet keep their published forms under both"})
    meta_interval: int = field(default=1, metadata={"help": "update the teacher every N updates"})
    reweight_warmup: Optional[int] = field(default=None, metadata={
        "help": "train with uniform weights (no teacher or meta updates) for the first N updates"})
    meta_grad: choices(META_GRADS) = field(default="fast", metadata={
        "help": "fast: first-order meta-gradient on the layers of --meta-params, from the student's own "
                "forward/backward; fd: all parameters through the one-step look-ahead, by finite differences; "
                "exact: second-order autograd through the look-ahead (the reference)"})
    meta_params: str = field(default="auto", metadata={
        "help": "fast only: comma-separated layers whose parameters the meta-gradient uses (README)"})
    meta_precondition: choices(("auto", "none", "adam")) = field(default="auto", metadata={
        "help": "fast only: adam scores each example along the step the student's Adam takes; none: along the raw "
                "gradient, as in the papers"})
    meta_lr: Optional[float] = field(default=None, metadata={
        "help": "fd/exact only: step size of the look-ahead (default: the current learning rate)"})
    meta_batch_size: Optional[int] = field(default=None, metadata={"help": "meta batch size (default --batch-size)"})
    meta_refresh: Optional[int] = field(default=None, metadata={
        "help": "fast only: a fresh meta direction every N meta updates, reused in between"})
    meta_ema: Optional[float] = field(default=None, metadata={
        "help": "fast only: exponential average of the fresh meta directions with this decay (0: the latest)"})
    meta_fd_eps: float = field(default=1e-3, metadata={
        "help": "fd only: finite-difference step relative to the parameter norm"})
    max_weight: Optional[float] = field(default=None, metadata={
        "help": "cap each normalised weight (mean 1 over the batch) at this value > 1; 0: no cap"})
    weight_norm: Optional[choices(WEIGHT_NORMS)] = field(default=None, metadata={
        "help": "batch: the teacher's outputs divided by their batch mean; running: by their mean over many "
                "batches, so a batch of mostly bad examples gets little weight (default: the recipe's)"})
    teacher_lr: Optional[float] = field(default=None, metadata={"help": "teacher Adam lr (mwnet/deep; default 1e-3, the NMT tuned deep recipe 1e-4)"})
    teacher_hidden: int = field(default=100, metadata={"help": "teacher MLP hidden size"})
    teacher_weight_decay: float = field(default=0.0, metadata={
        "help": "decoupled (AdamW) weight decay of the teacher's parameters"})
    teacher_states: str = field(default="last", metadata={
        "help": "student states the deep teacher sees: last, all, or 1-based indices like 1,3"})
    teacher_progress_horizon: int = field(default=0, metadata={
        "help": "updates that count as training progress 1.0 (default: the run's total)"})
    reset_teacher: bool = field(default=False, metadata={"help": "ignore the teacher state in the checkpoint"})
    dump_weights: Optional[str] = field(default=None, metadata={
        "help": "append per-example 'update id weight loss' rows to this TSV file"})

    def validate(self) -> None:
        """Reject flag combinations that would be silently ignored (after the recipe is resolved)."""
        m, grad, precondition = str(self.reweight_method), str(self.meta_grad), str(self.meta_precondition)
        if m not in METHODS:
            raise ValueError(f"unknown --reweight-method {m!r}; choose one of {', '.join(METHODS)}")
        if grad not in META_GRADS:
            raise ValueError(f"--meta-grad must be one of {', '.join(META_GRADS)}, got {grad!r}")
        if precondition not in ("auto", "none", "adam"):
            raise ValueError(f"--meta-precondition must be none or adam, got {precondition!r}")
        if precondition == "adam" and (m == "none" or grad != "fast"):
            raise ValueError(f"--meta-precondition adam preconditions the meta direction of --meta-grad fast: it has "
                             f"no effect with --reweight-method {m} --meta-grad {grad}; drop it, or use a reweighting "
                             "method with --meta-grad fast")
        check_max_weight(self.max_weight)
        if self.max_weight is not None and m == "none":
            raise ValueError("--max-weight caps the weights of a reweighting method; with --reweight-method none "
                             "every weight is 1: drop it, or choose l2rw/mwnet/deep")
        refresh, ema = self.meta_refresh or 1, self.meta_ema or 0.0
        if (refresh != 1 or ema != 0.0) and (m == "none" or grad != "fast"):
            raise ValueError("--meta-refresh/--meta-ema reuse and average the meta direction of --meta-grad fast: "
                             f"they have no effect with --reweight-method {m} --meta-grad {grad}; drop them, or use "
                             "a reweighting method with --meta-grad fast")
        MetaDirection(refresh, ema)  # range checks of --meta-refresh/--meta-ema
        for flag, value in (("--teacher-lr", self.teacher_lr), ("--teacher-weight-decay",
                                                                self.teacher_weight_decay or None)):
            if m in ("none", "l2rw") and value is not None:
                raise ValueError(f"{flag} has no effect with --reweight-method {m} (no teacher): drop it, "
                                 "or use --reweight-method mwnet/deep")
        if self.weight_norm is not None and str(self.weight_norm) not in WEIGHT_NORMS:
            raise ValueError(f"--weight-norm must be one of {', '.join(WEIGHT_NORMS)}, got {self.weight_norm!r}")
        if str(self.weight_norm).startswith("running") and m in ("none", "l2rw"):
            raise ValueError(f"--weight-norm {self.weight_norm} divides a teacher's outputs by their running mean; "
                             f"--reweight-method {m} has no teacher: drop it, or use mwnet/deep")
        if m == "l2rw" and self.meta_interval != 1:
            raise ValueError("l2rw computes weights from the meta-gradient at every update: drop --meta-interval")
        if self.meta_interval < 1:
            raise ValueError(f"--meta-interval must be >= 1, got {self.meta_interval}")
        if m != "deep" and self.teacher_states != "last":
            raise ValueError(f"--teacher-states only applies to --reweight-method deep, not {m}")
        if self.meta_fd_eps <= 0:
            raise ValueError(f"--meta-fd-eps must be > 0, got {self.meta_fd_eps}")
        if self.meta_lr is not None and (m == "none" or grad == "fast"):
            # fast: dL/dw = -(lr/denom) <grad L_meta, grad l_i>; the teacher sees it rescaled to unit RMS and l2rw
            # normalises max(0, -dL/dw) over the batch, so the step size cancels
            raise ValueError(f"--meta-lr sets the look-ahead step of --meta-grad fd/exact; it has no effect with "
                             f"--reweight-method {m} --meta-grad {grad} (the step size cancels in the weights): "
                             "drop it, or use --meta-grad fd/exact")
        if self.reweight_warmup is not None and self.reweight_warmup < 0:
            raise ValueError(f"--reweight-warmup must be >= 0, got {self.reweight_warmup}")


def add_arguments(parser, cls=ReweightConfig, exclude: Sequence[str] = (), defaults=None) -> None:
    """argparse flags ``--field-name`` for the fields of the dataclass ``cls`` (help from the field metadata,
    choices from choice types, ``store_true`` for booleans), like fairseq's ``gen_parser_from_dataclass``."""
    for f in fields(cls):
        if f.name in exclude or f.name.startswith("_"):
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        if defaults is not None:
            default = getattr(defaults, f.name, default)
        kind = f.type
        if get_origin(kind) is Union:  # Optional[X]
            kind = next(a for a in get_args(kind) if a is not type(None))
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help")
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=bool(default), help=help_)
        elif isinstance(kind, type) and issubclass(kind, Enum):
            parser.add_argument(flag, choices=[m.value for m in kind], default=None if default is None else str(default),
                                help=help_)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_)


