"""CPU latency: median of repeated timed runs, in PyTorch eager mode (as is, or in its deployment form: channels-last
with Conv+BN folded) or in ONNX Runtime (the usual CPU deployment).
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Callable

import torch
import torch.utils.benchmark as benchmark
from torch import nn

from pruning_core.device import cpu_copy
from pruning_core.errors import UserError

__all__ = ["BACKENDS", "compare_latency", "cpu_channel_block", "deploy_form", "latency_runner", "measure_latency",
           "time_runner"]

BACKENDS = ("torch", "torch-cl", "onnxruntime")

log = logging.getLogger(__name__)


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
