"""Where ONNX Runtime spends its time, op by op: dense ResNet-56 against 50% uniform pruning (widths in multiples
of 8), at batch 64, with ORT's own profiler. It shows why the latency speed-up trails the FLOPs speed-up: which
ops are outside the convs, and how each conv's time scales with the channels it loses.

    python bench/op_profile.py
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import tempfile
import warnings
from pathlib import Path

import torch
from common import write_result

from pruning_core import build_model, kept_counts, prune, trace_model, uniform_ratios


def profile(model: torch.nn.Module, batch: int, runs: int, threads: int) -> dict:
    """Per op type and per node: mean microseconds per run over ``runs`` profiled runs (after 5 warm-up runs)."""
    import onnxruntime as ort

    x = torch.randn(batch, 3, 32, 32)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, input_names=["input"], output_names=["logits"], dynamo=False)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        feed = {"input": x.numpy()}
        for _ in range(5):
            sess.run(None, feed)
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "ort")
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):  # the first profiled run is a warm-up too
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op, by_node = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / (runs + 1)
            if e["args"]["op_name"] == "Conv":
                by_node[e["name"][:-len("_kernel_time")]] += e["dur"] / (runs + 1)
    return {"op_us": dict(by_op.most_common()), "conv_us": dict(by_node)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--target", type=float, default=0.5)
    args = p.parse_args()
    dense = build_model("resnet56").eval()
    trace = trace_model(dense, (3, 32, 32))
    scores = {g.name: torch.arange(g.channels, 0, -1).float() for g in trace.groups}  # latency ignores weights
    ratios = uniform_ratios(trace, args.target, round_to=8)
    kept = kept_counts(trace, ratios, 8)
    pruned = prune(dense, ratios, scores, trace, round_to=8)
    threads = torch.get_num_threads()
    res = {"batch": args.batch, "runs": args.runs, "threads": threads, "kept": kept,
           "flops_ratio": trace.flops(kept) / trace.flops(),
           "dense": profile(dense, args.batch, args.runs, threads),
           "pruned": profile(pruned, args.batch, args.runs, threads)}
    for name in ("dense", "pruned"):
        ops = res[name]["op_us"]
        total = sum(ops.values())
        print(f"{name}: {total / 1000:.1f} ms of kernels; " + ", ".join(
            f"{k} {v / 1000:.2f} ms ({v / total:.0%})" for k, v in ops.items()), flush=True)
    d, q = res["dense"]["conv_us"], res["pruned"]["conv_us"]
    res["conv_speedup"] = {k: d[k] / q[k] for k in d if q.get(k)}
    for k, v in res["conv_speedup"].items():
        print(f"  {k:55s} {d[k] / 1000:6.2f} -> {q[k] / 1000:6.2f} ms  {v:.2f}x")
    write_result("op_profile", res)


if __name__ == "__main__":
    main()
