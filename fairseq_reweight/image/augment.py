"""Batch-wise augmentation and normalisation on tensors (no torchvision).

The standard CIFAR recipe used by L2RW, MW-Net and Fan et al.: pad 4 pixels (reflect, as in
MW-Net's code), take a random crop of the original size, flip horizontally with probability 1/2
where flips preserve the label, then normalise per channel. All random numbers come from the
caller's ``torch.Generator`` (on the CPU), so a run is reproducible and resumable on any device.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


class Augment:
    def __init__(self, mean: Sequence[float], std: Sequence[float], pad: int = 4, flip: bool = True,
                 enabled: bool = True):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.pad, self.flip, self.enabled = pad, flip, enabled

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` -> standardised float32."""
        x = x.float().div_(255)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Random crop (+ flip) of a uint8 batch, normalised; identity + normalise when disabled."""
        if not self.enabled:
            return self.normalize(x)
        b, _, h, w = x.shape
        x = x.float().div_(255)
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, mode="reflect")
            off = torch.randint(0, 2 * self.pad + 1, (2, b), generator=generator).to(x.device)
            rows = (off[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (off[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            x = x[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
        if self.flip:
            mirror = (torch.rand(b, generator=generator) < 0.5).to(x.device)
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)
