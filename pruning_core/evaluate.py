"""Accuracy, mean loss, adaptive BN recalibration (EagleEye) and the augmentation Taylor scoring uses."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.device import model_device
from pruning_core.splits import Split

__all__ = ["accuracy", "adapt_bn", "augment_batch", "correct", "mean_loss", "paired_lead"]

log = logging.getLogger(__name__)


@torch.no_grad()
def _per_batch(model: nn.Module, split: Split, batch_size: int, per_batch) -> list:
    """``per_batch(logits, labels)`` for each batch of ``split``, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    out = [per_batch(model(x.to(dev)), y.to(dev)) for x, y in split.batches(batch_size)]
    model.train(was_training)
    return out


def _summed(model: nn.Module, split: Split, batch_size: int, per_batch) -> float:
    """``per_batch(logits, labels)`` summed over ``split``, in eval mode."""
    return sum(_per_batch(model, split, batch_size, per_batch))


def accuracy(model: nn.Module, split: Split, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent on ``split`` (eval mode)."""
    correct = _summed(model, split, batch_size, lambda out, y: int((out.argmax(1) == y).sum()))
    return 100.0 * correct / max(1, len(split))


def correct(model: nn.Module, split: Split, batch_size: int = 256) -> torch.Tensor:
    """Per image of ``split``, 1.0 where ``model`` classifies it right, else 0.0 (eval mode; a CPU tensor). Its mean
    is :func:`accuracy`; two models' vectors give a paired comparison (:func:`paired_lead`).
    """
    hits = _per_batch(model, split, batch_size, lambda out, y: (out.argmax(1) == y).cpu())
    return torch.cat(hits).double() if hits else torch.zeros(0, dtype=torch.float64)


def paired_lead(mine: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """How far ``mine`` leads ``other`` (:func:`correct` vectors on the same images), in accuracy points, and the
    standard error of that lead from the images (the paired difference's, far smaller than two unpaired ones).
    """
    diff = mine - other
    if len(diff) < 2:
        return 100.0 * float(diff.sum()), float("inf")
    return 100.0 * float(diff.mean()), 100.0 * float(diff.std() / len(diff) ** 0.5)


def mean_loss(model: nn.Module, split: Split, batch_size: int = 256) -> float:
    """Mean cross-entropy on ``split`` (eval mode): finer-grained than accuracy on images the model fits."""
    total = _summed(model, split, batch_size, lambda out, y: float(F.cross_entropy(out, y, reduction="sum")))
    return total / max(1, len(split))


@torch.no_grad()
def adapt_bn(model: nn.Module, calib: Split, num_batches: int = 10, batch_size: int = 64) -> nn.Module:
    """Adaptive BN (Li et al., EagleEye, ECCV 2020): re-estimate BN statistics on calibration images.

    Covers every norm layer that keeps running statistics (BN, and instance norm with ``track_running_stats``).
    Resets running statistics, forwards ``num_batches`` batches in train mode without gradients using a
    cumulative average, and returns the model in eval mode. Modifies ``model`` in place.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if not bns:
        return model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    model.train()
    dev = model_device(model)
    for i, (x, _) in enumerate(calib.batches(batch_size)):
        if i >= num_batches:
            break
        model(x.to(dev))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model.eval()


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip per image and a random shift of up to 1/8 of the size per batch."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    pad = max(1, x.shape[-1] // 8)
    dx, dy = (int(v) for v in torch.randint(-pad, pad + 1, (2,), generator=gen))
    x = F.pad(x, (pad, pad, pad, pad))
    return x[:, :, pad + dy:pad + dy + x.shape[-2] - 2 * pad, pad + dx:pad + dx + x.shape[-1] - 2 * pad]
