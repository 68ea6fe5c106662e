"""CPU latency: median of repeated timed runs with ``torch.utils.benchmark``."""

from __future__ import annotations

import torch
import torch.utils.benchmark as benchmark
from torch import nn

__all__ = ["measure_latency"]


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1,
                    min_run_time: float = 1.0, threads: int | None = None) -> float:
    """Median seconds per forward pass at ``batch_size`` (eval mode, no grad), after a warm-up."""
    model.eval()
    x = torch.randn(batch_size, *input_shape)
    for _ in range(3):
        model(x)
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x},
                            num_threads=threads or torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)
