"""CIFAR-style students that expose their internal states to the teacher.

* ``resnetN`` (N = 6n + 2; ``resnet32`` is the ResNet-32 of MW-Net, Shu et al. 2019, 0.46M parameters
  on CIFAR-10): He et al. 2016's CIFAR ResNet, post-activation basic blocks, widths 16/32/64 and
  parameter-free "option A" shortcuts (strided identity, zero-padded channels).
* ``wrn-D-K`` (D = 6n + 4; ``wrn-28-10`` is the WRN-28-10 of L2RW, Ren et al. 2018, and MW-Net):
  Zagoruyko & Komodakis 2016's pre-activation wide ResNet, widths 16K/32K/64K.

``model(x, states=True)`` returns ``(logits, states)`` where ``states`` holds the global-average
pooled output of each of the three stages; the last one is always the penultimate features (the
input of the final linear layer; for the pre-activation WRN this is after its final BN-ReLU).
These are the "internal states" the deep teacher of Fan et al. 2021 can see.
"""

import re
from typing import List

import torch
import torch.nn.functional as F
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class _BasicBlock(nn.Module):
    """Post-activation residual block with a parameter-free (option A) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra:
            short = F.pad(short, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(out + short)


class _WideBlock(nn.Module):
    """Pre-activation wide residual block (1x1 projection shortcut when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class ImageStudent(nn.Module):
    """Stem, three stages, global pooling, linear classifier; optionally returns pooled stage outputs."""

    num_states = 3

    def __init__(self, stem: nn.Module, stages: List[nn.Module], head_norm: nn.Module, feat_dim: int,
                 num_classes: int):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head_norm = head_norm  # identity for post-activation nets, BN-ReLU for pre-activation ones
        self.fc = nn.Linear(feat_dim, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, states: bool = False):
        h = self.stem(x)
        pooled = []
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i == len(self.stages) - 1:
                h = self.head_norm(h)
            pooled.append(h.mean((2, 3)))
        logits = self.fc(pooled[-1])
        return (logits, pooled) if states else logits


def _stage(block, cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])


def resnet(depth: int, num_classes: int, in_channels: int = 3) -> ImageStudent:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet depth must be 6n+2 (8, 14, 20, 32, 56, ...), got {depth}")
    n, widths = (depth - 2) // 6, (16, 32, 64)
    stem = nn.Sequential(_conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU())
    stages, cin = [], 16
    for i, w in enumerate(widths):
        stages.append(_stage(_BasicBlock, cin, w, n, 1 if i == 0 else 2))
        cin = w
    return ImageStudent(stem, stages, nn.Identity(), widths[-1], num_classes)


def wide_resnet(depth: int, widen: int, num_classes: int, in_channels: int = 3) -> ImageStudent:
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"wide-resnet depth must be 6n+4 (10, 16, 28, 40, ...), got {depth}")
    n, widths = (depth - 4) // 6, (16 * widen, 32 * widen, 64 * widen)
    stages, cin = [], 16
    for i, w in enumerate(widths):
        stages.append(_stage(_WideBlock, cin, w, n, 1 if i == 0 else 2))
        cin = w
    head = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU())
    return ImageStudent(_conv3x3(in_channels, 16), stages, head, widths[-1], num_classes)


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> ImageStudent:
    """``resnet32``, ``resnetN`` (N = 6n+2), ``wrn-28-10`` or ``wrn-D-K`` (D = 6n+4, widen factor K)."""
    m = re.fullmatch(r"resnet(\d+)", arch)
    if m:
        return resnet(int(m.group(1)), num_classes, in_channels)
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", arch)
    if m:
        return wide_resnet(int(m.group(1)), int(m.group(2)), num_classes, in_channels)
    raise ValueError(f"unknown --arch {arch!r}: use resnet32 (or resnetN, N = 6n+2) or wrn-28-10 (or wrn-D-K)")
