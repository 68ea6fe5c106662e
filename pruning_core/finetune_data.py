"""The images a fine-tune trains on: the model's training split and those of extra data specs, normalised alike and
held in memory when they are small enough.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pruning_core.data import ImageData, class_folder, load_data
from pruning_core.errors import UserError
from pruning_core.splits import FolderSplit, Split, concat_splits

__all__ = ["IN_MEMORY_BYTES", "finetune_images"]

IN_MEMORY_BYTES = 2 << 30  # fine-tuning images that decode to at most this are held in memory, not streamed


def finetune_images(data: ImageData, extra_data: list[str] = (), image_size: int | None = None,
                    loader_workers: int = 2) -> Split | FolderSplit:
    """``data``'s training images and those of each ``extra_data`` spec (loaded at ``image_size`` with
    ``loader_workers``), normalised like ``data``, in memory when they decode to at most :data:`IN_MEMORY_BYTES`
    (else streamed, alone). A spec adds its training split; an image folder without ``test/`` or ``val/`` adds all
    of ``train/``, and a folder of class folders adds all its images.

    :raises UserError: a spec whose classes or image shape differ from ``data``'s.
    """
    parts = [data.train]
    for spec in extra_data:
        root = Path(spec.removeprefix("imagefolder:")).expanduser()
        if root.is_dir() and not ((root / "test").is_dir() or (root / "val").is_dir()):
            train = root / "train"
            parts.append(class_folder(str(train if train.is_dir() else root), data, loader_workers, "fine-tuning"))
            continue
        more = load_data(spec, image_size, loader_workers)
        if more.num_classes != data.num_classes:
            raise UserError(f"{spec} has {more.num_classes} classes, {data.name} {data.num_classes}")
        t = data.train
        more = more.normalised(t.mean, t.std, t.scale)
        if more.train.shape != t.shape:
            raise UserError(f"{spec} holds {more.train.shape} images, {data.name} {t.shape}: "
                            "pass --image-size")
        parts.append(more.train)
    parts = [p.subset(torch.arange(len(p))) if isinstance(p, FolderSplit) and
             len(p) * p.shape[0] * p.shape[1] * p.shape[2] <= IN_MEMORY_BYTES else p for p in parts]
    return concat_splits(parts)
