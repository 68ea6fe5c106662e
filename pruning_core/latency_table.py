"""A per-layer latency lookup table that predicts any pruned variant's latency, and a budget on that prediction."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pruning_core.errors import UserError
from pruning_core.graph import grouped_step
from pruning_core.latency import BACKENDS, compare_latency, cpu_channel_block, latency_runner, time_runner
from pruning_core.prune import kept_counts, prune

if TYPE_CHECKING:
    from pruning_core.graph import LayerInfo, ModelTrace

__all__ = ["MIN_PROBE_SPEEDUP", "LatencyBudget", "LatencyTable", "check_max_latency"]

log = logging.getLogger(__name__)

MIN_PROBE_SPEEDUP = 1.1  # below it, LatencyTable does not fit an offset to its half-width probe


def _grid(full: int, block: int, points: int = 16) -> list[int]:
    """Widths a table measures for a dimension of ``full`` channels: multiples of ``block`` (coarser for wide
    layers, at most about ``points`` of them), and ``full`` itself.
    """
    step = max(block, -(-full // points // block) * block)
    return sorted({*range(step, full, step), full})


def _ceil(grid: list[int], width: int) -> int:
    """Index of the smallest grid width that holds ``width`` channels."""
    return next((i for i, w in enumerate(grid) if w >= width), len(grid) - 1)


def _timing_plan(trace: ModelTrace, keys: dict[str, tuple[str, bool, bool]], block: int,
                 max_timings: int) -> dict[str, tuple[LayerInfo, list[int], list[int]]]:
    """Per distinct layer shape (``keys``, from :meth:`LatencyTable._shape_keys`): a layer of that shape and the
    input and output widths to time it at, on a grid coarsened (16, 8, 4 or 2 points per dimension) until the
    table takes at most ``max_timings`` timings.
    """
    points = 16
    while True:
        todo: dict[str, tuple] = {}
        for name, (key, free_in, free_out) in keys.items():
            if key not in todo:
                info = trace.layers[name]
                step = block
                if info.groups > 1 and not info.depthwise:  # a grouped conv's widths are multiples of its groups
                    step = grouped_step(block, info.groups, min(info.in_channels, info.out_channels))
                ins = _grid(info.in_channels, step, points) if free_in else [info.in_channels]
                outs = _grid(info.out_channels, step, points) if free_out else [info.out_channels]
                todo[key] = (info, ins, outs)
        total = sum(len(i) * len(o) for _, i, o in todo.values())
        if total <= max_timings or points <= 2:
            return todo
        points //= 2


def _time_layer(info: LayerInfo, c_in: int, c_out: int, backend: str, batch_size: int, min_run_time: float,
                threads: int | None) -> float:
    """Milliseconds per forward pass of a fresh layer shaped as ``info`` at ``c_in`` x ``c_out`` channels (a
    depthwise conv's input follows its output), on an input of the size the trace saw.
    """
    if info.kind == "linear":
        mod, shape = nn.Linear(c_in, c_out), (c_in,)
    else:
        dw = info.depthwise
        c_in = c_out if dw else c_in
        kh, kw = info.kernel_size
        mod = nn.Conv2d(c_in, c_out, (kh, kw), info.stride, (kh // 2, kw // 2), groups=c_out if dw else info.groups)
        shape = (c_in, info.out_hw[0] * info.stride, info.out_hw[1] * info.stride)
    run = latency_runner(mod, shape, batch_size, threads, backend)
    return 1000 * time_runner(run, min_run_time, threads)


def _monotone_grid(ms: list[list[float]]) -> list[list[float]]:
    """``ms`` (per input width, per output width), in place, made monotone: a wider layer is never predicted
    faster than a narrower one.
    """
    for i in range(len(ms)):
        for j in range(len(ms[i])):
            ms[i][j] = max(ms[i][j], ms[i - 1][j] if i else 0.0, ms[i][j - 1] if j else 0.0)
    return ms


class LatencyTable:
    """Predicted latency of any pruned variant of one traced model, from per-layer timings on this machine.

    Every conv and linear layer is timed alone, at widths on a grid of multiples of ``block`` (the channel block
    of the CPU kernels: 8 with AVX2, 16 with AVX-512), once per distinct layer shape and pruned dimension. A
    pruned model's latency is ``offset_ms + scale * S``, with ``S`` the sum of its layers' entries, each looked
    up at its widths rounded up to the grid. ``offset_ms`` and ``scale`` are fitted to two whole-model timings
    taken in pairs: the dense model, and a probe with every prunable group at half width (rounded to the block).
    The offset is the time the layers timed alone do not shrink with (the element-wise work on unpruned residual
    streams, layout reorders, the runtime's own overhead); without it, tables made proportional to the dense
    timing alone predicted the benchmark models' latency ratios 0.020 too low on average, and up to 0.045.
    Entries are made monotone (a wider layer never predicts faster), so a budget on the prediction can be
    bisected.

    This is NetAdapt's and AMC's latency lookup table. It predicts runtimes that fuse the non-conv work into the
    convs well, such as ONNX Runtime (its accuracy is measured in ``docs/latency-tables.md``). Widths that are not
    multiples of ``block`` predict as the next multiple, while ORT runs them on slower kernels, so search with
    ``round_to=block`` when budgeting latency.

    Build one with :meth:`measure`; :meth:`save` / :meth:`load` keep it as JSON.
    """

    def __init__(self, backend: str, batch_size: int, block: int, dense_ms: float, layers: dict[str, dict],
                 shapes: dict[str, str], offset_ms: float = 0.0, probe: dict | None = None):
        self.backend, self.batch_size, self.block, self.dense_ms = backend, batch_size, block, dense_ms
        self.layers = layers  # shape key -> {"in": grid, "out": grid, "ms": [[ms per (in, out)]]}
        self.shapes = shapes  # layer name -> shape key
        self.offset_ms = offset_ms
        self.probe = probe  # the half-width probe's kept channels and measured speed-up, as fitted
        # the layers timed alone each convert their input and output layout, which the whole model does not:
        # scale the entries so that the dense model predicts its own measured latency
        self.scale = (dense_ms - offset_ms) / self._sum(shapes, layers, None, None)

    @staticmethod
    def _sum(shapes: dict[str, str], layers: dict[str, dict], trace: ModelTrace | None,
             kept: dict[str, int] | None) -> float:
        """Sum of the entries of every layer at ``kept``'s widths (the dense widths without ``trace``)."""
        if trace is None:
            return sum(layers[k]["ms"][-1][-1] for k in shapes.values())
        total = 0.0
        for name, key in shapes.items():
            e = layers[key]
            c_in, c_out, _ = trace.channels_of(name, kept)
            if not c_in or not c_out:  # a layer of a dropped residual branch is gone
                continue
            total += e["ms"][_ceil(e["in"], c_in)][_ceil(e["out"], c_out)]
        return total

    @staticmethod
    def _shape_keys(trace: ModelTrace) -> dict[str, tuple[str, bool, bool]]:
        """Per conv/linear layer: its shape key, and whether its input and its output width can be pruned."""
        out = {}
        for name, info in trace.layers.items():
            if not info.weighted:
                continue
            free_in, free_out = name in trace.in_groups and not info.depthwise, name in trace.out_group
            grouped = "dw " if info.depthwise else f"g{info.groups} " if info.groups > 1 else ""
            kh, kw = info.kernel_size
            out[name] = (f"{info.kind} k{kh if kh == kw else f'{kh}x{kw}'} s{info.stride} {grouped}"
                         f"{info.in_channels}{'*' if free_in else ''}x{info.out_channels}{'*' if free_out else ''} "
                         f"@{info.out_hw[0]}x{info.out_hw[1]}", free_in, free_out)
        return out

    @classmethod
    def measure(cls, model: nn.Module, trace: ModelTrace, backend: str = "onnxruntime", batch_size: int = 1,
                block: int | None = None, min_run_time: float = 0.05, threads: int | None = None,
                progress: Callable[[int, int], None] | None = None, max_timings: int = 600) -> LatencyTable:
        """Time every distinct conv/linear layer shape of ``trace`` at its grid widths, and ``model`` whole.

        :param trace: ``model``'s :class:`~pruning_core.graph.ModelTrace`.
        :param block: the grid step and the half-width probe's rounding; by default this CPU's channel block
            (:func:`cpu_channel_block`). A block of 8 on an AVX-512 CPU puts the probe's stage-1 convs off the
            16-channel kernels, and the fit reads their slowness as fixed time, predicting too slow.
        :param max_timings: the grid of wide layers coarsens (at most 16, 8, 4 or 2 points per dimension) until
            the table needs at most this many timings.
        :param progress: called as ``progress(done, total)`` after each timed layer variant.
        """
        if backend not in BACKENDS:
            raise UserError(f"unknown latency backend {backend!r}; use one of {', '.join(BACKENDS)}")
        block = cpu_channel_block() if block is None else block
        if block < 1:
            raise UserError(f"latency table block must be >= 1, got {block}")
        keys = cls._shape_keys(trace)
        shapes = {name: key for name, (key, _, _) in keys.items()}
        todo = _timing_plan(trace, keys, block, max_timings)
        total, done = sum(len(i) * len(o) for _, i, o in todo.values()), 0
        layers: dict[str, dict] = {}
        for key, (info, ins, outs) in todo.items():
            ms = []
            for c_in in ins:
                row = []
                for c_out in outs:
                    row.append(_time_layer(info, c_in, c_out, backend, batch_size, min_run_time, threads))
                    done += 1
                    if progress:
                        progress(done, total)
                ms.append(row)
            layers[key] = {"in": ins, "out": outs, "ms": _monotone_grid(ms)}
        return cls.calibrated(model, trace, backend, batch_size, block, layers, shapes, min_run_time, threads)

    @classmethod
    def calibrated(cls, model: nn.Module, trace: ModelTrace, backend: str, batch_size: int, block: int,
                   layers: dict[str, dict], shapes: dict[str, str], min_run_time: float = 0.05,
                   threads: int | None = None) -> LatencyTable:
        """The table of these entries fitted to the dense model and a half-width probe, timed whole in pairs.

        Every prediction rests on these two timings, so they get the longest runs (3 paired sweeps of at least
        0.3 s each). The table stays proportional (offset 0) when the fit would give a negative offset (the
        layers alone under-predicting what pruning saves), or when the probe is less than ``MIN_PROBE_SPEEDUP``
        faster than dense: a model whose latency is mostly fixed overhead, or a timing a busy machine spoilt,
        which would otherwise make every prediction that of dense (logged).
        """
        half = {g.name: 0.5 for g in trace.groups}
        kept = kept_counts(trace, half, block)
        scores = {g.name: torch.arange(g.channels, 0, -1).float() for g in trace.groups}  # any ranking will do
        probe = prune(model, half, scores, trace, round_to=block)
        timed = compare_latency(model, probe, trace.input_shape, batch_size, backend, repeats=3,
                                min_run_time=max(0.3, 6 * min_run_time), threads=threads)
        dense_ms, probe_ms = timed["dense_ms"], timed["dense_ms"] / timed["speedup"]
        s_dense, s_probe = cls._sum(shapes, layers, None, None), cls._sum(shapes, layers, trace, kept)
        offset = 0.0
        if timed["speedup"] < MIN_PROBE_SPEEDUP:
            log.warning("the half-width probe ran only %.2fx faster than dense in %s at batch %d; the latency "
                        "table scales its layer timings proportionally", timed["speedup"], backend, batch_size)
        elif s_probe < s_dense:
            slope = (dense_ms - probe_ms) / (s_dense - s_probe)
            offset = max(0.0, dense_ms - slope * s_dense)
        return cls(backend, batch_size, block, dense_ms, layers, shapes, offset,
                   {"kept": kept, "speedup": timed["speedup"]})

    def predict_ms(self, trace: ModelTrace, kept: dict[str, int]) -> float:
        """Predicted latency (ms) of ``trace``'s model with ``kept[group]`` channels in each group."""
        return self.offset_ms + self.scale * self._sum(self.shapes, self.layers, trace, kept)

    def ratio(self, trace: ModelTrace, kept: dict[str, int]) -> float:
        """Predicted latency of the pruned model as a fraction of the dense model's."""
        return self.predict_ms(trace, kept) / self.dense_ms

    def to_dict(self) -> dict:
        return {"backend": self.backend, "batch_size": self.batch_size, "block": self.block,
                "dense_ms": self.dense_ms, "offset_ms": self.offset_ms, "probe": self.probe, "layers": self.layers,
                "shapes": self.shapes}

    def save(self, path: str | Path) -> None:
        """Write the table as JSON (through a temporary file, so a kill leaves no half-written table)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTable:
        """The table :meth:`to_dict` wrote (e.g. the one a benchmark result records; tables written before the
        offset was fitted are proportional, offset 0).
        """
        return cls(d["backend"], int(d["batch_size"]), int(d["block"]), float(d["dense_ms"]), d["layers"],
                   d["shapes"], float(d.get("offset_ms", 0.0)), d.get("probe"))

    @classmethod
    def load(cls, path: str | Path, trace: ModelTrace | None = None) -> LatencyTable:
        """Read a table written by :meth:`save`; with ``trace``, check that it describes that model's layers."""
        try:
            table = cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError, IndexError, ZeroDivisionError) as e:
            raise UserError(f"cannot read latency table {path}: {e}") from e
        if trace is not None:
            want = {n: k for n, (k, _, _) in cls._shape_keys(trace).items()}
            if want != table.shapes:
                raise UserError(f"latency table {path} was measured on another model (its layers differ); "
                                "measure it again for this one")
        return table


def check_max_latency(fraction: float, name: str = "--max-latency") -> float:
    """``fraction`` if it is a latency budget as a fraction of dense latency, in (0, 1]; else a :class:`UserError`
    naming it as ``name``. Commands call it before any work; :class:`LatencyBudget` calls it too.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"{name} {fraction} must be a fraction of dense latency in (0, 1]")
    return fraction


@dataclass(frozen=True)
class LatencyBudget:
    """A cap on predicted latency: at most ``fraction`` of the dense model's, by ``table``."""

    table: LatencyTable
    fraction: float

    def __post_init__(self) -> None:
        check_max_latency(self.fraction, "latency budget")

    def fits(self, trace: ModelTrace, kept: dict[str, int]) -> bool:
        return self.table.ratio(trace, kept) <= self.fraction

    def report(self, trace: ModelTrace, kept: dict[str, int]) -> dict:
        """The budget and what it predicts for ``kept``, as reports record it."""
        return {"backend": self.table.backend, "batch_size": self.table.batch_size, "max_latency": self.fraction,
                "predicted_ratio": round(self.table.ratio(trace, kept), 4)}
