"""CPU latency of the pruned models of the search benchmarks, measured alone (nothing else running).

Rebuilds each method's architecture from the ratios in bench/results/search_*.json (latency depends on the
channel counts, not on the weights) and takes the median of ``--repeats`` latency medians, at batch 1 and 64,
in PyTorch eager mode and in ONNX Runtime (exported in memory, Conv+BN+ReLU fused by ORT). Adds uniform with
kept channels rounded to multiples of 8, the usual fix for odd widths.

    python bench/latency.py
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from common import RESULTS, latency_ms, write_result

from pruning_core import UserError, build_model, kept_counts, prune, trace_model, uniform_ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    dense = build_model("resnet56").eval()
    shape = (3, 32, 32)
    trace = trace_model(dense, shape)
    scores = {g.name: torch.arange(g.channels, 0, -1).float() for g in trace.groups}  # any ranking will do

    models = {"dense": (dense, 1.0)}
    for path in sorted(RESULTS.glob("search_*.json")):
        res = json.loads(path.read_text())
        for target, methods in res["targets"].items():
            candidates = {m: r for m, r in methods.items() if "ratios" in r}
            for m, r in methods.items():
                if "runs" in r:
                    candidates[f"{m} seed {r['runs'][0]['seed']}"] = r["runs"][0]
            try:
                candidates["uniform round_to=8"] = {"ratios": uniform_ratios(trace, float(target), 0.8, round_to=8),
                                                    "round_to": 8}
            except UserError as e:  # 16-channel groups rounded to 8 cannot reach low targets
                print(f"skip uniform round_to=8 at {target}: {e}")
            for name, r in candidates.items():
                rt = r.get("round_to")
                models[f"{target} {name}"] = (prune(dense, r["ratios"], scores, trace, round_to=rt),
                                              trace.flops(kept_counts(trace, r["ratios"], rt)) / trace.flops())
    # one backend at a time (their thread pools never overlap), and each repeat sweeps every model, so a burst
    # of noise from the machine spreads over all models instead of landing on one
    times: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for backend, prefix in (("torch", ""), ("onnxruntime", "ort_")):
        for _ in range(args.repeats):
            for name, (model, _) in models.items():
                for b in (1, 64):
                    times[name].setdefault(f"{prefix}b{b}_ms", []).append(latency_ms(model, shape, b, backend))
        print(f"{backend} done", flush=True)
    base = {k: statistics.median(v) for k, v in times["dense"].items()}
    rows = {}
    for name, (_, flops) in models.items():
        t = {k: statistics.median(v) for k, v in times[name].items()}
        rows[name] = {**t, "flops_ratio": flops, "flops_speedup": 1 / flops,
                      **{k.replace("_ms", "").replace("b", "speedup_b", 1): base[k] / v for k, v in t.items()},
                      "repeats_ms": times[name]}  # every sweep's median, to show the spread
        print(name, {k: round(v, 3) for k, v in rows[name].items() if k != "repeats_ms"}, flush=True)
    write_result("latency", {"repeats": args.repeats, "models": rows})


if __name__ == "__main__":
    main()
