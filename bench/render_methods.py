"""Render bench/methods.py results as one markdown table: test accuracy (refitted, before fine-tuning) and ONNX Runtime
speed-up at batch 1 per method, model and FLOPs target; seeded methods as mean (min-max). Where two files hold the same
method, model and target, the later one's row replaces the earlier's, unless both hold runs of different seeds, which
are pooled; train capped by methods.py --train-evaluations N is the row train-N, --train-preset fast the row train-fast,
and --train-sensitivity-points 5 adds the suffix -5pt. Speed-ups re-timed alone by methods_latency.py
(NAME_latency.json) replace those timed during the run. With ``--unseen NAME [NAME ...]``, a column holds the same kept
models' accuracy on the ~9,000 unseen JPEG images that unseen_check.py measured (``-`` where its seeds are not the
row's; a later check's model and target replace an earlier one's).

With ``--plot DIR`` it also draws, per model, test accuracy against the measured speed-up of every run, with the
Pareto front over all of them, into ``DIR/pareto_MODEL.png``.

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


def speedups(entry: dict, retimed: dict[int, float]) -> list[float | None]:
    """Each run's ORT speed-up: re-timed alone where it was, else as timed in the run (None where not timed)."""
    return [retimed.get(i, r.get("ort_speedup_b1")) for i, r in enumerate(entry.get("runs", [entry]))]


def cell(entry: dict, retimed: dict[int, float]) -> tuple[str, str]:
    runs = entry.get("runs", [entry])
    accs = [r["acc_test"] for r in runs]
    speed = [x for x in speedups(entry, retimed) if x is not None]
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
    p.add_argument("--plot", metavar="DIR", help="also draw DIR/pareto_MODEL.png per model")
    p.add_argument("--unseen", nargs="+", metavar="NAME",
                   help="unseen_check.py's results files: add their accuracy column (later files win per block)")
    args = p.parse_args()
    if args.plot:
        plot(merged(args.names), Path(args.plot))
    unseen = unseen_checks(args.unseen) if args.unseen else None
    table = "\n".join(rows(args.names, unseen))
    print(table)
    for path in map(Path, args.write):
        body = path.read_text()
        start, end = body.index(START) + len(START), body.index(END)
        path.write_text(body[:start] + "\n" + table + "\n" + body[end:])


Blocks = dict[tuple[str, str], dict[str, tuple[dict, str, dict[int, float]]]]


def merged(names: list[str]) -> Blocks:
    """(model, target) -> method label -> (entry, commit, re-timed speed-up per run), later files winning, or pooled
    with an earlier file's runs where their seeds differ; blocks ordered by model, then FLOPs target."""
    blocks: Blocks = {}
    for name in names:
        res = json.loads((RESULTS / f"{name}.json").read_text())
        latency = RESULTS / f"{name}_latency.json"
        timed = json.loads(latency.read_text())["models"] if latency.is_file() else {}
        capped = res["config"].get("train_evaluations")
        preset = res["config"].get("train_preset", "default")
        granularity = res["config"].get("train_granularity", "substage")
        points = res["config"].get("train_sensitivity_points", 10)
        suffix = (f"-{capped}" if capped else f"-{preset}" if preset != "default" else "") + \
            (f"-{granularity}" if granularity != "substage" else "") + (f"-{points}pt" if points != 10 else "") + \
            ("-prior" if res["config"].get("train_table_prior") else "")
        for model, targets in res["models"].items():
            for target, methods in targets.items():
                block = blocks.setdefault((model, target), {})
                for method, entry in methods.items():
                    retimed = {int(k.rpartition("/")[2]): v["speedup"]
                               for k, v in timed.get(model, {}).get(target, {}).items()
                               if k.rpartition("/")[0] == method}
                    label = method + suffix if method == "train" else method
                    block[label] = pooled(block.get(label), (entry, res["commit"][:7], retimed))
    return dict(sorted(blocks.items(), key=lambda b: (b[0][0], float(b[0][1]))))


def pooled(earlier: tuple | None, later: tuple) -> tuple:
    """``later`` with ``earlier``'s runs before its own where both are seeded runs of different seeds; else
    ``later``. Distinct commits join with ``+``; re-timed speed-ups keep their runs."""
    if earlier is None or "runs" not in earlier[0] or "runs" not in later[0]:
        return later
    (old, old_commit, old_timed), (new, new_commit, new_timed) = earlier, later
    if {r.get("seed") for r in old["runs"]} & {r.get("seed") for r in new["runs"]}:
        return later
    offset = len(old["runs"])
    commits = "+".join(dict.fromkeys([*old_commit.split("+"), new_commit]))
    return ({"runs": old["runs"] + new["runs"]}, commits,
            {**old_timed, **{i + offset: v for i, v in new_timed.items()}})


def unseen_checks(names: list[str]) -> dict:
    """unseen_check.py's models of these results files, merged: a later file's method of a (model, target) block
    replaces an earlier one's."""
    out: dict[str, dict] = {}
    for name in names:
        for model, targets in json.loads((RESULTS / f"{name}.json").read_text())["models"].items():
            for target, methods in targets.items():
                out.setdefault(model, {}).setdefault(target, {}).update(methods)
    return out


def unseen_cell(entry: dict, checked: dict | None) -> str:
    """Mean accuracy on the unseen images of ``checked`` (unseen_check.py's entry for the row), ``-`` unless it
    measured the row's seeds."""
    runs = entry.get("runs", [entry])
    if checked is None or sorted(r.get("seed", 0) for r in runs) != sorted(r["seed"] for r in checked["runs"]):
        return "-"
    return f"{checked['acc_unseen']:.2f}"


def evaluations_cell(entry: dict) -> str:
    """The row's evaluations: one count, or the range over its seeds where they differ."""
    counts = [r["evaluations"] for r in entry.get("runs", [entry]) if r.get("evaluations") is not None]
    if not counts:
        return ""
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}-{high}"


def rows(names: list[str], unseen: dict | None = None) -> list[str]:
    """The table's markdown lines, header first; with ``unseen`` (unseen_check.py's models), its accuracy column."""
    extra = (" unseen acc % |", "---|") if unseen is not None else ("", "")
    lines = [f"| model | FLOPs | method | evaluations | test acc % |{extra[0]} ORT speed-up b1 | commit |",
             f"|---|---|---|---|---|{extra[1]}---|---|"]
    blocks = merged(names)

    def key(m: str) -> tuple:
        base, _, n = m.partition("-")
        return ORDER.index(base) if base in ORDER else len(ORDER), int(n) if n.isdigit() else 0, m

    for (model, target), methods in blocks.items():
        for method in sorted(methods, key=key):
            entry, commit, retimed = methods[method]
            evals = evaluations_cell(entry)
            acc, speed = cell(entry, retimed)
            if unseen is not None:
                acc += " | " + unseen_cell(entry, unseen.get(model, {}).get(target, {}).get(method))
            lines.append(f"| {model} | {target} | {method} | {evals} | {acc} | {speed} | {commit} |")
    return lines


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speed-up, accuracy) points that no other point beats on both, fastest first."""
    front: list[tuple[float, float]] = []
    for speed, acc in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((speed, acc))
    return front


def plot(blocks: Blocks, folder: Path) -> None:
    """One figure per model, one panel per FLOPs target: every run's test accuracy against its measured speed-up,
    coloured by method, with the Pareto front over all runs of the panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for model in sorted({m for m, _ in blocks}):
        targets = [t for m, t in blocks if m == model]  # merged() orders them
        colour = {m: plt.cm.tab10(i % 10) for i, m in enumerate(sorted({m for t in targets for m in blocks[model, t]}))}
        fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.5), squeeze=False)
        for ax, target in zip(axes[0], targets):
            points = []
            for method, (entry, _, retimed) in sorted(blocks[model, target].items()):
                runs = [(s, r["acc_test"]) for s, r in zip(speedups(entry, retimed), entry.get("runs", [entry]))
                        if s is not None]
                if runs:
                    ax.scatter(*zip(*runs), label=method, color=colour[method], alpha=0.8, s=30)
                    points += runs
            front = pareto(points)
            ax.plot(*zip(*front), color="black", lw=1, ls="--", marker="o", ms=10, mfc="none", label="Pareto front")
            ax.set(title=f"{model} at {target} FLOPs", xlabel="ONNX Runtime speed-up, batch 1",
                   ylabel="test accuracy % (refitted, before fine-tuning)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"pareto_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
