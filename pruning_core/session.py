"""A pruning session: one model, its data splits, its trace and its cached importance scores.

The CLI, the environment and the agent all work through this object, so a model is traced and scored
once and every method sees the same scores, reward split and calibration images.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from pruning_core.data import ImageData, absolute_spec, load_data, load_val, make_splits
from pruning_core.device import model_device, resolve_device
from pruning_core.errors import UserError
from pruning_core.evaluate import accuracy, adapt_bn, augment_batch, mean_loss
from pruning_core.finetune import FinetuneConfig, finetune
from pruning_core.finetune_data import finetune_images
from pruning_core.graph import ModelTrace
from pruning_core.importance import IMPORTANCES, DriveImportance, L1Importance, Taylor2Importance, TaylorImportance
from pruning_core.latency import measure_latency
from pruning_core.latency_table import LatencyTable
from pruning_core.prune import kept_counts, prune, removed_channels
from pruning_core.reconstruct import Reconstruction
from pruning_core.session_config import DROP_CRITERIA, SessionConfig, refits_by_default
from pruning_core.splits import FolderSplit, Split, holdout_split
from pruning_core.tracer import trace_model
from pruning_core.zoo import build_model, load_weights, recorded_accuracy

__all__ = ["PruningSession"]

log = logging.getLogger(__name__)


class PruningSession:
    """Load, trace and score a model once; then build, recalibrate and evaluate pruned copies.

    :param model: a zoo name, ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory``, or an ``nn.Module``
        (never modified: a copy is moved to ``config.device`` or given a new head).
    :param weights: checkpoint path, or None to use the model's current weights.
    :param data: a data spec (``cifar10:DIR``, ``imagefolder:DIR``, ``digits``) or an :class:`ImageData`, loaded at
        ``config.image_size``.
    :param val_data: images the model was not trained on, for the reward and select splits: a folder of class
        folders or a :class:`Split` (default: the data's own ``val/``, else training images).
    :param scores: channel scores computed by another session of the same model and data (the workers of a
        parallel search take their driver's), instead of scoring here.
    """

    def __init__(self, model: str | nn.Module, weights: str | None, data: str | ImageData,
                 config: SessionConfig | None = None, val_data: str | Split | None = None,
                 scores: dict[str, torch.Tensor] | None = None):
        self.config = config = config or SessionConfig()
        if config.reconstruct_images < 1:
            raise UserError(f"reconstruct_images must be at least 1, got {config.reconstruct_images}")
        if config.drop_criterion not in DROP_CRITERIA:
            raise UserError(f"unknown drop criterion {config.drop_criterion!r}; use one of {', '.join(DROP_CRITERIA)}")
        self.model_name = model if isinstance(model, str) else type(model).__name__
        # what rebuilds this session in another process (prunepilot finetune RUN_DIR); None where an object was given
        self.source = {"model": model if isinstance(model, str) else None,
                       "weights": str(Path(weights).expanduser().resolve()) if weights else None,
                       "data": absolute_spec(data) if isinstance(data, str) else None,
                       "val_data": absolute_spec(val_data) if isinstance(val_data, str) else None,
                       "config": asdict(config)}
        # whether source rebuilds it exactly (no Python object given): what parallel evaluation workers need
        self.rebuildable = (isinstance(model, str) and isinstance(data, str)
                            and (val_data is None or isinstance(val_data, str)))
        self.device = resolve_device(config.device)
        self.data = load_data(data, config.image_size, config.loader_workers) if isinstance(data, str) else data
        if (config.mean, config.std, config.scale) != (None, None, None):
            self.data = self.data.normalised(config.mean, config.std, config.scale)
        num_classes = config.num_classes
        if num_classes is None and isinstance(model, str) and model.startswith(("torchvision:", "timm:")):
            num_classes = self.data.num_classes  # their default head is ImageNet's 1,000 classes
        with torch.random.fork_rng(devices=[]):  # a model without weights starts the same in every run of a seed
            torch.manual_seed(config.seed)
            self.model = build_model(model, num_classes)
        self.random_weights = not weights and isinstance(model, str)
        self.recorded_acc: float | None = None  # the accuracy the weights file says the model has, if it says
        if weights:
            load_weights(self.model, weights, config.trust_pickle)
            self.recorded_acc = recorded_accuracy(weights, config.trust_pickle)
        elif self.random_weights:
            log.warning("no weights given: %s keeps its random initial weights, so its accuracies mean nothing "
                        "(pass --weights)", self.model_name)
        self.model.eval()
        val = load_val(val_data, self.data, config.loader_workers) if val_data is not None else self.data.val
        self.val_source = "val" if val is not None else "train"
        self.splits = make_splits(self.data, config.reward_images, config.calib_batches * config.batch_size,
                                  config.seed, config.select_images, val)
        self._check_model_fits()
        t = time.perf_counter()
        self.trace: ModelTrace = trace_model(self.model, self.data.input_shape)
        self.timings = {"trace_s": time.perf_counter() - t}
        if not self.trace.groups:
            raise UserError(f"{self.model_name} has no prunable channel groups "
                            f"(excluded: {self.trace.excluded or 'none found'})")
        if self.model is model and model_device(model) != self.device:
            self.model = copy.deepcopy(model)  # the caller's module stays where it is
        self.model.to(self.device)  # traced on the CPU; everything after runs here
        t = time.perf_counter()
        self.scores = self._score() if scores is None else {k: v.to(self.device) for k, v in scores.items()}
        self.timings["score_s"] = time.perf_counter() - t
        self.flops_dense = self.trace.flops()
        self.params_dense = self.trace.params()
        self._dense_acc: dict[str, float] = {}
        self._drop_costs: dict[str, float] | None = None
        self._reconstruction: Reconstruction | None = None

    def _check_model_fits(self) -> None:
        x, _ = next(self.data.test.batches(2))
        try:
            with torch.no_grad():
                out = self.model(x)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{self.model_name} does not run on {self.data.name} images of shape "
                            f"{tuple(x.shape[1:])}: {e}") from e
        if out.dim() != 2 or out.shape[1] != self.data.num_classes:
            raise UserError(f"{self.model_name} outputs shape {tuple(out.shape)} but {self.data.name} has "
                            f"{self.data.num_classes} classes")

    def drop_costs(self, progress: bool = False) -> dict[str, float]:
        """What removing each residual branch (:attr:`ModelTrace.droppable`) alone costs, by
        ``config.drop_criterion`` (computed once, then cached): lower is cheaper to drop.
        """
        if self._drop_costs is None:
            branches = sorted(self.trace.droppable)
            if self.config.drop_criterion == "taylor":
                self._drop_costs = {name: float(self.scores[name].sum()) for name in branches}
            else:
                from tqdm.auto import tqdm
                t = time.perf_counter()
                bar = tqdm(branches, desc="drop costs", unit="branch", leave=False, disable=None if progress else True)
                # never reconstructed: the refit is fitted on calibration images, so their loss would flatter it
                self._drop_costs = {name: mean_loss(self.build({name: 1.0}, reconstruct=False), self.splits.calib)
                                    for name in bar}
                self.timings["drop_costs_s"] = time.perf_counter() - t
        return dict(self._drop_costs)

    def _score(self) -> dict[str, torch.Tensor]:
        if self.config.importance == "l1":
            return L1Importance()(self.model, None, self.trace)
        if self.config.importance not in IMPORTANCES:
            raise UserError(f"unknown importance {self.config.importance!r}; use {', '.join(IMPORTANCES)}")
        gen = torch.Generator().manual_seed(self.config.seed)
        batches = self.splits.train.batches(self.config.batch_size, shuffle=True, generator=gen)
        if self.config.taylor_augment and self.data.name != "digits":
            batches = ((augment_batch(x, gen), y) for x, y in batches)
        if self.config.importance == "drive":
            return DriveImportance(self.config.taylor_batches)(self.model, batches, self.trace)
        if self.config.importance == "taylor2":
            return Taylor2Importance(self.config.taylor_batches, seed=self.config.seed)(self.model, batches, self.trace)
        return TaylorImportance(self.config.taylor_batches)(self.model, batches, self.trace)

    def split(self, name: str) -> Split:
        split = {"reward": self.splits.reward, "calib": self.splits.calib, "test": self.splits.test,
                 "train": self.splits.train, "select": self.splits.select}[name]
        if split is None:
            raise UserError(f"{self.model_name} on {self.data.name} has no {name} split (too few training images)")
        return split

    def latency_table(self, backend: str, batch_size: int, progress: bool = True) -> LatencyTable:
        """Time the model layer by layer on this machine (:meth:`LatencyTable.measure`), with a progress bar."""
        from tqdm.auto import tqdm

        log.info("measuring a %s latency table for %s at batch %d", backend, self.model_name, batch_size)
        with tqdm(desc=f"latency table ({backend}, batch {batch_size})", unit="layer", leave=False,
                  disable=None if progress else True) as bar:
            def tick(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            table = LatencyTable.measure(self.model, self.trace, backend, batch_size, progress=tick)
        log.info("latency table: dense %.2f ms, %d layer shapes", table.dense_ms, len(table.layers))
        return table

    def dense_accuracy(self, split: str = "test") -> float:
        if split not in self._dense_acc:
            self._dense_acc[split] = accuracy(self.model, self.split(split))
            if split == "test" and self.recorded_acc is not None and self._dense_acc[split] < self.recorded_acc - 5:
                log.warning("dense test accuracy %.2f%% is far below the %.2f%% the weights file records: check "
                            "--data and the normalisation (--mean, --std, --scale; now %s)", self._dense_acc[split],
                            self.recorded_acc, self.data.normalisation)
        return self._dense_acc[split]

    def build(self, ratios: dict[str, float], round_to: int | None = None, adapt: bool = True,
              timings: dict[str, float] | None = None, reconstruct: bool | None = None) -> nn.Module:
        """Prune a copy of the model with the cached scores and, by default, recalibrate its BN.

        With ``reconstruct`` (default: ``config.reconstruct``) the layers are refitted to the dense model's outputs
        first.

        :param timings: if given, ``prune_s``, ``reconstruct_s`` (0 without reconstruction) and ``adapt_s``
            (seconds) are written into it.
        """
        times = {}
        t = time.perf_counter()
        pruned = prune(self.model, ratios, self.scores, self.trace, round_to)
        times["prune_s"] = time.perf_counter() - t
        times["reconstruct_s"] = 0.0
        if self.config.reconstruct if reconstruct is None else reconstruct:
            t = time.perf_counter()
            kept = kept_counts(self.trace, ratios, round_to)
            self.reconstruction(pruned, removed_channels(self.trace, kept, self.scores))
            times["reconstruct_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if adapt:
            adapt_bn(pruned, self.splits.calib, self.config.calib_batches, self.config.batch_size)
        times["adapt_s"] = time.perf_counter() - t
        if timings is not None:
            timings.update(times)
        return pruned.eval()

    def score_allocation(self, ratios: dict[str, float], round_to: int | None = None,
                         latency_batch: int | None = None) -> tuple[float, dict[str, float]]:
        """Accuracy (%) on the reward split of the allocation ``ratios`` built as :meth:`build` builds it, and the
        seconds each part took (``prune_s``, ``reconstruct_s``, ``adapt_s``, ``eval_s``): what a search evaluates.
        With ``latency_batch``, the model's latency at that batch size is timed on the CPU too (``latency_ms``).
        """
        timings: dict[str, float] = {}
        model = self.build(ratios, round_to, timings=timings)
        t = time.perf_counter()
        acc = accuracy(model, self.splits.reward)
        timings["eval_s"] = time.perf_counter() - t
        if latency_batch is not None:
            timings["latency_ms"] = 1000 * measure_latency(model, self.data.input_shape, latency_batch,
                                                           min_run_time=0.2)
        return acc, timings

    def build_final(self, ratios: dict[str, float], round_to: int | None = None, reconstruct: bool | None = None,
                    finetune_epochs: int = 0, adapt: bool = True,
                    timings: dict[str, float] | None = None) -> tuple[nn.Module, dict]:
        """Build the model a command keeps; return it with the report fields that say how it was built.

        ``reconstruct`` None (the default) refits it unless it will be fine-tuned or BN is not recalibrated. A refit
        that scores lower than the plain model on the selection images (the reward images without a select split)
        is not kept: the plain model is, with ``refit_rejected`` in the fields. A refitted model's fields carry
        ``acc_before_reconstruct``, the test accuracy of the same allocation built without it, so a report shows
        what the refit bought.
        """
        if reconstruct is None:
            reconstruct = refits_by_default(finetune_epochs, adapt)
        if reconstruct and not adapt:
            raise UserError("reconstruction fits each layer to the inputs that adaptive BN gives it; "
                            "it needs adaptive BN")
        model = self.build(ratios, round_to, adapt=adapt, timings=timings, reconstruct=reconstruct)
        fields: dict[str, object] = {"reconstruct": reconstruct}
        if reconstruct:
            plain = self.build(ratios, round_to, reconstruct=False)
            judge = self.splits.select if self.splits.select is not None else self.splits.reward
            if accuracy(model, judge) < accuracy(plain, judge):
                log.warning("the least-squares refit scored lower than the plain pruned model on the selection "
                            "images; keeping the plain one")
                return plain, {"reconstruct": False, "refit_rejected": True}
            fields["acc_before_reconstruct"] = accuracy(plain, self.splits.test)
        return model, fields

    @property
    def reconstruction(self) -> Reconstruction:
        """The dense model's layer outputs on the first ``config.reconstruct_images`` calibration images (computed
        on first use).
        """
        if self._reconstruction is None:
            calib = self.splits.calib
            images = calib.normalise(calib.x[:self.config.reconstruct_images])  # what calib.batches() yields first
            self._reconstruction = Reconstruction(self.model, images.to(self.device), seed=self.config.seed)
        return self._reconstruction

    def finetune(self, model: nn.Module, config: FinetuneConfig | int, kd: bool = True, progress: bool = False,
                 extra_data: list[str] = (), schedule=None, checkpoint: str | Path | None = None,
                 report: dict | None = None) -> nn.Module:
        """Fine-tune ``model`` (:func:`~pruning_core.finetune.finetune`) on the training images and those of
        ``extra_data`` (data specs), less ``config.holdout_images`` on which the epoch kept is chosen, distilling from
        the dense model when ``kd``; returns the model to keep. An int ``config`` is a number of epochs.
        """
        if isinstance(config, int):
            config = FinetuneConfig(epochs=config, seed=self.config.seed)
        if self.data.name == "digits" and config.augment != "none":  # flips change digits
            config = replace(config, augment="none")
        train, holdout = holdout_split(self.finetune_images(extra_data), config.holdout_images, config.seed)
        return finetune(model, train, config, teacher=self.model if kd else None, holdout=holdout, schedule=schedule,
                        checkpoint=checkpoint, progress=progress, report=report)

    def finetune_start(self, ratios: dict[str, float], round_to: int | None = None, schedule=None) -> nn.Module:
        """The model a fine-tune starts from: the allocation pruned with adaptive BN and no refit (the fine-tune
        replaces it), or the dense model for a training-time ``schedule``, which prunes it as it trains.
        """
        return self.build(ratios, round_to, reconstruct=False) if schedule is None else self.build({}, adapt=False)

    def finetune_images(self, extra_data: list[str] = ()) -> Split | FolderSplit:
        """The training images and those of each ``extra_data`` spec's training split, normalised like the model's
        data, in memory when they decode to at most 2 GiB (else streamed, alone).

        :raises UserError: a spec whose classes or image shape differ from the model's data.
        """
        return finetune_images(self.data, extra_data, self.config.image_size, self.config.loader_workers)

    def measure(self, ratios: dict[str, float], round_to: int | None = None) -> dict[str, float]:
        kept = kept_counts(self.trace, ratios, round_to)
        return {"flops": self.trace.flops(kept), "flops_ratio": self.trace.flops(kept) / self.flops_dense,
                "params_ratio": self.trace.params(kept) / self.params_dense}

    def report(self, model: nn.Module, ratios: dict[str, float], method: str, seed: int, time_s: float,
               round_to: int | None = None, **extra: object) -> dict:
        """The DESIGN.md JSON report for a pruned ``model`` built from ``ratios``.

        ``reconstruct`` says whether the model was refitted: ``config.reconstruct`` unless ``extra`` says otherwise
        (the fields of :meth:`build_final`).
        """
        m = self.measure(ratios, round_to)
        return {
            "model": self.model_name, "data": self.data.name, "flops_dense": self.flops_dense,
            "flops": m["flops"], "flops_ratio": round(m["flops_ratio"], 6),
            "params_dense": self.params_dense, "params_ratio": round(m["params_ratio"], 6),
            "acc_dense": self.dense_accuracy("test"), "acc": accuracy(model, self.splits.test), "acc_split": "test",
            "acc_reward": accuracy(model, self.splits.reward),
            "ratios": {k: round(float(v), 6) for k, v in ratios.items()}, "round_to": round_to,
            "method": method, "seed": seed, "reconstruct": self.config.reconstruct, "reward_source": self.val_source,
            "random_weights": self.random_weights, "normalisation": self.data.normalisation, "device": str(self.device),
            "excluded": dict(self.trace.excluded), "source": self.source,
            "time_s": round(time_s, 3), **extra,
        }
