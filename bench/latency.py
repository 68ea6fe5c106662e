"""CPU latency of the pruned models of the search benchmarks, measured alone (nothing else running).

Rebuilds each method's architecture from the ratios in bench/results/search_*.json (latency depends on the
channel counts, not on the weights; a run with ``--round-to`` keeps its rounding) and times it at batch 1 and 64
in three runtimes: PyTorch eager mode as is; PyTorch eager in its deployment form (Conv+BN folded, channels-last,
``pruning_core.latency.deploy_form``); and ONNX Runtime (exported in memory, Conv+BN+ReLU fused by ORT).

The speed-ups are paired: in every sweep, the dense model is timed right before each pruned model, and the
speed-up is the median over ``--repeats`` sweeps of dense / pruned. On a shared VM whose speed drifts by tens of
percent over minutes, the pairing cancels the drift that a ratio of two far-apart medians keeps.

    python bench/latency.py --repeats 5
    python bench/latency.py --repeats 5 --results search_latency --all-seeds --name latency_budget  # one run only
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import RESULTS, labelled_runs, write_result

from pruning_core import build_model, kept_counts, prune, trace_model
from pruning_core.latency import cpu_channel_block, latency_runner, time_runner

BACKENDS = (("torch", ""), ("torch-cl", "cl_"), ("onnxruntime", "ort_"))


def aligned(kept: dict[str, int], trace, block: int) -> dict[str, int]:
    """Kept channels padded up to whole ``block``s: the widths a CPU conv kernel that packs channels in blocks
    (oneDNN and MLAS: 8 with AVX2, 16 with AVX-512) computes on, whatever the model's own widths."""
    return {g.name: min(g.channels, -(-kept[g.name] // block) * block) for g in trace.groups}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="sweeps; each times every (dense, pruned) pair once")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per model per measurement")
    p.add_argument("--results", nargs="+", metavar="NAME",
                   help="time only the models of these results files (e.g. search_latency; default: every search_*)")
    p.add_argument("--name", default="latency", help="results file to write (default: latency)")
    p.add_argument("--all-seeds", action="store_true", help="time every seed's model, not only the first seed's")
    args = p.parse_args()
    dense = build_model("resnet56").eval()
    shape = (3, 32, 32)
    trace = trace_model(dense, shape)
    scores = {g.name: torch.arange(g.channels, 0, -1).float() for g in trace.groups}  # any ranking will do

    block = cpu_channel_block()
    models = {}
    paths = [RESULTS / f"{n}.json" for n in args.results] if args.results else sorted(RESULTS.glob("search_*.json"))
    # uniform, in every results file, is one architecture timed once; another allocation under the same label
    # (e.g. under another latency table) gets a row of its own
    for label, r, _ in labelled_runs(paths, args.all_seeds):
        rt = r.get("round_to")
        kept = kept_counts(trace, r["ratios"], rt)
        models[label] = (prune(dense, r["ratios"], scores, trace, round_to=rt),
                         trace.flops(kept) / trace.flops(), trace.flops(aligned(kept, trace, block)) / trace.flops())
    times: dict[str, dict[str, list[float]]] = {name: {} for name in ["dense", *models]}
    speedups: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    # one backend at a time (their thread pools never overlap); each model is exported once per backend and
    # batch size, then every sweep times every (dense, pruned) pair once
    for backend, prefix in BACKENDS:
        runners = {name: {b: latency_runner(m, shape, b, backend=backend) for b in (1, 64)}
                   for name, m in [("dense", dense), *((n, m) for n, (m, *_) in models.items())]}
        for sweep in range(args.repeats):
            for name in models:
                for b in (1, 64):
                    key = f"{prefix}b{b}_ms"
                    base = 1000 * time_runner(runners["dense"][b], args.min_run_time)
                    mine = 1000 * time_runner(runners[name][b], args.min_run_time)
                    times["dense"].setdefault(key, []).append(base)
                    times[name].setdefault(key, []).append(mine)
                    speedups[name].setdefault(key.replace("_ms", "").replace("b", "speedup_b", 1), []).append(
                        base / mine)
            print(f"{backend}: sweep {sweep + 1}/{args.repeats} done", flush=True)
    rows = {"dense": {**{k: statistics.median(v) for k, v in times["dense"].items()}, "flops_ratio": 1.0,
                      "flops_speedup": 1.0, "aligned_flops_speedup": 1.0}}
    for name, (_, flops, flops8) in models.items():
        rows[name] = {**{k: statistics.median(v) for k, v in times[name].items()}, "flops_ratio": flops,
                      "flops_speedup": 1 / flops, "aligned_flops_speedup": 1 / flops8,
                      **{k: statistics.median(v) for k, v in speedups[name].items()},
                      "repeats_speedup": speedups[name]}  # every sweep's paired speed-up, to show the spread
        print(name, {k: round(v, 3) for k, v in rows[name].items() if k != "repeats_speedup"}, flush=True)
    write_result(args.name, {"repeats": args.repeats, "paired": True, "min_run_time": args.min_run_time,
                             "block": block, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                             "models": rows})


if __name__ == "__main__":
    main()
