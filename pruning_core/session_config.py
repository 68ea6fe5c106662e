"""The settings a :class:`~pruning_core.session.PruningSession` loads, scores and evaluates a model with, and the
names of its drop criteria.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DROP_CRITERIA", "SessionConfig", "refits_by_default"]

DROP_CRITERIA = ("loss", "taylor")


@dataclass
class SessionConfig:
    """Data and evaluation settings shared by every method that prunes this model."""

    reward_images: int = 1000
    """Training images in the reward split (accuracy that search methods optimise)."""
    calib_batches: int = 10
    """Minibatches of training images for adaptive BN recalibration."""
    select_images: int = 1000
    """Training images, disjoint from the reward and calibration images, on which a search re-scores its best
    candidates before it keeps one (fewer when the training set runs out; 0: no select split)."""
    batch_size: int = 64
    """Batch size for calibration, scoring and fine-tuning."""
    taylor_batches: int = 32
    """Minibatches of training images that Taylor scores are averaged over (fewer give noisier rankings)."""
    taylor_augment: bool = True
    """Score on flipped/shifted training images: a model that fits its training set has near-zero loss
    there, and augmented images give the gradients more signal (not for digits, where flips change labels)."""
    importance: str = "taylor"
    """Channel criterion: ``taylor`` (first-order, Molchanov 2019), ``taylor2`` (second-order), ``l1`` or ``drive``
    (DRIVE's dual-gradient metric)."""
    drop_criterion: str = "loss"
    """What it costs to remove a residual branch whole (:meth:`PruningSession.drop_costs`): ``loss``, the
    calibration images' cross-entropy with that branch alone removed and BN recalibrated (one evaluation per
    branch), or ``taylor``, the branch's summed channel scores (free, but it ranked blocks worse in
    ``docs/drop-blocks.md``)."""
    mean: tuple[float, ...] | None = None
    """Per-channel mean subtracted from ``pixel * scale`` (one value for all channels); None: the data set's
    default (ImageNet's for cifar10 and image folders)."""
    std: tuple[float, ...] | None = None
    """Per-channel std the centred pixels are divided by; None: the data set's default."""
    scale: float | None = None
    """Factor from 0-255 pixel values to the model's range before ``mean`` and ``std``; None: 1/255."""
    reconstruct: bool = False
    """Refit every conv and linear layer of a pruned model, by least squares, to the dense model's outputs on
    ``reconstruct_images`` calibration images before adaptive BN (:class:`~pruning_core.reconstruct.Reconstruction`;
    He et al. 2017). Seconds per model, no labels or gradients. Drop costs are measured without it (on the images
    it fits)."""
    reconstruct_images: int = 256
    """Calibration images the reconstruction fits on (all in one forward pass; fewer if the split is smaller)."""
    seed: int = 0
    """Seed for the reward/calibration subsets and the scoring batches."""
    device: str = "auto"
    """Where scoring, pruning, recalibration, refits, evaluation and fine-tuning run: ``auto`` (the first CUDA GPU if
    there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. Latency is always timed on the CPU."""
    image_size: int | None = None
    """Resize and centre-crop every image to this many pixels square (image folders), or resize (CIFAR-10, digits);
    None: the images' own size, which in an image folder all must share."""
    loader_workers: int = 2
    """Processes that decode an image folder's images while the model runs (0: decode in this process); 2 decoded
    the most images per second on 2 cores (``docs/reach.md``)."""
    num_classes: int | None = None
    """Outputs of the model's head: torchvision and timm models are built with it (default: the data's class count),
    and a factory's last linear layer is replaced when it differs (default: as built)."""
    trust_pickle: bool = False
    """Let the weights file be a whole pickled ``nn.Module``. Unpickling runs code from the file: only for your own."""


def refits_by_default(finetune_epochs: int = 0, adapt: bool = True) -> bool:
    """Whether a kept model is refitted when nobody says: yes, unless it will be fine-tuned (the fine-tune replaces
    the refit) or BN is not recalibrated (the refit fits the inputs adaptive BN gives each layer).
    """
    return adapt and finetune_epochs == 0
