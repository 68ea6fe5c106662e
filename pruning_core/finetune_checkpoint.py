"""Fine-tuning checkpoints: where a run is (:class:`RunState`), written through a temporary file and read back with
torch's weights-only loader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pruning_core.errors import UserError

__all__ = ["RunState", "load_checkpoint", "save_checkpoint"]


@dataclass
class RunState:
    """What a checkpoint holds besides the model and optimiser: where the run is and what it has seen."""

    step: int = 0
    epoch: int = 0
    total_epochs: int = 0
    elapsed_s: float = 0.0
    best_acc: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)


def save_checkpoint(path: Path, obj: dict) -> None:
    """``torch.save`` through a temporary file, so that a kill never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, config: dict) -> dict:
    """A checkpoint written by :func:`save_checkpoint` with the fine-tuning settings ``config``, read with torch's
    weights-only loader (no code runs from the file).

    :raises UserError: the file is not such a checkpoint, or was written with other settings.
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable or foreign file
        raise UserError(f"{path} is not a fine-tuning checkpoint ({type(e).__name__}); start again with --overwrite"
                        ) from e
    if not isinstance(saved, dict) or "config" not in saved:
        raise UserError(f"{path} is not a fine-tuning checkpoint; start again with --overwrite")
    if saved["config"] != config:
        raise UserError(f"{path} was written with other fine-tuning settings: resume with the same ones, or start "
                        "again (--overwrite)")
    return saved
