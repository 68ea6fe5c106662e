"""How much could a better selection among a search's finalists gain? Reads bench/selection.py results and prints,
per model, budget and seed, the test accuracy of each search's kept model, of its finalist best on 4,000 unseen images
(a near-ideal selection from images the search never had), and of its finalist best on test (an upper bound, biased
upwards by picking on test: the best of 20-24 noisy scores), for ``train`` and random search on the same seed.

If even the picks on unseen images do not put ``train`` 1.0 ahead of random search, no selection rule will. Test images
choose nothing the commands keep; the bound is reported, never used.

Example (from bench/): python headroom.py selection_r20_05_amd selection_r56_03_amd selection_r56_03_random_amd
"""

from __future__ import annotations

import argparse
import json
import statistics

from common import RESULTS


def finalists(names: list[str]) -> dict[tuple, dict]:
    """Per (model, target, search, seed), the test accuracy of: the kept model, the finalist best on the unseen
    images (``selection.rules``' oracle: a selection with 4,000 more images than the search had), and the finalist
    best on test; the floor allocations ``train`` re-scored count as finalists too, as in ``selection.rules``."""
    out = {}
    for name in names:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        cfg = data["config"]
        for method, runs in data["methods"].items():
            label = f"train-{cfg['train_evaluations']}" if method == "train" and cfg.get("train_evaluations") \
                else method
            for run in runs:
                tests = [row["test"] for row in run["rows"]]
                out[cfg["model"], cfg["target"], label, run["seed"]] = {
                    "kept": run["picks"]["kept"]["test"], "unseen": run["picks"]["oracle"]["test"], "best": max(tests),
                    "finalists": len(tests), "evaluations": run["evaluations"], "commit": data["commit"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", help="bench/results/NAME.json files written by selection.py")
    rows = finalists(p.parse_args().names)
    picks = ("kept", "unseen", "best")
    print("| model | FLOPs | search | seed | evaluations | test: kept / best on unseen / best on test "
          "| random: the same | search - random: kept / best on unseen / best on test |")
    print("|---|---|---|---|---|---|---|---|")
    gaps: dict[tuple, list[list[float]]] = {}
    for (model, target, label, seed), r in sorted(rows.items()):
        if label == "random" or (rnd := rows.get((model, target, "random", seed))) is None:
            continue
        diff = [r[k] - rnd[k] for k in picks]
        gaps.setdefault((model, target, label), []).append(diff)
        print(f"| {model} | {target} | {label} | {seed} | {r['evaluations']} | "
              + " | ".join(" / ".join(f"{x[k]:.2f}" for k in picks) for x in (r, rnd)) + " | "
              + " / ".join(f"{d:+.2f}" for d in diff) + " |")
    for (model, target, label), g in sorted(gaps.items()):
        means = " / ".join(f"{statistics.mean(d[i] for d in g):+.2f}" for i in range(len(picks)))
        print(f"{model} {target} {label} - random, mean over {len(g)} seeds (kept / best on unseen / best on test): "
              f"{means}")


if __name__ == "__main__":
    main()
