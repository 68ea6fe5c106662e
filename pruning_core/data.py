"""Image data sets with explicit splits: ``reward`` and ``calib`` from training images, ``test`` never searched.

Images are held in memory as uint8 (N, C, H, W) and normalised per batch, so even the 60,000-image
JPEG set stays near 200 MB.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pruning_core.errors import UserError

__all__ = ["ImageData", "Split", "class_names", "load_data", "load_val", "make_splits", "read_folder"]

CIFAR_MEAN, CIFAR_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what the shared ResNets were trained with
DIGITS_MEAN, DIGITS_STD = (0.305,), (0.376,)


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

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x.float() * self.scale - mean) / std

    def batches(self, batch_size: int = 256, *, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised ``(x, y)`` minibatches in order, or shuffled with ``generator``."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            idx = order[i:i + batch_size]
            yield self.normalise(self.x[idx]), self.y[idx]

    def subset(self, idx: torch.Tensor) -> Split:
        return Split(self.x[idx], self.y[idx], self.mean, self.std, self.scale)


@dataclass
class ImageData:
    """A training and a test split of one data set, and validation images if it has them (an ImageFolder's
    ``val/``), which searches then score on instead of training images.
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    val: Split | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    def normalised(self, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                   scale: float | None = None) -> ImageData:
        """The same images normalised as ``(x * scale - mean) / std`` (pixels 0-255); None keeps the current one.

        :raises UserError: ``mean`` or ``std`` has neither one value nor one per channel, or a ``std`` or ``scale``
            is not positive.
        """
        t = self.train
        channels = t.x.shape[1]
        mean, std = (tuple(v) * (channels if len(v) == 1 else 1) if v is not None else None for v in (mean, std))
        for name, v in (("--mean", mean), ("--std", std)):
            if v is not None and len(v) != channels:
                raise UserError(f"{name} has {len(v)} values; give 1 or {channels} (one per channel)")
        if (std is not None and min(std) <= 0) or (scale is not None and scale <= 0):
            raise UserError("--std and --scale must be positive")
        mean, std, scale = mean or t.mean, std or t.std, t.scale if scale is None else scale

        def renorm(split: Split | None) -> Split | None:
            return split if split is None else Split(split.x, split.y, mean, std, scale)

        return ImageData(self.name, renorm(self.train), renorm(self.test), self.num_classes, renorm(self.val))

    @property
    def normalisation(self) -> dict:
        """The normalisation every split applies, as reports and ONNX metadata record it."""
        return {"mean": list(self.train.mean), "std": list(self.train.std), "scale": self.train.scale}


@dataclass
class Splits:
    """The splits a search uses: ``reward``, ``calib`` and ``select`` are disjoint subsets of training images.

    ``select`` (None when no training images are left for it) re-scores a search's top candidates.
    """

    reward: Split
    calib: Split
    train: Split
    test: Split
    select: Split | None = None


def make_splits(data: ImageData, reward_images: int = 1000, calib_images: int = 640, seed: int = 0,
                select_images: int = 0, val: Split | None = None) -> Splits:
    """Draw a fixed, seeded reward subset, a disjoint calibration subset and, from the training images left
    after both, up to ``select_images`` for the select split.

    When the training set is too small for both, the calibration images wrap around into the reward images
    (and no select split is drawn). The reward and calibration subsets do not depend on ``select_images``.
    With ``val`` (images the model was not trained on), the reward and select images are drawn from it instead,
    so that searches score generalisation rather than memory; calibration stays on training images.
    """
    n = len(data.train)
    if reward_images < 1 or calib_images < 1:
        raise UserError("reward and calibration splits need at least one image each")
    if select_images < 0:
        raise UserError(f"select_images must be >= 0, got {select_images}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    reward_idx = perm[:min(reward_images, n)]
    rest = perm[len(reward_idx):]
    calib_idx = rest[:calib_images] if len(rest) >= calib_images else perm[-calib_images:]
    left = rest[calib_images:calib_images + select_images]  # empty when calibration took the rest or wrapped
    select = data.train.subset(left) if len(left) else None
    reward = data.train.subset(reward_idx)
    if val is not None:  # the same calibration images; reward and select from the validation images
        vperm = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))
        left = vperm[reward_images:reward_images + select_images]
        reward, select = val.subset(vperm[:reward_images]), val.subset(left) if len(left) else None
    return Splits(reward, data.train.subset(calib_idx), data.train, data.test, select)


def absolute_spec(spec: str | None) -> str | None:
    """``spec`` (a data spec or a path) with its path made absolute, so that it means the same from any folder."""
    if spec is None or spec == "digits":
        return spec
    kind, sep, path = spec.partition(":")
    if sep and kind in ("cifar10", "imagefolder"):
        return f"{kind}:{Path(path).expanduser().resolve()}"
    return str(Path(spec).expanduser().resolve())


def load_data(spec: str) -> ImageData:
    """Load ``cifar10:DIR``, ``imagefolder:DIR`` or ``digits``.

    :raises UserError: an unknown spec, a missing folder or a folder with no usable images.
    """
    kind, _, path = spec.partition(":")
    if kind == "digits":
        return _digits()
    if kind not in ("cifar10", "imagefolder") or not path:
        raise UserError(f"unknown data spec {spec!r}; use cifar10:DIR, imagefolder:DIR or digits")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    return _cifar10(root) if kind == "cifar10" else _imagefolder(root)


def _cifar10(root: Path) -> ImageData:
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    train_files = sorted(folder.glob("data_batch_*"))
    test_file = folder / "test_batch"
    if not train_files or not test_file.is_file():
        raise UserError(f"no CIFAR-10 batches in {folder}: expected data_batch_* and test_batch "
                        "(the python version of CIFAR-10)")

    def read(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for f in files:
            try:
                with open(f, "rb") as fh:
                    d = _CifarUnpickler(fh, encoding="latin1").load()
                if not isinstance(d, dict):
                    raise ValueError(f"it holds a {type(d).__name__}, not a dict")
                xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d["labels"], dtype=np.int64))
            except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError) as e:
                raise UserError(f"{f} is not a CIFAR-10 python batch: {e}") from e
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    (trx, try_), (tex, tey) = read(train_files), read([test_file])
    return ImageData("cifar10", Split(trx, try_, CIFAR_MEAN, CIFAR_STD), Split(tex, tey, CIFAR_MEAN, CIFAR_STD), 10)


class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR-10's python batches without running code: builtin containers and numbers need no globals, and
    the only globals admitted are those numpy arrays are pickled with. Anything else is refused.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def _imagefolder(root: Path) -> ImageData:
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise UserError(f"{root} must hold train/<class>/*.jpg and test/<class>/*.jpg (and optionally val/)")
    classes = class_names(root / "train")
    (trx, try_), (tex, tey) = read_folder(root / "train", classes), read_folder(root / "test", classes)
    val = None
    if (root / "val").is_dir():
        vx, vy = read_folder(root / "val", classes)
        val = Split(vx, vy, CIFAR_MEAN, CIFAR_STD)
    return ImageData(f"imagefolder:{root.name}", Split(trx, try_, CIFAR_MEAN, CIFAR_STD),
                     Split(tex, tey, CIFAR_MEAN, CIFAR_STD), len(classes), val)


def class_names(folder: Path) -> list[str]:
    """The sorted class sub-folders of ``folder`` (an ImageFolder's labels, in order)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"no class folders in {folder}")
    return classes


def read_folder(folder: Path, classes: list[str],
                keep: Callable[[str, int], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``folder/<class>/*.jpg|png`` for ``classes`` (label = index) into uint8 (N, C, H, W) and labels;
    ``keep(class, k)`` may leave out a class's ``k``-th file in name order.
    """
    from PIL import Image, UnidentifiedImageError

    xs, ys = [], []
    for label, cls in enumerate(classes):
        if not (folder / cls).is_dir():
            raise UserError(f"{folder} has no folder for class {cls!r}")
        files = [f for f in sorted((folder / cls).glob("*")) if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
        for k, f in enumerate(files):
            if keep is not None and not keep(cls, k):
                continue
            try:
                with Image.open(f) as im:
                    xs.append(np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
            except (OSError, UnidentifiedImageError) as e:
                raise UserError(f"cannot read image {f}: {e}") from e
            ys.append(label)
    if not xs:
        raise UserError(f"no images in {folder}")
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise UserError(f"images in {folder} differ in size ({sorted(shapes)[:3]}); resize them first")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def load_val(spec: str | Split, data: ImageData) -> Split:
    """Validation images for the reward and select splits: a :class:`Split`, or a folder ``DIR/<class>/*.jpg``
    with one class folder per class of the data, labelled in sorted name order as ImageFolder does (CIFAR-10's
    names sort in its label order), normalised like the training images.
    """
    if isinstance(spec, Split):
        return spec
    root = Path(spec.removeprefix("imagefolder:")).expanduser()
    if not root.is_dir():
        raise UserError(f"validation folder not found: {root}")
    classes = class_names(root)
    if len(classes) != data.num_classes:
        raise UserError(f"{root} has {len(classes)} class folders but {data.name} has {data.num_classes} classes")
    x, y = read_folder(root, classes)
    t = data.train
    if tuple(x.shape[1:]) != tuple(t.x.shape[1:]):
        raise UserError(f"images in {root} are {tuple(x.shape[1:])}, the training images {tuple(t.x.shape[1:])}")
    return Split(x, y, t.mean, t.std, t.scale)


def _digits() -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UserError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:360], perm[360:]
    return ImageData("digits", Split(x[train], y[train], DIGITS_MEAN, DIGITS_STD, 1 / 16),
                     Split(x[test], y[test], DIGITS_MEAN, DIGITS_STD, 1 / 16), 10)
