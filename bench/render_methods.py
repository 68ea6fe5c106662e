"""Render bench/methods.py results as one markdown table: test accuracy (refitted, before fine-tuning) and ONNX
Runtime speed-up at batch 1 per method, model and FLOPs target; seeded methods as mean (min-max). Where two files
hold the same method, model and target, the later one's row replaces the earlier's; train capped by
methods.py --train-evaluations N is the row train-N, --train-preset fast the row train-fast. Speed-ups re-timed alone by
methods_latency.py (NAME_latency.json) replace those timed during the run.

Example (from bench/): python render_methods.py methods_r20_amd methods_r56_amd --write ../README.md ../docs/results.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

from common import RESULTS

ORDER = ("uniform", "centre", "global", "sensitivity", "random", "train", "agent-alone")


def cell(entry: dict, retimed: dict[int, float]) -> tuple[str, str]:
    runs = entry.get("runs", [entry])
    accs = [r["acc_test"] for r in runs]
    speed = [retimed.get(i, r.get("ort_speedup_b1")) for i, r in enumerate(runs)]
    speed = [x for x in speed if x is not None]
    acc = f"{accs[0]:.2f}" if len(accs) == 1 else f"{statistics.mean(accs):.2f} ({min(accs):.2f}-{max(accs):.2f})"
    extra = ""
    if "chosen" in runs[0]:  # what train kept: its search's candidate or a floor method, with counts over seeds
        counts = Counter(r["chosen"] for r in runs)
        extra = " [" + ", ".join(f"{n}x {c}" if n > 1 else c for c, n in counts.items()) + "]"
    return acc + extra, f"{statistics.mean(speed):.2f}x" if speed else "-"


START, END = "<!-- methods:start -->", "<!-- methods:end -->"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", help="results files in bench/results/, without .json")
    p.add_argument("--write", nargs="*", default=[], metavar="FILE",
                   help="replace the table between the methods markers of these markdown files")
    args = p.parse_args()
    table = "\n".join(rows(args.names))
    print(table)
    for path in map(Path, args.write):
        body = path.read_text()
        start, end = body.index(START) + len(START), body.index(END)
        path.write_text(body[:start] + "\n" + table + "\n" + body[end:])


def rows(names: list[str]) -> list[str]:
    """The table's markdown lines, header first."""
    lines = ["| model | FLOPs | method | evaluations | test acc % | ORT speed-up b1 | commit |",
             "|---|---|---|---|---|---|---|"]
    # (model, target) -> method -> (entry, commit, re-timed speed-up per run); later files win
    blocks: dict[tuple[str, str], dict[str, tuple[dict, str, dict[int, float]]]] = {}
    for name in names:
        res = json.loads((RESULTS / f"{name}.json").read_text())
        latency = RESULTS / f"{name}_latency.json"
        timed = json.loads(latency.read_text())["models"] if latency.is_file() else {}
        capped = res["config"].get("train_evaluations")
        preset = res["config"].get("train_preset", "default")
        suffix = f"-{capped}" if capped else f"-{preset}" if preset != "default" else ""
        for model, targets in res["models"].items():
            for target, methods in targets.items():
                block = blocks.setdefault((model, target), {})
                for method, entry in methods.items():
                    retimed = {int(k.rpartition("/")[2]): v["speedup"]
                               for k, v in timed.get(model, {}).get(target, {}).items()
                               if k.rpartition("/")[0] == method}
                    label = method + suffix if method == "train" else method
                    block[label] = entry, res["commit"][:7], retimed

    def key(m: str) -> tuple:
        base, _, n = m.partition("-")
        return ORDER.index(base) if base in ORDER else len(ORDER), int(n) if n.isdigit() else 0, m

    for (model, target), methods in blocks.items():
        for method in sorted(methods, key=key):
            entry, commit, retimed = methods[method]
            evals = entry.get("runs", [entry])[0].get("evaluations", "")
            acc, speed = cell(entry, retimed)
            lines.append(f"| {model} | {target} | {method} | {evals} | {acc} | {speed} | {commit} |")
    return lines


if __name__ == "__main__":
    main()
