"""Accuracy, adaptive BN recalibration (EagleEye) and a short fine-tune with optional distillation."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.device import model_device
from pruning_core.splits import Split

__all__ = ["accuracy", "adapt_bn", "augment_batch", "finetune", "mean_loss"]

log = logging.getLogger(__name__)


@torch.no_grad()
def _summed(model: nn.Module, split: Split, batch_size: int, per_batch) -> float:
    """``per_batch(logits, labels)`` summed over ``split``, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    total = sum(per_batch(model(x.to(dev)), y.to(dev)) for x, y in split.batches(batch_size))
    model.train(was_training)
    return total


def accuracy(model: nn.Module, split: Split, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent on ``split`` (eval mode)."""
    correct = _summed(model, split, batch_size, lambda out, y: int((out.argmax(1) == y).sum()))
    return 100.0 * correct / max(1, len(split))


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


def finetune(model: nn.Module, train: Split, epochs: int = 2, lr: float = 0.01, batch_size: int = 64,
             teacher: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.9, seed: int = 0,
             augment: bool = True, progress: bool = False) -> nn.Module:
    """Fine-tune in place with SGD (momentum 0.9, wd 5e-4, cosine LR) and return the model in eval mode.

    With a ``teacher`` the loss is ``alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE``
    (Hinton et al. 2015); without one it is plain cross-entropy.
    """
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    if steps == 0:
        return model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    if teacher is not None:
        teacher.eval()
    dev = model_device(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="fine-tune", unit="step", leave=False, disable=None)
    for _ in range(epochs):
        model.train()
        for x, y in train.batches(batch_size, shuffle=True, generator=gen):
            if augment:
                x = augment_batch(x, gen)
            x, y = x.to(dev), y.to(dev)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
                kd = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(t_logits / temperature, 1),
                              reduction="batchmean") * temperature**2
                loss = alpha * kd + (1 - alpha) * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    return model.eval()
