"""Let fairseq checkpoints load under torch >= 2.6, whose ``torch.load`` defaults to ``weights_only``.

fairseq (through 0.12.x) calls ``torch.load`` without ``weights_only`` on checkpoints that pickle a
few plain Python objects besides tensors (``argparse.Namespace`` for legacy-registered
architectures, fairseq's metric meters, numpy scalars; and, when a data-parallel resume broadcasts
the loaded state from rank 0, omegaconf's config containers). Rather than turning the safety check off,
we allow-list exactly those types with ``torch.serialization.add_safe_globals`` when the plugin is
imported -- which ``--user-dir`` does before any checkpoint is read by fairseq-train (resume) or
fairseq-generate.
"""

import argparse
import collections

import torch


def _safe_globals():
    allowed = [argparse.Namespace, collections.OrderedDict, collections.defaultdict]
    try:
        from fairseq.logging import meters

        allowed += [
            getattr(meters, name)
            for name in ("AverageMeter", "SumMeter", "TimeMeter", "StopwatchMeter", "ConcatTensorMeter",
                         "MetersDict", "Meter")
            if hasattr(meters, name)
        ]
    except ImportError:
        pass
    try:  # placeholders of fairseq's broadcast_object (data-parallel resume)
        from fairseq.distributed.utils import _TensorPlaceholder

        allowed.append(_TensorPlaceholder)
    except ImportError:
        pass
    try:
        import typing

        from omegaconf import base, dictconfig, listconfig, nodes

        allowed += [dictconfig.DictConfig, listconfig.ListConfig, base.ContainerMetadata, base.Metadata, typing.Any,
                    dict, list, tuple, int, float, str, bool]
        allowed += [getattr(nodes, n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                                                 "EnumNode", "BytesNode", "PathNode", "ValueNode")
                    if hasattr(nodes, n)]
    except ImportError:
        pass
    try:
        import numpy as np

        allowed += [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.int64)), type(np.dtype(np.float32))]
        try:
            from numpy._core.multiarray import scalar, _reconstruct
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import scalar, _reconstruct
        allowed += [scalar, _reconstruct, np.ndarray]
    except ImportError:
        pass
    return allowed


if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals(_safe_globals())
