"""Where models run: ``--device auto|cpu|cuda|cuda:N``, and moving batches to a model's device."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pruning_core.errors import UserError

__all__ = ["cpu_copy", "model_device", "resolve_device"]


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names; ``auto`` (or None) is the first CUDA GPU when there is one, else the CPU.

    :raises UserError: an unknown name, or a CUDA device that this machine does not have.
    """
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: this machine has no CUDA GPU that torch can use (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def cpu_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it is on the CPU, else a copy of it there (what export and latency timing run)."""
    return model if model_device(model).type == "cpu" else copy.deepcopy(model).cpu()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
