"""The teacher's inputs as a registry: each input has a name, a function from the front's batch context to its
``[B, k]`` columns, and whether the teacher standardises it (running moments, core/teacher.py) or reads it as it
is (already bounded, e.g. training progress). ``--teacher-inputs a,b,c`` selects inputs by name; adding an input
is one function and one registry line (NMT: fairseq_reweight/features.py)."""

from typing import Callable, Dict, List, NamedTuple, Sequence

import torch


class Input(NamedTuple):
    compute: Callable[[object], torch.Tensor]  # batch context -> [B, k]
    standardise: bool = True  # False: the teacher reads the columns as they are (one column)
    help: str = ""


def parse(spec: str, registry: Dict[str, Input], flag: str = "--teacher-inputs") -> List[str]:
    """``a,b,c`` -> the names, checked against ``registry`` (an error lists the valid ones)."""
    names = [n.strip() for n in str(spec).split(",") if n.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown or not names:
        raise ValueError(f"{flag} {spec!r}: unknown input(s) {', '.join(unknown) or '(none given)'}; choose from "
                         + ", ".join(f"{k} ({v.help})" if v.help else k for k, v in registry.items()))
    if len(set(names)) != len(names):
        raise ValueError(f"{flag} {spec!r} names an input twice")
    return names


def passthrough(names: Sequence[str], registry: Dict[str, Input]) -> int:
    """How many trailing columns of :func:`stack` the teacher does not standardise."""
    return sum(not registry[n].standardise for n in names)


def column(names: Sequence[str], registry: Dict[str, Input], ctx, name: str) -> int:
    """The first column of input ``name`` in :func:`stack`'s output (widths from ``ctx``)."""
    order = [n for n in names if registry[n].standardise] + [n for n in names if not registry[n].standardise]
    return sum(registry[n].compute(ctx).shape[1] for n in order[:order.index(name)])


def stack(names: Sequence[str], registry: Dict[str, Input], ctx) -> torch.Tensor:
    """The ``[B, D]`` teacher input: the standardised inputs in the order named, then the others."""
    order = [n for n in names if registry[n].standardise] + [n for n in names if not registry[n].standardise]
    cols = [registry[n].compute(ctx).float() for n in order]
    for n, c in zip(order, cols):
        if not registry[n].standardise and c.shape[1] != 1:
            raise ValueError(f"teacher input {n!r} is read as it is and must be one column, got {c.shape[1]}")
    return torch.cat(cols, 1)
