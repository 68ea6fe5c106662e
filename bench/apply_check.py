"""Is zero-shot ``apply`` never worse than uniform on every model and budget? Reads ``bench/transfer_cli.py`` results
(the policy's zero-shot ``apply`` reports, ``zero_shot`` and ``zero_shot_to``) and a ``bench/methods.py`` results file
with uniform per seed, and prints, per model, budget and seed, what ``apply`` kept, which allocation it chose, its
lead over uniform on the reward and select images, and its test accuracy against uniform's on the same seed's images.

Example (from bench/): python apply_check.py transfer_apply_s0_amd transfer_apply_s1_amd \
    --uniform methods_uniform_seeds_amd
"""

from __future__ import annotations

import argparse
import json
import statistics

from common import RESULTS
from render_methods import merged


def applied(names: list[str]) -> dict[tuple[str, float, int], dict]:
    """Per (model, FLOPs target, seed): the zero-shot ``apply`` report of each transfer_cli.py results file."""
    out = {}
    for name in names:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        cfg = data["config"]
        reports = {f"resnet56@{cfg['flops']}": data["zero_shot"], **data.get("zero_shot_to", {})}
        for key, report in reports.items():
            model, _, flops = key.partition("@")
            out[model, float(flops), cfg["seed"]] = {**report, "commit": data["commit"]}
    return out


def uniform(name: str) -> dict[tuple[str, float, int], float]:
    """Per (model, FLOPs target, seed): uniform's test accuracy in a methods.py results file."""
    return {(model, float(target), run["seed"]): run["acc_test"]
            for (model, target), methods in merged([name]).items() if "uniform" in methods
            for run in methods["uniform"][0].get("runs", [])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", help="bench/results/NAME.json files written by transfer_cli.py")
    p.add_argument("--uniform", required=True, help="bench/results/NAME.json written by methods.py with uniform "
                                                    "on the same seeds")
    args = p.parse_args()
    reports, base = applied(args.names), uniform(args.uniform)
    print("| model | FLOPs | seed | chosen | lead over uniform (reward + select) | apply test % | uniform test % "
          "| apply - uniform |")
    print("|---|---|---|---|---|---|---|---|")
    gaps: dict[tuple[str, float], list[float]] = {}
    for (model, flops, seed), r in sorted(reports.items()):
        if (model, flops, seed) not in base:
            continue
        t, gap = r["transfer"], r["acc"] - base[model, flops, seed]
        gaps.setdefault((model, flops), []).append(gap)
        lead = t.get("vs_uniform")  # None: uniform scored best (or the file predates the test)
        lead = f"{lead['lead']:+.2f} ± {lead['se']:.2f}" if lead else "uniform scored best"
        print(f"| {model} | {flops} | {seed} | {t['chosen']} | {lead} | "
              f"{r['acc']:.2f} | {base[model, flops, seed]:.2f} | {gap:+.2f} |")
    for (model, flops), g in sorted(gaps.items()):
        print(f"{model} at {flops}: apply - uniform over {len(g)} seeds: mean {statistics.mean(g):+.2f}, "
              f"worst {min(g):+.2f}")


if __name__ == "__main__":
    main()
