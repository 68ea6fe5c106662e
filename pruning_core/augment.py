"""Augmentation of normalised training minibatches for fine-tuning: random crop and flip, and torchvision's
RandAugment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pruning_core.errors import UserError
from pruning_core.splits import FolderSplit, Split

__all__ = ["AUGMENTS", "crop_flip", "randaugment"]

AUGMENTS = ("crop-flip", "randaugment", "none")


def crop_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per image: a random crop of the image padded by 1/8 of its side (zeros, the mean pixel after
    normalisation), and a horizontal flip with probability 1/2.
    """
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy.view(-1, 1) + torch.arange(h)).view(n, 1, h, 1)
    cols = (dx.view(-1, 1) + torch.arange(w)).view(n, 1, 1, w)
    return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(x.shape[1]).view(1, -1, 1, 1), rows, cols]


def randaugment(split: Split | FolderSplit) -> Callable[[torch.Tensor], torch.Tensor]:
    """Torchvision's RandAugment (2 ops, magnitude 9) per image, applied to normalised images via their pixels."""
    try:
        from torchvision.transforms import v2
    except ImportError as e:
        raise UserError("--augment randaugment needs torchvision (pip install torchvision)") from e
    op = v2.RandAugment()
    mean = torch.tensor(split.mean).view(-1, 1, 1)
    std = torch.tensor(split.std).view(-1, 1, 1)

    def apply(x: torch.Tensor) -> torch.Tensor:
        pixels = ((x * std + mean) / split.scale).round().clamp(0, 255).to(torch.uint8)
        out = torch.stack([op(p) for p in pixels])
        return (out.float() * split.scale - mean) / std

    return apply
