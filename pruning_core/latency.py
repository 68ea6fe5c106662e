"""CPU latency: median of repeated timed runs, in PyTorch eager mode or in ONNX Runtime (the usual CPU deployment)."""

from __future__ import annotations

import io
import statistics
import time
import warnings

import torch
import torch.utils.benchmark as benchmark
from torch import nn

from pruning_core.errors import UserError

__all__ = ["BACKENDS", "measure_latency"]

BACKENDS = ("torch", "onnxruntime")


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1,
                    min_run_time: float = 1.0, threads: int | None = None, backend: str = "torch") -> float:
    """Median seconds per forward pass at ``batch_size`` (eval mode, no grad), after a warm-up.

    :param backend: ``torch`` times the module itself (``torch.utils.benchmark``, blocked autorange);
        ``onnxruntime`` exports it to ONNX in memory and times an ORT CPU session with all graph
        optimisations (Conv+BN+ReLU fusion among them) and ``threads`` intra-op threads.
    """
    model.eval()
    threads = threads or torch.get_num_threads()
    x = torch.randn(batch_size, *input_shape)
    if backend == "torch":
        for _ in range(3):
            model(x)
        timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)
        return float(timer.blocked_autorange(min_run_time=min_run_time).median)
    if backend != "onnxruntime":
        raise UserError(f"unknown latency backend {backend!r}; use one of {', '.join(BACKENDS)}")
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise UserError("the onnxruntime latency backend needs onnxruntime: pip install 'prunepilot[export]'") from e
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, input_names=["input"], output_names=["logits"], dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    for _ in range(3):
        sess.run(None, feed)
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < min_run_time or len(times) < 5:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times)
