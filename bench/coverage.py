"""Model coverage: every torchvision classification CNN family pruned to 50% FLOPs by prunepilot and by
Torch-Pruning, on the same random-weight models at 224 px.

prunepilot: uniform ratios at 0.50 FLOPs with L1 scores, checked as ``tests/test_zoo.py`` checks them (FLOPs of the
real module against the trace's count, ONNX round trip). Torch-Pruning: its ``MetaPruner`` with L1 magnitude
importance, the classifier ignored, stepped until its own MAC count is at most half of dense, then a forward pass and
the same ONNX export. Each cell records whether it ran, the FLOPs reached, and the first line of any error.
Needs torchvision (``make .venv-zoo/.installed``).

Example (from bench/, PYTHONPATH=..):
    ../.venv-zoo/bin/python coverage.py --name coverage_amd
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from common import write_result
from methods import commit
from torch import nn

from pruning_core import build_model, kept_counts, measure_flops, prune, trace_model, uniform_ratios
from pruning_core.export import export_model
from pruning_core.importance import L1Importance

FAMILIES = ["alexnet", "vgg11_bn", "resnet18", "resnext50_32x4d", "wide_resnet50_2", "squeezenet1_0", "densenet121",
            "googlenet", "inception_v3", "shufflenet_v2_x1_0", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5",
            "efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf", "convnext_tiny"]


def first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def ours(model: nn.Module, shape) -> dict:
    trace = trace_model(model, shape)
    scores = L1Importance()(model, None, trace)
    ratios = uniform_ratios(trace, 0.5)
    pruned = prune(model, ratios, scores, trace)
    flops = measure_flops(pruned, shape)
    assert flops == trace.flops(kept_counts(trace, ratios)), "FLOPs count disagrees with the module"
    with tempfile.TemporaryDirectory() as d:
        export_model(pruned, d, shape)
    return {"flops_ratio": round(flops / measure_flops(model, shape), 4), "groups": len(trace.groups),
            "groups_left_whole": len(trace.excluded)}


def torch_pruning(model: nn.Module, shape) -> dict:
    import torch_pruning as tp

    x = torch.randn(1, *shape)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    base = tp.utils.count_ops_and_params(model, x)[0]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), iterative_steps=40,
                                  pruning_ratio=0.8, ignored_layers=head)
    ratio = 1.0
    for _ in range(40):
        pruner.step()
        ratio = tp.utils.count_ops_and_params(model, x)[0] / base
        if ratio <= 0.5:
            break
    with torch.no_grad():
        model(x)
    with tempfile.TemporaryDirectory() as d:
        export_model(model.eval(), d, shape)
    return {"flops_ratio": round(ratio, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--name", default="coverage")
    args = p.parse_args()
    shape = (3, args.size, args.size)
    rows = []
    for name in args.families.split(","):
        torch.manual_seed(0)
        dense = build_model(f"torchvision:{name}", num_classes=10).eval()
        row = {"family": name}
        for tool, run in (("prunepilot", ours), ("torch_pruning", torch_pruning)):
            t = time.perf_counter()
            try:
                row[tool] = {"ok": True, **run(copy.deepcopy(dense), shape)}
            except Exception as e:  # noqa: BLE001 - a failure is the measurement
                row[tool] = {"ok": False, "error": first_line(e)}
            row[tool]["s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(row, flush=True)
    import torchvision
    write_result(args.name, {"commit": commit(), "config": vars(args), "torchvision": torchvision.__version__,
                             "rows": rows})


if __name__ == "__main__":
    main()
