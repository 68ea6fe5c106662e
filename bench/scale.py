"""How trace, graph, GNN, pruning, adaptive BN and latency-table costs grow with depth (random-init models, CPU).

    python bench/scale.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import write_result

from envs import PruneEnv
from graph_encoder import GraphFeaturesExtractor
from pruning_core import (
    LatencyTable,
    PruningSession,
    SessionConfig,
    adapt_bn,
    build_model,
    prune,
    trace_model,
    uniform_ratios,
)
from pruning_core.data import CIFAR_MEAN, CIFAR_STD, ImageData, Split

MODELS = ["resnet20", "resnet56", "resnet110", "mobilenetv2", "vgg16_bn"]


def median_s(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure(name: str, data: ImageData) -> dict:
    model = build_model(name).eval()
    trace_s = median_s(lambda: trace_model(model, (3, 32, 32)), 3)
    session = PruningSession(model, None, data, SessionConfig(reward_images=64, calib_batches=10, seed=0,
                                                              taylor_batches=1))
    env = PruneEnv(session=session, flops=0.5, max_nodes=max(320, len(session.trace.nodes)))
    obs, _ = env.reset(seed=0)
    ex = GraphFeaturesExtractor(env.observation_space, hidden_channels=64).eval()
    one = {k: torch.as_tensor(v).float().unsqueeze(0) for k, v in obs.items()}
    with torch.no_grad():
        gnn_s = median_s(lambda: ex(one), 10)
    batch = {k: v.repeat(256, *[1] * (v.dim() - 1)) for k, v in one.items()}
    ex.train()
    gnn_b256_s = median_s(lambda: ex(batch).sum().backward(), 3)
    ratios = uniform_ratios(session.trace, 0.5, 0.8)
    prune_s = median_s(lambda: prune(session.model, ratios, session.scores, session.trace), 5)
    pruned = prune(session.model, ratios, session.scores, session.trace)
    adapt_s = median_s(lambda: adapt_bn(pruned, session.splits.calib, 10, 64), 3)
    t = time.perf_counter()  # what --max-latency costs up front: ONNX Runtime at batch 1
    table = LatencyTable.measure(session.model, session.trace, "onnxruntime", 1)
    table_s = time.perf_counter() - t
    return {"graph_nodes": len(session.trace.nodes), "graph_edges": len(session.trace.edges),
            "groups": len(session.trace.groups), "excluded_groups": len(session.trace.excluded),
            "flops": session.flops_dense, "params": session.params_dense, "trace_s": trace_s,
            "score_s_1batch": session.timings["score_s"], "gnn_forward_ms": 1000 * gnn_s,
            "gnn_fwd_bwd_b256_ms": 1000 * gnn_b256_s, "prune_ms": 1000 * prune_s, "adapt_bn_10x64_s": adapt_s,
            "latency_table_s": table_s,
            "latency_table_timings": sum(len(e["in"]) * len(e["out"]) for e in table.layers.values())}


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (640, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (640,), generator=g)
    data = ImageData("random", Split(x, y, CIFAR_MEAN, CIFAR_STD), Split(x[:64], y[:64], CIFAR_MEAN, CIFAR_STD), 10)
    rows = {}
    for name in MODELS:
        rows[name] = measure(name, data)
        print(name, rows[name], flush=True)
    write_result("scale", {"models": rows})


if __name__ == "__main__":
    main()
