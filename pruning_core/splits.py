"""Splits of labelled images: :class:`Split` holds its images in memory, :class:`FolderSplit` streams them from an
image folder, decoding minibatches on demand through a ``DataLoader`` so that memory stays bounded whatever the
folder's size. Both yield normalised ``(x, y)`` minibatches and give in-memory subsets. Fine-tuning holds some
training images out and may train on several splits at once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pruning_core.errors import UserError
from pruning_core.folder import decode

__all__ = ["FolderSplit", "Split", "concat_splits", "holdout_split", "normalise"]


def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], scale: float) -> torch.Tensor:
    """``(x * scale - mean) / std`` per channel, as float."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float() * scale - m) / s


@dataclass
class Split:
    """A fixed set of images and labels with their normalisation."""

    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1 / 255

    def __len__(self) -> int:
        return len(self.y)

    @property
    def shape(self) -> tuple[int, ...]:
        """One image's shape, (C, H, W)."""
        return tuple(self.x.shape[1:])

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return normalise(x, self.mean, self.std, self.scale)

    def batches(self, batch_size: int = 256, *, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised ``(x, y)`` minibatches in order, or shuffled with ``generator``."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            idx = order[i:i + batch_size]
            yield self.normalise(self.x[idx]), self.y[idx]

    def subset(self, idx: torch.Tensor) -> Split:
        return Split(self.x[idx], self.y[idx], self.mean, self.std, self.scale)

    def resized(self, size: int) -> Split:
        """The images resized to ``size`` x ``size`` (bilinear, antialiased), kept as uint8."""
        if self.shape[1:] == (size, size):
            return self
        out = [F.interpolate(self.x[i:i + 1024].float(), size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False).round().clamp(0, 255).to(torch.uint8)
               for i in range(0, len(self), 1024)]
        return Split(torch.cat(out), self.y, self.mean, self.std, self.scale)


class _Images(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], labels: torch.Tensor, size: int | None, native: tuple[int, int]):
        self.files, self.labels, self.size, self.native = files, labels, size, native

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(decode(self.files[i], self.size, self.native)), self.labels[i]


@dataclass
class FolderSplit:
    """Labelled image files decoded per minibatch: the training and test images of an image folder.

    ``workers`` decoding processes feed each pass (0: decode in this process). :meth:`subset` decodes a fixed set of
    images once into an in-memory :class:`Split`, as the reward, calibration and select splits are.
    """

    files: list[Path]
    y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1 / 255
    size: int | None = None
    workers: int = 0
    native: tuple[int, int] = field(default=(0, 0))

    def __post_init__(self):
        if self.native == (0, 0):  # the first image's size, the one all must share without a size
            self.native = tuple(decode(self.files[0], self.size).shape[1:])

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int]:
        """One decoded image's shape, (3, H, W)."""
        return (3, *self.native)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return normalise(x, self.mean, self.std, self.scale)

    def _raw(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 ``(x, y)`` minibatches of the images at ``order``, decoded by the workers."""
        images = _Images(self.files, self.y, self.size, self.native)
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size, sampler=order.tolist(),
                                             num_workers=self.workers, persistent_workers=False)
        try:
            yield from loader
        except Exception as e:
            if "Original Traceback" not in str(e):
                raise
            # an error in a worker comes back with the worker's traceback in its message: keep its last line
            last = [line for line in str(e).splitlines() if line.strip()][-1]
            raise UserError(last.removeprefix("pruning_core.errors.UserError: ")) from e

    def batches(self, batch_size: int = 256, *, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised ``(x, y)`` minibatches in order, or shuffled with ``generator``."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for x, y in self._raw(order, batch_size):
            yield self.normalise(x), y

    def subset(self, idx: torch.Tensor) -> Split:
        """The images at ``idx``, decoded into memory."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        xs = [x for x, _ in self._raw(idx, 256)]
        x = torch.cat(xs) if xs else torch.zeros(0, *self.shape, dtype=torch.uint8)
        return Split(x, self.y[idx], self.mean, self.std, self.scale)


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
