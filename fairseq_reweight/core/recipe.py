"""``--reweight-recipe``: what the flags a user leaves unset mean.

``tuned`` (the default) is the best configuration measured for ``deep`` on noisy Multi30k (README, Results):
a plain warm-up of the first third of ``--max-update``, source contrast among the teacher's inputs, a fresh
meta direction every 4 meta updates averaged with decay 0.9, weights capped at 2 and divided by the teacher's
running mean output (not the batch mean: fairseq's length-bucketed batches of mostly misaligned pairs would
otherwise get mean weight one), the meta direction preconditioned like the student's Adam step, the prior
standardised by the clean meta set's source contrast (not the training batches': those make the teacher weight the
lower part of any corpus, a clean one too, near zero), the pairs whose mean weight in an epoch fell below 0.25
left out of later epochs (the teacher as a filter during training), and the source contrast computed once for the
whole corpus when reweighting starts (session 28: level with the per-batch contrast on noisy data, +1.7 BLEU on
clean data, 1.2x instead of 1.9x plain time; per batch where it cannot be: sharded --data) and once more half-way
through the reweighted updates (session 32: the first pass's contrast had gone stale by the last epochs). ``paper`` is Fan et al. (2021)
as published: no warm-up, the
teacher on decoder states, token-loss statistics and progress, a fresh meta direction every update, no
cap, the raw look-ahead direction. ``l2rw`` and ``mwnet`` keep their published forms under both recipes.
A flag given explicitly always wins over the recipe.
"""

import math
from typing import Optional

from .config import RECIPES  # noqa: F401

# what `tuned` sets for `deep` (flag -> value); `paper` and the other methods use the plain values
TUNED_DEEP = {"meta_refresh": 4, "meta_ema": 0.9, "max_weight": 2.0, "meta_precondition": "adam",
              "teacher_inputs": "states,token_stats,source_contrast,progress", "warmup_fraction": 1 / 3,
              "teacher_prior": "source_contrast", "teacher_prior_scale": 4.0, "teacher_lr": 1e-4,
              "weight_norm": "running", "drop_below": 0.25, "teacher_prior_reference": "meta",
              "source_contrast": "once", "source_contrast_refresh": 0.5}
PLAIN = {"meta_refresh": 1, "meta_ema": 0.0, "max_weight": None, "meta_precondition": "none",
         "teacher_inputs": "states,token_stats,progress", "warmup_fraction": 0.0,
         "teacher_prior": "", "teacher_prior_scale": 2.0, "teacher_lr": 1e-3, "weight_norm": "batch",
         "drop_below": 0.0, "teacher_prior_reference": "train", "source_contrast": "batch",
         "source_contrast_refresh": 0.0}
# images (Fashion-MNIST, 40 % uniform noise, 2 seeds, examples/image/max_weight/): the deep teacher capped at 2
# and decayed (+3.2 points over none, weight AUC 0.93/0.94; uncapped and undecayed: AUC 0.87/0.79); with the cheap
# meta-gradient (--meta-grad fast on the last stage, the image default) a fresh meta direction every 4 updates,
# averaged with decay 0.9 (every 8 costs 1.1x instead of 1.25-1.35x plain time, but lost 0.6 and 2.1 points on 40 %
# uniform noise, seeds 1 and 2: examples/image/session29/); the teacher starting from the example's loss, scale 0.5
# (session 31, examples/image/session31/: higher last-epoch accuracy and weight AUC on 40 % uniform and flip noise;
# scale 2 from the first update collapsed the student, scale 2 after 90 plain updates ended at AUC 0.85); with the
# prior, every 8 updates (1.11x) and the tail from the last block (1.14x) still lost accuracy (session 33); each
# example trained with the teacher's outputs averaged over its epochs, decay 0.8 per visit (session 36,
# examples/image/session36/: last-epoch weight AUC on 40 % flip noise 0.928 -> 0.967 at 3,000 images, 0.751 -> 0.98
# at 10,000; the teacher misjudges whole clusters of one class under one wrong label, differently each epoch),
# and with it a fresh meta direction every 5 updates instead of 4 (session 36: level or better on both noises, cheaper)
TUNED_DEEP_IMAGE = {"max_weight": 2.0, "teacher_weight_decay": 3.0, "meta_refresh": 5, "meta_ema": 0.9,
                    "teacher_prior": "loss", "teacher_prior_scale": 0.5, "weight_ema": 0.8}
PLAIN_IMAGE = {"max_weight": None, "teacher_weight_decay": 0.0, "meta_refresh": 1, "meta_ema": 0.0,
               "teacher_prior": "none", "teacher_prior_scale": 2.0, "weight_ema": 0.0}
# the teacher's inputs of the other methods (their published forms): MW-Net reads the loss; l2rw/none have no teacher
OTHER_INPUTS = {"mwnet": "loss"}


def _check(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"--reweight-recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")


def _cap(max_weight: Optional[float], default: Optional[float]) -> Optional[float]:
    """An explicit --max-weight wins (0: no cap); unset: the recipe's."""
    return default if max_weight is None else (None if max_weight == 0 else max_weight)


def resolve(recipe: str, method: str, meta_grad: str, max_update: int, *, meta_refresh: Optional[int] = None,
            meta_ema: Optional[float] = None, max_weight: Optional[float] = None,
            meta_precondition: str = "auto", teacher_inputs: str = "auto",
            reweight_warmup: Optional[int] = None, teacher_prior: str = "auto",
            teacher_prior_scale: Optional[float] = None, teacher_lr: Optional[float] = None,
            weight_norm: Optional[str] = None, drop_below: Optional[float] = None,
            teacher_prior_reference: str = "auto", source_contrast: str = "auto",
            source_contrast_refresh: Optional[int] = None) -> dict:
    """The values of the recipe-dependent flags: the explicit ones (not None / "auto") as given, the others
    from the recipe. ``max_weight`` 0 means no cap, ``drop_below`` 0 no drop (None out); ``teacher_prior`` "none" means no prior. Flags of
    ``--meta-grad fast`` only stay plain with fd/exact, and ``teacher_lr`` stays unset for methods without a
    teacher, so that the checks of flags without effect do not fire on values the user did not set."""
    _check(recipe)
    base = TUNED_DEEP if (recipe == "tuned" and method == "deep") else PLAIN
    fast_only = {"meta_refresh", "meta_ema", "meta_precondition"}
    default = {k: (PLAIN[k] if (k in fast_only and meta_grad != "fast") else v) for k, v in base.items()}
    out = {
        "meta_refresh": default["meta_refresh"] if meta_refresh is None else meta_refresh,
        "meta_ema": default["meta_ema"] if meta_ema is None else meta_ema,
        "max_weight": _cap(max_weight, default["max_weight"]),
        "meta_precondition": default["meta_precondition"] if meta_precondition == "auto" else meta_precondition,
        "teacher_inputs": ((default["teacher_inputs"] if method == "deep" else OTHER_INPUTS.get(method, ""))
                           if teacher_inputs in (None, "auto") else teacher_inputs),
        "teacher_lr": ((default["teacher_lr"] if method in ("mwnet", "deep") else None)
                       if teacher_lr is None else teacher_lr),
        "teacher_prior_scale": default["teacher_prior_scale"] if teacher_prior_scale is None else teacher_prior_scale,
        "weight_norm": default["weight_norm"] if weight_norm is None else str(weight_norm),
        "reweight_warmup": (int(round(default["warmup_fraction"] * max_update)) if max_update and max_update > 0
                            else 0) if reweight_warmup is None else reweight_warmup,
    }
    if teacher_prior in (None, "auto"):  # the recipe's prior, where the teacher reads that input
        prior = default["teacher_prior"] if method == "deep" else ""
        out["teacher_prior"] = prior if prior in out["teacher_inputs"].split(",") else ""
    else:
        out["teacher_prior"] = "" if teacher_prior == "none" else teacher_prior
    out["teacher_prior_reference"] = (  # the recipe's reference only where there is a prior
        (default["teacher_prior_reference"] if out["teacher_prior"] else "train")
        if teacher_prior_reference in (None, "auto") else str(teacher_prior_reference))
    out["drop_below"] = _cap(drop_below, default["drop_below"] or None)
    if source_contrast in (None, "auto"):  # the corpus pass only where the teacher reads the contrast
        reads = "source_contrast" in out["teacher_inputs"].split(",")
        out["source_contrast"] = default["source_contrast"] if reads else "batch"
    else:
        out["source_contrast"] = str(source_contrast)
    if source_contrast_refresh is not None:
        out["source_contrast_refresh"] = int(source_contrast_refresh)
    else:  # the recipe's fraction of the reweighted updates, rounded up: a fraction of 1/2 gives one pass half-way
        span = max_update - out["reweight_warmup"] if max_update and max_update > 0 else 0
        fraction = default["source_contrast_refresh"] if out["source_contrast"] == "once" else 0.0
        every = math.ceil(fraction * span) if fraction > 0 else 0
        # none where the pass would come at the last update (too short a run to use it)
        out["source_contrast_refresh"] = every if every and out["reweight_warmup"] + every < max_update - 1 else 0
    return out


def resolve_image(recipe: str, method: str, meta_grad: str = "fast", *, max_weight: Optional[float] = None,
                  teacher_weight_decay: Optional[float] = None, weight_norm: Optional[str] = None,
                  meta_refresh: Optional[int] = None, meta_ema: Optional[float] = None,
                  teacher_prior: Optional[str] = "auto", teacher_prior_scale: Optional[float] = None,
                  weight_ema: Optional[float] = None) -> dict:
    """The image trainer's recipe-dependent flags (as :func:`resolve`: explicit values win, 0 = no cap; the flags
    of ``--meta-grad fast`` stay plain with fd/exact; the prior only for ``deep``)."""
    _check(recipe)
    base = TUNED_DEEP_IMAGE if (recipe == "tuned" and method == "deep") else PLAIN_IMAGE
    fast = meta_grad == "fast"
    return {"max_weight": _cap(max_weight, base["max_weight"]),
            "teacher_weight_decay": (base["teacher_weight_decay"] if method in ("mwnet", "deep") else 0.0)
            if teacher_weight_decay is None else teacher_weight_decay,
            "weight_norm": "batch" if weight_norm is None else str(weight_norm),
            "meta_refresh": (base["meta_refresh"] if fast else 1) if meta_refresh is None else meta_refresh,
            "meta_ema": (base["meta_ema"] if fast else 0.0) if meta_ema is None else meta_ema,
            "teacher_prior": (base["teacher_prior"] if method == "deep" else "none")
            if teacher_prior in (None, "auto") else str(teacher_prior),
            "teacher_prior_scale": base["teacher_prior_scale"] if teacher_prior_scale is None else teacher_prior_scale,
            "weight_ema": base["weight_ema"] if weight_ema is None else float(weight_ema)}


def describe(values: dict) -> str:
    """One log line of the resolved values."""
    return ", ".join(f"{k}={v}" for k, v in values.items())
