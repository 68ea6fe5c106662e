"""CPU latency: median of repeated timed runs, in PyTorch eager mode (as is, or in its deployment form: channels-last
with Conv+BN folded) or in ONNX Runtime (the usual CPU deployment).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.utils.benchmark as benchmark
from torch import nn

from pruning_core.device import cpu_copy
from pruning_core.errors import UserError
from pruning_core.graph import grouped_step
from pruning_core.prune import kept_counts, prune

if TYPE_CHECKING:
    from pruning_core.graph import ModelTrace

__all__ = ["BACKENDS", "LatencyBudget", "LatencyTable", "check_max_latency", "compare_latency", "cpu_channel_block",
           "deploy_form", "latency_runner", "measure_latency", "time_runner"]

BACKENDS = ("torch", "torch-cl", "onnxruntime")

log = logging.getLogger(__name__)

MIN_PROBE_SPEEDUP = 1.1  # below it, LatencyTable does not fit an offset to its half-width probe


def cpu_channel_block() -> int:
    """Channels per SIMD block of this CPU's conv kernels: 16 with AVX-512, 8 otherwise (AVX2).

    oneDNN and ONNX Runtime's NCHWc kernels (MLAS) pack channels in blocks of this many. In ORT, a conv whose
    output width is not a multiple of the block computes the padded width anyway, and one whose input width is
    not a multiple (and not below it) leaves the blocked kernels altogether, with layout reorders around it.
    So a width of 8 costs what 16 does on an AVX-512 machine, and ``round_to`` 8 is not whole blocks there.
    """
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ... as ATen dispatches
    return 16 if capability.startswith("AVX512") else 8


def deploy_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` as a CPU deployment would run it in PyTorch: eval mode, every Conv+BN pair folded into
    one conv (``torch.fx``), weights in channels-last memory format. Feed it channels-last inputs.

    oneDNN's CPU convolutions prefer channels-last (NHWC) data, and a folded BN is one pass over the activations
    less per conv. A model that ``torch.fx`` cannot trace keeps its BN layers (logged) and is only converted to
    channels-last.
    """
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    try:
        model = fuse(model, inplace=True)
    except Exception as e:  # noqa: BLE001 - any tracing failure only costs the folding
        log.info("Conv+BN folding skipped, torch.fx cannot trace %s: %s", type(model).__name__, e)
    return model.to(memory_format=torch.channels_last)


def latency_runner(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1, threads: int | None = None,
                   backend: str = "torch") -> Callable[[], object]:
    """A no-argument callable running one forward pass of ``model`` at ``batch_size`` on ``backend``, warmed up.

    - ``torch`` runs the module itself (eval mode, no grad).
    - ``torch-cl`` runs its :func:`deploy_form` (Conv+BN folded, channels-last) on a channels-last input.
    - ``onnxruntime`` exports it to ONNX in memory once and runs an ORT CPU session with all graph
      optimisations (Conv+BN+ReLU fusion among them) and ``threads`` intra-op threads.

    Build it once to time the same model repeatedly without re-exporting. ``model`` is put in eval mode; its
    weights and layout are not changed. Latency is timed on this CPU: a model on a GPU is timed as a CPU copy.
    """
    model = cpu_copy(model).eval()
    threads = threads or torch.get_num_threads()
    x = torch.randn(batch_size, *input_shape)
    if backend in ("torch", "torch-cl"):
        if backend == "torch-cl":
            model = deploy_form(model)
            x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

        def run() -> object:
            with torch.no_grad():
                return model(x)
    elif backend == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise UserError("the onnxruntime latency backend needs onnxruntime: "
                            "pip install 'prunepilot[export]'") from e
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buf, input_names=["input"], output_names=["logits"], dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        feed = {"input": x.numpy()}

        def run() -> object:
            return sess.run(None, feed)
    else:
        raise UserError(f"unknown latency backend {backend!r}; use one of {', '.join(BACKENDS)}")
    for _ in range(3):
        run()
    return run


def time_runner(run: Callable[[], object], min_run_time: float = 1.0, threads: int | None = None) -> float:
    """Median seconds per call of ``run`` (``torch.utils.benchmark``'s blocked autorange over ``min_run_time``)."""
    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=threads or torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1,
                    min_run_time: float = 1.0, threads: int | None = None, backend: str = "torch") -> float:
    """Median seconds per forward pass at ``batch_size`` after a warm-up (see :func:`latency_runner`)."""
    return time_runner(latency_runner(model, input_shape, batch_size, threads, backend), min_run_time, threads)


def compare_latency(dense: nn.Module, pruned: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1,
                    backend: str = "torch", repeats: int = 5, min_run_time: float = 0.3,
                    threads: int | None = None) -> dict:
    """Time ``pruned`` against ``dense`` in pairs: in each of ``repeats`` sweeps dense is timed right before the
    pruned model, and the speed-up is the median of the per-sweep ratios, which cancels the drift of a shared
    machine's speed that a ratio of two far-apart timings keeps.

    Returns ``backend``, ``batch_size``, ``speedup`` and the two timings of the sweep it comes from, ``dense_ms``
    and ``pruned_ms`` (the lower middle sweep for an even ``repeats``): the medians of each model's timings taken
    apart could disagree with the speed-up where the machine's speed drifted (a report that read "0.04 ms dense,
    0.06 ms pruned, 1.21x faster").
    """
    if repeats < 1:
        raise UserError(f"latency repeats must be >= 1, got {repeats}")
    runs = [latency_runner(m, input_shape, batch_size, threads, backend) for m in (dense, pruned)]
    dense_s, pruned_s = [], []
    for _ in range(repeats):
        dense_s.append(time_runner(runs[0], min_run_time, threads))
        pruned_s.append(time_runner(runs[1], min_run_time, threads))
    ratios = [d / q for d, q in zip(dense_s, pruned_s)]
    mid = sorted(range(repeats), key=ratios.__getitem__)[(repeats - 1) // 2]
    return {"backend": backend, "batch_size": batch_size, "dense_ms": 1000 * dense_s[mid],
            "pruned_ms": 1000 * pruned_s[mid], "speedup": ratios[mid]}


def _grid(full: int, block: int, points: int = 16) -> list[int]:
    """Widths a table measures for a dimension of ``full`` channels: multiples of ``block`` (coarser for wide
    layers, at most about ``points`` of them), and ``full`` itself.
    """
    step = max(block, -(-full // points // block) * block)
    return sorted({*range(step, full, step), full})


def _ceil(grid: list[int], width: int) -> int:
    """Index of the smallest grid width that holds ``width`` channels."""
    return next((i for i, w in enumerate(grid) if w >= width), len(grid) - 1)


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
    convs well, such as ONNX Runtime (its accuracy is measured in ``docs/benchmarks.md``). Widths that are not
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
        points = 16
        while True:  # coarsen the grid until the table takes at most max_timings timings
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
            total, done = sum(len(i) * len(o) for _, i, o in todo.values()), 0
            if total <= max_timings or points <= 2:
                break
            points //= 2
        layers: dict[str, dict] = {}
        for key, (info, ins, outs) in todo.items():
            ms = []
            for c_in in ins:
                row = []
                for c_out in outs:
                    if info.kind == "linear":
                        mod, shape = nn.Linear(c_in, c_out), (c_in,)
                    else:
                        dw = info.depthwise
                        c_in = c_out if dw else c_in
                        kh, kw = info.kernel_size
                        mod = nn.Conv2d(c_in, c_out, (kh, kw), info.stride, (kh // 2, kw // 2),
                                        groups=c_out if dw else info.groups)
                        shape = (c_in, info.out_hw[0] * info.stride, info.out_hw[1] * info.stride)
                    run = latency_runner(mod, shape, batch_size, threads, backend)
                    row.append(1000 * time_runner(run, min_run_time, threads))
                    done += 1
                    if progress:
                        progress(done, total)
                ms.append(row)
            for i in range(len(ins)):  # monotone: a wider layer is never predicted faster than a narrower one
                for j in range(len(outs)):
                    ms[i][j] = max(ms[i][j], ms[i - 1][j] if i else 0.0, ms[i][j - 1] if j else 0.0)
            layers[key] = {"in": ins, "out": outs, "ms": ms}
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
