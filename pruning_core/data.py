"""Image data sets with explicit splits: ``reward`` and ``calib`` from training images, ``test`` never searched.

CIFAR-10 and digits are held in memory as uint8 (N, C, H, W) and normalised per batch, so even the 60,000-image
set stays near 200 MB. Image folders stream from disk (:class:`~pruning_core.splits.FolderSplit`); their reward,
calibration and select images are decoded once into memory.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pruning_core.errors import UserError
from pruning_core.folder import class_names, list_images
from pruning_core.splits import FolderSplit, Split, normalise

# Split and normalise live in pruning_core.splits; they are re-exported here for the callers that import them from here
__all__ = ["ImageData", "Split", "load_data", "load_val", "make_splits", "normalise", "read_folder"]

CIFAR_MEAN, CIFAR_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what the shared ResNets were trained with
DIGITS_MEAN, DIGITS_STD = (0.305,), (0.376,)


@dataclass
class ImageData:
    """A training and a test split of one data set, and validation images if it has them (an ImageFolder's
    ``val/``), which searches then score on instead of training images. Splits are in memory (:class:`Split`) or
    streamed from an image folder (:class:`~pruning_core.splits.FolderSplit`).
    """

    name: str
    train: Split | FolderSplit
    test: Split | FolderSplit
    num_classes: int
    val: Split | FolderSplit | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.shape

    def normalised(self, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                   scale: float | None = None) -> ImageData:
        """The same images normalised as ``(x * scale - mean) / std`` (pixels 0-255); None keeps the current one.

        :raises UserError: ``mean`` or ``std`` has neither one value nor one per channel, or a ``std`` or ``scale``
            is not positive.
        """
        t = self.train
        channels = t.shape[0]
        mean, std = (tuple(v) * (channels if len(v) == 1 else 1) if v is not None else None for v in (mean, std))
        for name, v in (("--mean", mean), ("--std", std)):
            if v is not None and len(v) != channels:
                raise UserError(f"{name} has {len(v)} values; give 1 or {channels} (one per channel)")
        if (std is not None and min(std) <= 0) or (scale is not None and scale <= 0):
            raise UserError("--std and --scale must be positive")
        mean, std, scale = mean or t.mean, std or t.std, t.scale if scale is None else scale

        def renorm(split):
            return split if split is None else dataclasses.replace(split, mean=mean, std=std, scale=scale)

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


def load_data(spec: str, image_size: int | None = None, workers: int = 2) -> ImageData:
    """Load ``cifar10:DIR``, ``imagefolder:DIR`` or ``digits``, at ``image_size`` x ``image_size`` if given.

    An image folder holds ``train/`` and ``test/`` (or ``val/`` in its place), and optionally both ``val/`` and
    ``test/``, each with one folder of JPEG or PNG images per class. It is streamed by ``workers`` decoding processes;
    without ``image_size`` all its images must share the first one's size. CIFAR-10 and digits are resized in memory.

    :raises UserError: an unknown spec, a missing folder or a folder with no usable images.
    """
    kind, _, path = spec.partition(":")
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size must be at least 1, got {image_size}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    if kind == "digits":
        data = _digits()
    elif kind not in ("cifar10", "imagefolder") or not path:
        raise UserError(f"unknown data spec {spec!r}; use cifar10:DIR, imagefolder:DIR or digits")
    else:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise UserError(f"data folder not found: {root}")
        if kind == "imagefolder":
            return _imagefolder(root, image_size, workers)
        data = _cifar10(root)
    if image_size is not None:
        data = ImageData(data.name, data.train.resized(image_size), data.test.resized(image_size), data.num_classes)
    return data


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


def _imagefolder(root: Path, size: int | None, workers: int) -> ImageData:
    names = {p.name for p in root.iterdir() if p.is_dir()}
    if "train" not in names or not names & {"test", "val"}:
        raise UserError(f"{root} must hold train/<class>/*.jpg and test/<class>/*.jpg (or val/ in place of test/)")
    classes = class_names(root / "train")

    def split(name: str) -> FolderSplit:
        files, y = list_images(root / name, classes)
        return FolderSplit(files, y, CIFAR_MEAN, CIFAR_STD, size=size, workers=workers)

    train = split("train")
    test = split("test") if "test" in names else split("val")
    val = split("val") if "test" in names and "val" in names else None
    if size is None:
        for s in (test, val):
            if s is not None and s.native != train.native:
                raise UserError(f"{s.files[0].parent.parent} holds {s.native[1]}x{s.native[0]} images, train/ "
                                f"{train.native[1]}x{train.native[0]}: pass --image-size to resize and crop them all")
    return ImageData(f"imagefolder:{root.name}", train, test, len(classes), val)


def read_folder(folder: Path, classes: list[str], keep=None, size: int | None = None,
                workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``folder/<class>/*.jpg|png`` for ``classes`` (label = index) into memory, uint8 (N, 3, H, W) and labels;
    ``keep(class, k)`` may leave out a class's ``k``-th file in name order.
    """
    files, y = list_images(folder, classes, keep)
    split = FolderSplit(files, y, CIFAR_MEAN, CIFAR_STD, size=size, workers=workers).subset(torch.arange(len(y)))
    return split.x, split.y


def load_val(spec: str | Split, data: ImageData, workers: int = 0) -> Split | FolderSplit:
    """Validation images for the reward and select splits: a :class:`Split`, or a folder ``DIR/<class>/*.jpg``
    (:func:`class_folder`).
    """
    if isinstance(spec, (Split, FolderSplit)):
        return spec
    return class_folder(spec, data, workers, "validation")


def class_folder(spec: str, data: ImageData, workers: int = 0, role: str = "image") -> FolderSplit:
    """The images of a folder ``DIR/<class>/*.jpg`` with one class folder per class of ``data``, labelled in sorted
    name order as ImageFolder does (CIFAR-10's names sort in its label order), normalised like the training images
    and decoded at their size. ``role`` names the folder in errors.
    """
    root = Path(spec.removeprefix("imagefolder:")).expanduser()
    if not root.is_dir():
        raise UserError(f"{role} folder not found: {root}")
    classes = class_names(root)
    if len(classes) != data.num_classes:
        raise UserError(f"{root} has {len(classes)} class folders but {data.name} has {data.num_classes} classes")
    t = data.train
    files, y = list_images(root, classes)
    size = t.shape[1] if t.shape[1] == t.shape[2] else None  # square training images: resize these to match
    split = FolderSplit(files, y, t.mean, t.std, t.scale, size=size, workers=workers)
    if split.shape != t.shape:
        raise UserError(f"images in {root} are {split.shape}, the training images {t.shape}")
    return split


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
