"""Label noise with ground-truth flags, the clean meta set, and class-balanced subsets.

Noise models follow L2RW (Ren et al. 2018) and MW-Net (Shu et al. 2019):

``uniform`` (symmetric)
    a label is replaced by a class drawn uniformly from *all* classes with probability ``p`` (so it
    can stay correct by chance: about ``p (K-1)/K`` of the labels end up wrong, as in MW-Net's
    ``uniform_mix_C``);
``flip`` (pair/asymmetric)
    a label is replaced by one fixed other class of its class (drawn once per class from the seed,
    as in MW-Net's ``flip_labels_C``) with probability ``p``.

"With probability p" is made exact: in every class exactly ``round(p * n_class)`` examples are
resampled, chosen with the seed. The returned flag is the ground truth: ``noisy[i]`` is True iff
the observed label differs from the true one.
"""

from typing import NamedTuple

import numpy as np

NOISE_TYPES = ("uniform", "flip")


class NoisyLabels(NamedTuple):
    labels: np.ndarray  # observed (possibly corrupted) labels
    noisy: np.ndarray  # bool, labels != true labels
    resampled: np.ndarray  # bool, the examples the noise process touched (exactly p per class)
    flip_to: np.ndarray  # flip: the target class of every class; uniform: -1


def check_rate(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"--noise-rate must be in [0, 1), got {rate}: it is the probability p that a training "
                         "label is resampled, e.g. --noise-rate 0.4 (at 1 every label would be noise)")


def flip_targets(num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """For every class, one fixed other class (MW-Net's ``flip_labels_C``)."""
    if num_classes < 2:
        raise ValueError("flip noise needs at least two classes")
    others = [np.delete(np.arange(num_classes), c) for c in range(num_classes)]
    return np.array([rng.choice(o) for o in others], dtype=np.int64)


def corrupt(labels: np.ndarray, num_classes: int, kind: str, rate: float, seed: int) -> NoisyLabels:
    """Corrupt ``labels`` with ``kind`` noise at ``rate`` (exact per class); deterministic in ``seed``."""
    check_rate(rate)
    if kind not in NOISE_TYPES:
        raise ValueError(f"unknown --noise {kind!r}: use {' or '.join(NOISE_TYPES)}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    targets = flip_targets(num_classes, rng) if kind == "flip" else np.full(num_classes, -1, dtype=np.int64)
    resampled = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        resampled[rng.choice(idx, size=int(round(rate * len(idx))), replace=False)] = True
    observed = labels.copy()
    if kind == "uniform":
        observed[resampled] = rng.integers(0, num_classes, size=int(resampled.sum()))
    else:
        observed[resampled] = targets[labels[resampled]]
    return NoisyLabels(observed, observed != labels, resampled, targets)


def balanced_split(labels: np.ndarray, num_classes: int, size: int, seed: int):
    """Take ``size`` indices, ``size / num_classes`` of every class, out of ``labels``.

    Returns ``(taken, rest)`` as sorted index arrays. Used for the clean meta set (MW-Net: 1000
    images taken out of the training set before the noise is applied) and for training subsets.
    """
    if size % num_classes:
        raise ValueError(f"a class-balanced set of {size} images is impossible with {num_classes} classes: "
                         f"use a multiple of {num_classes}")
    per = size // num_classes
    rng = np.random.default_rng(seed)
    taken = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per:
            raise ValueError(f"class {c} has {len(idx)} training images, fewer than the {per} per class asked for")
        taken.append(rng.choice(idx, size=per, replace=False))
    taken = np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), taken)
    return taken, rest
