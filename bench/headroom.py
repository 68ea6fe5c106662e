"""How much could any selection among a search's finalists gain? Reads bench/selection.py results and prints, per
model, budget and seed, the test accuracy of each search's kept model and of its finalist best on test: an upper
bound on what a better selection rule could keep, biased upwards by picking on test (the max of 20 noisy scores).

Compared with random search's kept model on the same seed, the bound says whether a +1.0 lead is there to be
selected at all. Test images choose nothing here; the bound is reported, never used.

Example (from bench/): python headroom.py selection_r20_05_amd selection_r56_03_amd selection_r56_03_random_amd
"""

from __future__ import annotations

import argparse
import json
import statistics

from common import RESULTS


def finalists(names: list[str]) -> dict[tuple, dict]:
    """Per (model, target, method, seed): the kept model's test accuracy and the best test accuracy of the search's
    finalists (the floor allocations excluded)."""
    out = {}
    for name in names:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        cfg = data["config"]
        for method, runs in data["methods"].items():
            label = f"train-{cfg['train_evaluations']}" if method == "train" and cfg.get("train_evaluations") \
                else method
            for run in runs:
                tests = [row["test"] for row in run["rows"] if row["source"] == "search"]
                out[cfg["model"], cfg["target"], label, run["seed"]] = {
                    "kept": run["picks"]["kept"]["test"], "best": max(tests), "finalists": len(tests),
                    "evaluations": run["evaluations"], "commit": data["commit"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", help="bench/results/NAME.json files written by selection.py")
    rows = finalists(p.parse_args().names)
    print("| model | FLOPs | search | seed | evaluations | kept: test | best finalist: test | random: kept | "
          "random: best finalist | kept - random kept | best finalist - random kept |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    gaps: dict[tuple, list[float]] = {}
    for (model, target, label, seed), r in sorted(rows.items()):
        if label == "random":
            continue
        rnd = rows.get((model, target, "random", seed))
        cells = ["", "", "", ""] if rnd is None else [
            f"{rnd['kept']:.2f}", f"{rnd['best']:.2f}", f"{r['kept'] - rnd['kept']:+.2f}",
            f"{r['best'] - rnd['kept']:+.2f}"]
        if rnd is not None:
            gaps.setdefault((model, target, label), []).append(r["best"] - rnd["kept"])
        print(f"| {model} | {target} | {label} | {seed} | {r['evaluations']} | {r['kept']:.2f} | {r['best']:.2f} "
              f"({r['finalists']}) | " + " | ".join(cells) + " |")
    for (model, target, label), g in sorted(gaps.items()):
        print(f"{model} {target} {label}: best finalist - random search's kept, mean over {len(g)} seeds "
              f"{statistics.mean(g):+.2f}")


if __name__ == "__main__":
    main()
