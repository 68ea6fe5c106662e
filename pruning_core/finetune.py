"""Fine-tuning a pruned model: the recipe, a budget in epochs or minutes, checkpoints and resume, and the checkpoint
chosen on held-out training images.

The recipe is the one the pruning literature fine-tunes with: SGD with Nesterov momentum, a linear warm-up then
cosine decay, label smoothing, random crop and flip, and knowledge distillation from the dense model (Hinton et al.
2015). A :class:`~pruning_core.schedules.Schedule` may prune during training (SPP, DRIVE) and swap the model for its
physically smaller form mid-run.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.device import model_device
from pruning_core.errors import UserError
from pruning_core.evaluate import accuracy
from pruning_core.splits import FolderSplit, Split

__all__ = ["AUGMENTS", "FinetuneConfig", "concat_splits", "crop_flip", "finetune", "holdout_split"]

log = logging.getLogger(__name__)

AUGMENTS = ("crop-flip", "randaugment", "none")


@dataclass
class FinetuneConfig:
    """How a model is fine-tuned. The defaults are the recipe ``prunepilot finetune`` uses."""

    epochs: int = 10
    """Passes over the training images; the LR schedule spans them (or fewer, when ``minutes`` runs out first)."""
    minutes: float | None = None
    """Wall-clock budget: the run plans as many whole epochs as fit, at most ``epochs``, from the speed of its first
    steps, and stops when the time is up."""
    lr: float = 0.02
    """Peak learning rate, reached after the warm-up (0.02 scored higher than 0.05 on held-out training images in
    ``docs/recover.md``)."""
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 0.5
    """Epochs of linear warm-up from 0 to ``lr`` before the cosine decay to 0."""
    label_smoothing: float = 0.1
    kd_alpha: float = 0.9
    """Weight of the distillation loss when there is a teacher; ``1 - kd_alpha`` goes to cross-entropy."""
    temperature: float = 4.0
    augment: str = "crop-flip"
    """``crop-flip`` (pad by 1/8 of the side, random crop, horizontal flip), ``randaugment`` (torchvision's RandAugment
    on top of crop-flip; needs torchvision) or ``none``."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay per step and evaluate and export it
    (0: off; 0.999 is usual)."""
    holdout_images: int = 1000
    """Training images set aside, never trained on, on which each epoch's model is scored; the best is kept
    (at most a fifth of the training images; 0: keep the last epoch)."""
    act_grad_sparsity: float = 0.0
    """Prune this fraction of the activation gradients in every backward pass (Ye et al.;
    :class:`~pruning_core.actgrad.ActGradPruner`); 0: off."""
    seed: int = 0

    @classmethod
    def plain(cls, epochs: int, lr: float = 0.05, batch_size: int = 64, seed: int = 0) -> FinetuneConfig:
        """Plain SGD with cosine decay and nothing else (no warm-up, smoothing, augmentation or holdout): how the
        tests and the demo train their small digits CNNs.
        """
        return cls(epochs=epochs, lr=lr, batch_size=batch_size, warmup_epochs=0, label_smoothing=0, augment="none",
                   holdout_images=0, seed=seed)

    def check(self) -> None:
        """:raises UserError: a setting out of range."""
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.minutes is not None and self.minutes <= 0:
            raise UserError(f"--minutes must be positive, got {self.minutes}")
        if self.lr <= 0 or self.batch_size < 1:
            raise UserError("--lr must be positive and the batch size at least 1")
        if self.augment not in AUGMENTS:
            raise UserError(f"unknown augmentation {self.augment!r}; use one of {', '.join(AUGMENTS)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"--ema {self.ema_decay} must be in [0, 1)")
        if not 0.0 <= self.act_grad_sparsity < 1.0:
            raise UserError(f"--prune-act-grads {self.act_grad_sparsity} must be in [0, 1)")
        if self.holdout_images < 0:
            raise UserError(f"--holdout-images must be >= 0, got {self.holdout_images}")


def holdout_split(train: Split | FolderSplit, images: int, seed: int = 0) -> tuple[Split | FolderSplit, Split | None]:
    """``train`` without a seeded random ``images`` of its images (at most a fifth of them), and those images
    (decoded into memory), or ``(train, None)`` for 0 images.
    """
    images = min(images, len(train) // 5)
    if images <= 0:
        return train, None
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 7919))
    held, rest = perm[:images], perm[images:].sort().values
    if isinstance(train, FolderSplit):
        kept = copy.copy(train)
        kept.files = [train.files[i] for i in rest.tolist()]
        kept.y = train.y[rest]
        return kept, train.subset(held)
    return train.subset(rest), train.subset(held)


def concat_splits(splits: list[Split | FolderSplit]) -> Split | FolderSplit:
    """One training split of several: in-memory splits are concatenated (shapes must match); a streamed folder can
    only be used alone.

    :raises UserError: image shapes differ, or a streamed folder is combined with other images.
    """
    if len(splits) == 1:
        return splits[0]
    if any(isinstance(s, FolderSplit) for s in splits):
        raise UserError("an image folder too large to hold in memory can only be fine-tuned on alone")
    first = splits[0]
    for s in splits[1:]:
        if s.shape != first.shape:
            raise UserError(f"fine-tuning images of shape {s.shape} and {first.shape} cannot be mixed: "
                            "pass --image-size")
    return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]), first.mean, first.std,
                 first.scale)


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


def _randaugment(split: Split | FolderSplit) -> Callable[[torch.Tensor], torch.Tensor]:
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


@dataclass
class _State:
    """What a checkpoint holds besides the model and optimiser: where the run is and what it has seen."""

    step: int = 0
    epoch: int = 0
    total_epochs: int = 0
    elapsed_s: float = 0.0
    best_acc: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)


def finetune(model: nn.Module, train: Split | FolderSplit, config: FinetuneConfig | None = None, *,
             teacher: nn.Module | None = None, holdout: Split | None = None, schedule=None,
             checkpoint: str | Path | None = None, progress: bool = False, report: dict | None = None) -> nn.Module:
    """Fine-tune ``model`` on ``train`` and return the model to keep, in eval mode.

    The loss is cross-entropy with label smoothing, or with a ``teacher`` ``kd_alpha * T^2 * KL(student/T ||
    teacher/T) + (1 - kd_alpha) * CE``. With ``holdout`` each epoch's model (its EMA when ``config.ema_decay``) is
    scored there and the best is returned; without it, the last. A ``schedule``
    (:class:`~pruning_core.schedules.Schedule`) prunes during training and may replace the model; the returned model
    is then its physically pruned form. ``model`` is trained in place; the returned model is another object when
    a schedule replaced it or an EMA is kept.

    :param checkpoint: file written after every epoch (through a temporary file); when it exists at the start, the
        run resumes from it. It is deleted when the run ends.
    :param report: if given, receives ``history`` (per epoch: loss, training and holdout accuracy, LR, seconds),
        ``best_epoch``, ``epochs_run``, ``steps`` and, with activation-gradient pruning, its statistics.
    """
    cfg = config or FinetuneConfig()
    cfg.check()
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    st = _State(total_epochs=cfg.epochs)
    dev = model_device(model)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    resumed = ckpt is not None and ckpt.is_file()
    saved = None
    if resumed:
        saved = _load(ckpt)
        if saved["config"] != asdict(cfg):
            raise UserError(f"{ckpt} was written with other fine-tuning settings: resume with the same ones, or start "
                            "again (--overwrite)")
        st = _State(**saved["state"])
        gen.set_state(saved["generator"])
    if schedule is not None:
        model = schedule.load_state_dict(saved["schedule"], model) if saved else schedule.start(model)
    if saved:
        model.load_state_dict(saved["model"])
    model.to(dev)
    opt = _optimizer(model, cfg)
    if saved:
        opt.load_state_dict(saved["optimizer"])
    ema = _ema(model, cfg)
    if saved and ema is not None:
        ema.load_state_dict(saved["ema"])
    best = saved["best"] if saved else None
    augment = _randaugment(train) if cfg.augment == "randaugment" else None
    pruner = _act_grads(model, cfg, saved["act_grad"] if saved else None)
    if teacher is not None:
        teacher.eval()
    started = time.perf_counter() - st.elapsed_s
    planned = resumed or cfg.minutes is None  # a minutes budget plans the epochs after timing the first steps
    bar = _bar(progress, st.total_epochs * steps_per_epoch, st.step)
    try:
        while st.epoch < st.total_epochs:
            model.train()
            seen = correct = 0
            loss_sum = 0.0
            epoch_t = time.perf_counter()
            for x, y in train.batches(cfg.batch_size, shuffle=True, generator=gen):
                if cfg.augment != "none":
                    x = crop_flip(x, gen)
                    if augment is not None:
                        x = augment(x)
                x, y = x.to(dev), y.to(dev)
                for group in opt.param_groups:
                    group["lr"] = _lr(cfg, st.step, st.total_epochs * steps_per_epoch, steps_per_epoch)
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x)
                    kd = F.kl_div(F.log_softmax(logits / cfg.temperature, 1),
                                  F.softmax(t_logits / cfg.temperature, 1), reduction="batchmean") * cfg.temperature**2
                    loss = cfg.kd_alpha * kd + (1 - cfg.kd_alpha) * loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                st.step += 1
                if ema is not None:
                    ema.update_parameters(model)
                seen += len(y)
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.argmax(1) == y).sum())
                if schedule is not None:
                    new = schedule.step(model, st.step, st.total_epochs * steps_per_epoch)
                    if new is not None:  # physically pruned: train the smaller model from here, with a new optimiser
                        model = new.to(dev)
                        opt, ema = _optimizer(model, cfg), _ema(model, cfg)
                        if pruner is not None:
                            pruner.remove()
                            pruner = _act_grads(model, cfg, pruner.stats())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
                if not planned and st.step >= min(20, steps_per_epoch):
                    st.total_epochs = _plan(cfg, st.step, time.perf_counter() - started, steps_per_epoch)
                    planned = True
                    if bar is not None:
                        bar.total = st.total_epochs * steps_per_epoch
                if cfg.minutes is not None and time.perf_counter() - started > cfg.minutes * 60 * 1.02:
                    log.warning("the %.1f-minute budget ran out in epoch %d", cfg.minutes, st.epoch + 1)
                    st.total_epochs = st.epoch + 1
                    break
            st.epoch += 1
            st.step = st.epoch * steps_per_epoch
            scored = ema.module if ema is not None else model
            acc = accuracy(scored, holdout) if holdout is not None else None
            st.history.append({"epoch": st.epoch, "loss": round(loss_sum / max(1, seen), 4),
                               "train_acc": round(100 * correct / max(1, seen), 2),
                               "holdout_acc": None if acc is None else round(acc, 2),
                               "lr": round(opt.param_groups[0]["lr"], 6),
                               "seconds": round(time.perf_counter() - epoch_t, 1)})
            if acc is not None and acc >= st.best_acc and (schedule is None or schedule.done):
                st.best_acc, st.best_epoch = acc, st.epoch
                best = copy.deepcopy(scored.state_dict())
            log.info("epoch %d/%d: %s", st.epoch, st.total_epochs, st.history[-1])
            st.elapsed_s = time.perf_counter() - started
            if ckpt is not None and st.epoch < st.total_epochs:
                _save(ckpt, {"config": asdict(cfg), "state": asdict(st), "generator": gen.get_state(),
                             "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "ema": ema.state_dict() if ema is not None else None, "best": best,
                             "schedule": schedule.state_dict() if schedule is not None else None,
                             "act_grad": pruner.stats() if pruner else None})
    finally:
        if bar is not None:
            bar.close()
        if pruner is not None:
            pruner.remove()
    kept = ema.module if ema is not None else model
    if best is not None and st.best_epoch != st.epoch:
        kept.load_state_dict(best)
    if report is not None:
        report.update(history=st.history, epochs_run=st.epoch, steps=st.step, best_epoch=st.best_epoch or st.epoch,
                      holdout_images=len(holdout) if holdout is not None else 0,
                      train_images=len(train), time_s=round(time.perf_counter() - started, 1))
        if pruner is not None:
            report["act_grad"] = pruner.summary()
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return kept.eval()


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum and weight decay on every trainable parameter."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=True)


def _ema(model: nn.Module, cfg: FinetuneConfig):
    if not cfg.ema_decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)


def _act_grads(model: nn.Module, cfg: FinetuneConfig, stats: dict | None):
    if not cfg.act_grad_sparsity:
        return None
    from pruning_core.actgrad import ActGradPruner
    return ActGradPruner(model, cfg.act_grad_sparsity, stats=stats)


def _lr(cfg: FinetuneConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to 0 at ``total`` steps."""
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total // 2)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def _plan(cfg: FinetuneConfig, steps: int, seconds: float, steps_per_epoch: int) -> int:
    """Whole epochs that fit the minutes budget at the speed of the first ``steps`` (at least 1, at most
    ``cfg.epochs``); an epoch is taken as 3% longer, for its evaluation and checkpoint.
    """
    per_epoch = seconds / steps * steps_per_epoch * 1.03
    fit = int(cfg.minutes * 60 // per_epoch)
    log.info("%.1f s per epoch: %d of %d epochs fit in %.1f minutes", per_epoch, min(fit, cfg.epochs), cfg.epochs,
             cfg.minutes)
    return max(1, min(cfg.epochs, fit))


def _bar(progress: bool, total: int, done: int):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=done, desc="fine-tune", unit="step", leave=False, disable=None)


def _save(path: Path, obj: dict) -> None:
    """``torch.save`` through a temporary file, so that a kill never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> dict:
    """A checkpoint written by :func:`_save`, read with torch's weights-only loader (no code runs from the file).

    :raises UserError: the file is not such a checkpoint.
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable or foreign file
        raise UserError(f"{path} is not a fine-tuning checkpoint ({type(e).__name__}); start again with --overwrite"
                        ) from e
    if not isinstance(saved, dict) or "config" not in saved:
        raise UserError(f"{path} is not a fine-tuning checkpoint; start again with --overwrite")
    return saved

