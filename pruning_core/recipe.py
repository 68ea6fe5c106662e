"""The fine-tuning recipe's parts: SGD with Nesterov momentum, EMA weights, activation-gradient pruning, warm-up
then cosine learning rate, and how many epochs fit a minutes budget.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pruning_core.finetune import FinetuneConfig

__all__ = ["lr_at", "make_act_grads", "make_ema", "make_optimizer", "plan_epochs", "progress_bar"]

log = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum and weight decay on every trainable parameter."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=True)


def make_ema(model: nn.Module, cfg: FinetuneConfig):
    if not cfg.ema_decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)


def make_act_grads(model: nn.Module, cfg: FinetuneConfig, stats: dict | None):
    if not cfg.act_grad_sparsity:
        return None
    from pruning_core.actgrad import ActGradPruner
    return ActGradPruner(model, cfg.act_grad_sparsity, stats=stats)


def lr_at(cfg: FinetuneConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to 0 at ``total`` steps."""
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total // 2)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def plan_epochs(cfg: FinetuneConfig, steps: int, seconds: float, steps_per_epoch: int) -> int:
    """Whole epochs that fit the minutes budget at the speed of the first ``steps`` (at least 1, at most
    ``cfg.epochs``); an epoch is taken as 3% longer, for its evaluation and checkpoint.
    """
    per_epoch = seconds / steps * steps_per_epoch * 1.03
    fit = int(cfg.minutes * 60 // per_epoch)
    log.info("%.1f s per epoch: %d of %d epochs fit in %.1f minutes", per_epoch, min(fit, cfg.epochs), cfg.epochs,
             cfg.minutes)
    return max(1, min(cfg.epochs, fit))


def progress_bar(progress: bool, total: int, done: int):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=done, desc="fine-tune", unit="step", leave=False, disable=None)
