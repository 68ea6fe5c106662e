"""Re-time the kept models of bench/methods.py results alone: each rebuilt as the commands keep it, then ONNX Runtime
at batch 1 against dense, median of paired sweeps. Use it when the search run shared the machine.

Example (from bench/, PYTHONPATH=..): python methods_latency.py methods_r20_amd methods_r56_05_amd
"""

from __future__ import annotations

import argparse
import json

from common import RESULTS, cifar_session, write_result
from methods import commit

from pruning_core.latency import compare_latency


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    for name in args.names:
        res = json.loads((RESULTS / f"{name}.json").read_text())
        out = {"commit": commit(), "source": name, "source_commit": res["commit"], "repeats": args.repeats,
               "models": {}}
        for model, targets in res["models"].items():
            session = cifar_session(model, select_images=1000)
            out["models"][model] = {}
            for target, rows in targets.items():
                timed = out["models"][model][target] = {}
                for method, entry in rows.items():
                    for i, run in enumerate(entry.get("runs", [entry])):
                        pruned, _ = session.build_final(run["ratios"])
                        c = compare_latency(session.model, pruned, session.data.input_shape, 1, "onnxruntime",
                                            args.repeats)
                        timed[f"{method}/{i}"] = {"speedup": c["speedup"], "flops_speedup": 1 / run["flops_ratio"]}
                        print(f"{model} {target} {method} #{i}: {c['speedup']:.2f}x", flush=True)
        write_result(f"{name}_latency", out)


if __name__ == "__main__":
    main()
