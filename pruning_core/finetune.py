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
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.augment import AUGMENTS, crop_flip, randaugment
from pruning_core.device import model_device
from pruning_core.errors import UserError
from pruning_core.evaluate import accuracy
from pruning_core.finetune_checkpoint import RunState, load_checkpoint, save_checkpoint
from pruning_core.recipe import lr_at, make_act_grads, make_ema, make_optimizer, plan_epochs, progress_bar
from pruning_core.splits import FolderSplit, Split

__all__ = ["FinetuneConfig", "finetune"]

log = logging.getLogger(__name__)


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
    run = _Run(model, train, cfg, teacher=teacher, holdout=holdout, schedule=schedule, checkpoint=checkpoint,
               progress=progress)
    try:
        while run.st.epoch < run.st.total_epochs:
            run.epoch()
    finally:
        run.close()
    return run.finish(report)


@dataclass
class _Tally:
    """An epoch's running training loss and accuracy."""

    seen: int = 0
    correct: int = 0
    loss_sum: float = 0.0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.seen += len(y)
        self.loss_sum += float(loss.detach()) * len(y)
        self.correct += int((logits.argmax(1) == y).sum())


class _Run:
    """One fine-tuning run: the model, its optimiser, EMA and activation-gradient pruner (all replaced when a schedule
    prunes physically), where the run is (``st``), its progress bar and its checkpoint.
    """

    def __init__(self, model: nn.Module, train: Split | FolderSplit, cfg: FinetuneConfig, *,
                 teacher: nn.Module | None, holdout: Split | None, schedule, checkpoint: str | Path | None,
                 progress: bool):
        """Set the run up, resuming from ``checkpoint`` when it exists."""
        self.cfg, self.train, self.teacher, self.holdout, self.schedule = cfg, train, teacher, holdout, schedule
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.st = RunState(total_epochs=cfg.epochs)
        self.dev = model_device(model)
        self.ckpt = Path(checkpoint) if checkpoint is not None else None
        saved = self._resume() if self.ckpt is not None and self.ckpt.is_file() else None
        self._set_up(model, saved)
        self.augment = randaugment(train) if cfg.augment == "randaugment" else None
        self.pruner = make_act_grads(self.model, cfg, saved["act_grad"] if saved else None)
        if teacher is not None:
            teacher.eval()
        self.started = time.perf_counter() - self.st.elapsed_s
        # a minutes budget plans the epochs after timing the first steps
        self.planned = saved is not None or cfg.minutes is None
        self.bar = progress_bar(progress, self.total_steps, self.st.step)

    @property
    def total_steps(self) -> int:
        return self.st.total_epochs * self.steps_per_epoch

    def _resume(self) -> dict:
        """The checkpoint, with the run's state and generator restored from it.

        :raises UserError: it was written with other settings, or is not a checkpoint.
        """
        saved = load_checkpoint(self.ckpt, asdict(self.cfg))
        self.st = RunState(**saved["state"])
        self.gen.set_state(saved["generator"])
        return saved

    def _set_up(self, model: nn.Module, saved: dict | None) -> None:
        """The model (as the schedule starts or resumes it), optimiser, EMA and best weights, from ``saved`` if any."""
        if self.schedule is not None:
            model = self.schedule.load_state_dict(saved["schedule"], model) if saved else self.schedule.start(model)
        if saved:
            model.load_state_dict(saved["model"])
        model.to(self.dev)
        self.model = model
        self.opt = make_optimizer(model, self.cfg)
        if saved:
            self.opt.load_state_dict(saved["optimizer"])
        self.ema = make_ema(model, self.cfg)
        if saved and self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        self.best = saved["best"] if saved else None

    def epoch(self) -> None:
        """One pass over the training images (cut short when the minutes run out), its score and checkpoint."""
        self.model.train()
        tally = _Tally()
        epoch_t = time.perf_counter()
        for x, y in self.train.batches(self.cfg.batch_size, shuffle=True, generator=self.gen):
            self._step(x, y, tally)
            if self._out_of_time():
                break
        self.st.epoch += 1
        self.st.step = self.st.epoch * self.steps_per_epoch
        self._score(tally, epoch_t)
        self.st.elapsed_s = time.perf_counter() - self.started
        if self.ckpt is not None and self.st.epoch < self.st.total_epochs:
            save_checkpoint(self.ckpt, self._checkpoint())

    def _step(self, x: torch.Tensor, y: torch.Tensor, tally: _Tally) -> None:
        """One optimiser step on a minibatch, then the schedule's pruning."""
        cfg = self.cfg
        if cfg.augment != "none":
            x = crop_flip(x, self.gen)
            if self.augment is not None:
                x = self.augment(x)
        x, y = x.to(self.dev), y.to(self.dev)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, self.st.step, self.total_steps, self.steps_per_epoch)
        logits = self.model(x)
        loss = self._loss(logits, x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.st.step += 1
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        tally.add(loss, logits, y)
        if self.schedule is not None:
            self._schedule_step()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{tally.loss_sum / tally.seen:.3f}",
                                 acc=f"{100 * tally.correct / tally.seen:.1f}")

    def _loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with label smoothing, mixed with distillation from the teacher when there is one."""
        cfg = self.cfg
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = self.teacher(x)
            kd = F.kl_div(F.log_softmax(logits / cfg.temperature, 1),
                          F.softmax(t_logits / cfg.temperature, 1), reduction="batchmean") * cfg.temperature**2
            loss = cfg.kd_alpha * kd + (1 - cfg.kd_alpha) * loss
        return loss

    def _schedule_step(self) -> None:
        """Let the schedule prune; once it prunes physically, train the smaller model with a new optimiser."""
        new = self.schedule.step(self.model, self.st.step, self.total_steps)
        if new is not None:
            self.model = new.to(self.dev)
            self.opt, self.ema = make_optimizer(self.model, self.cfg), make_ema(self.model, self.cfg)
            if self.pruner is not None:
                self.pruner.remove()
                self.pruner = make_act_grads(self.model, self.cfg, self.pruner.stats())

    def _out_of_time(self) -> bool:
        """Plan the epochs of a minutes budget once the first steps are timed; whether the budget has run out (the
        current epoch is then the last).
        """
        cfg, st = self.cfg, self.st
        if not self.planned and st.step >= min(20, self.steps_per_epoch):
            st.total_epochs = plan_epochs(cfg, st.step, time.perf_counter() - self.started, self.steps_per_epoch)
            self.planned = True
            if self.bar is not None:
                self.bar.total = self.total_steps
        if cfg.minutes is not None and time.perf_counter() - self.started > cfg.minutes * 60 * 1.02:
            log.warning("the %.1f-minute budget ran out in epoch %d", cfg.minutes, st.epoch + 1)
            st.total_epochs = st.epoch + 1
            return True
        return False

    def _score(self, tally: _Tally, epoch_t: float) -> None:
        """Record the epoch just run, scoring its model on the holdout and keeping it if it is the best so far."""
        st = self.st
        scored = self.ema.module if self.ema is not None else self.model
        acc = accuracy(scored, self.holdout) if self.holdout is not None else None
        st.history.append({"epoch": st.epoch, "loss": round(tally.loss_sum / max(1, tally.seen), 4),
                           "train_acc": round(100 * tally.correct / max(1, tally.seen), 2),
                           "holdout_acc": None if acc is None else round(acc, 2),
                           "lr": round(self.opt.param_groups[0]["lr"], 6),
                           "seconds": round(time.perf_counter() - epoch_t, 1)})
        if acc is not None and acc >= st.best_acc and (self.schedule is None or self.schedule.done):
            st.best_acc, st.best_epoch = acc, st.epoch
            self.best = copy.deepcopy(scored.state_dict())
        log.info("epoch %d/%d: %s", st.epoch, st.total_epochs, st.history[-1])

    def _checkpoint(self) -> dict:
        """What :meth:`_resume` restores the run from."""
        return {"config": asdict(self.cfg), "state": asdict(self.st), "generator": self.gen.get_state(),
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None, "best": self.best,
                "schedule": self.schedule.state_dict() if self.schedule is not None else None,
                "act_grad": self.pruner.stats() if self.pruner else None}

    def close(self) -> None:
        """Close the progress bar and take the activation-gradient hooks off."""
        if self.bar is not None:
            self.bar.close()
        if self.pruner is not None:
            self.pruner.remove()

    def finish(self, report: dict | None) -> nn.Module:
        """The model to keep (the best scored epoch's weights, when that is not the last), in eval mode; fills
        ``report`` and deletes the checkpoint.
        """
        st = self.st
        kept = self.ema.module if self.ema is not None else self.model
        if self.best is not None and st.best_epoch != st.epoch:
            kept.load_state_dict(self.best)
        if report is not None:
            report.update(history=st.history, epochs_run=st.epoch, steps=st.step, best_epoch=st.best_epoch or st.epoch,
                          holdout_images=len(self.holdout) if self.holdout is not None else 0,
                          train_images=len(self.train), time_s=round(time.perf_counter() - self.started, 1))
            if self.pruner is not None:
                report["act_grad"] = self.pruner.summary()
        if self.ckpt is not None:
            self.ckpt.unlink(missing_ok=True)
        return kept.eval()
