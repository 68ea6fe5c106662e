"""Image folders (``DIR/<class>/*.jpg|png``): their classes, their files, and how one image is decoded.

Every image is decoded the same way (:func:`decode`): converted to RGB and, with an image size, resized so that its
shorter side is ``size / CROP_FRACTION`` and centre-cropped to ``size`` x ``size`` (the usual ImageNet evaluation
transform). Training-time augmentation (flips and shifts) is applied to decoded batches, as for in-memory data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pruning_core.errors import UserError

__all__ = ["CROP_FRACTION", "IMAGE_SUFFIXES", "class_names", "decode", "list_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CROP_FRACTION = 0.875  # centre crop of the resized image, as torchvision's and timm's ImageNet evaluation


def class_names(folder: Path) -> list[str]:
    """The sorted class sub-folders of ``folder`` (an ImageFolder's labels, in order)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"no class folders in {folder}")
    return classes


def list_images(folder: Path, classes: list[str],
                keep: Callable[[str, int], bool] | None = None) -> tuple[list[Path], torch.Tensor]:
    """The files ``folder/<class>/*.jpg|jpeg|png`` for ``classes`` (label = index), in name order per class;
    ``keep(class, k)`` may leave out a class's ``k``-th file.
    """
    files, labels = [], []
    for label, cls in enumerate(classes):
        if not (folder / cls).is_dir():
            raise UserError(f"{folder} has no folder for class {cls!r}")
        found = sorted(f for f in (folder / cls).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for k, f in enumerate(found):
            if keep is None or keep(cls, k):
                files.append(f)
                labels.append(label)
    if not files:
        raise UserError(f"no images in {folder}")
    return files, torch.tensor(labels)


def decode(path: Path, size: int | None, native: tuple[int, int] | None = None) -> np.ndarray:
    """One image as uint8 (3, H, W): RGB, resized and centre-cropped to ``size`` if given, else checked to be
    ``native`` (height, width) when that is given.

    :raises UserError: the file cannot be read as an image, or (without ``size``) differs in size from ``native``.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None:
                w, h = im.size
                short = round(size / CROP_FRACTION)
                if (w, h) != (size, size):
                    scale = short / min(w, h)
                    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                                   Image.Resampling.BILINEAR, reducing_gap=None)
                    w, h = im.size
                    left, top = (w - size) // 2, (h - size) // 2
                    im = im.crop((left, top, left + size, top + size))
            array = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from e
    if size is None and native is not None and array.shape[:2] != native:
        raise UserError(f"{path} is {array.shape[1]}x{array.shape[0]}, the folder's first image "
                        f"{native[1]}x{native[0]}: pass --image-size to resize and crop them all")
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # a writable copy
