"""Does spreading a stage's pruning unevenly over its blocks help? (issue 5: a finer action space than per stage)

Takes the kept allocations of the substage PPO runs with ``--clone-warmup`` (``search_substage_warmup*``, 6 seeds)
and uniform, keeps each stage's total, and redistributes it over the stage's non-strided blocks: by Taylor global
ranking within the stage, or as a linear slope of +-0.1 / +-0.2 in ratio from the first block to the last. Every
variant is built with adaptive BN and scored on the reward and select splits (training images only; the test
images are not touched).

    python bench/within_stage.py
"""

from __future__ import annotations

import json
import re
import statistics

from common import RESULTS, cifar_session, write_result

from pruning_core import accuracy


def stages(ratios: dict[str, float]) -> dict[str, list[str]]:
    """The non-strided blocks' groups of each ResNet-56 stage (``layerS.B.conv1``; a strided first block is a
    substage step of its own and is left as searched)."""
    out: dict[str, list[str]] = {}
    for name in ratios:
        m = re.fullmatch(r"layer(\d)\.(\d)\.conv1", name)
        if m and not (m.group(1) != "1" and m.group(2) == "0"):
            out.setdefault(m.group(1), []).append(name)
    return out


def main() -> None:
    session = cifar_session("resnet56")
    channels = {g.name: g.channels for g in session.trace.groups}
    runs = []
    for f in ("search_substage_warmup", "search_substage_warmup_s345"):
        target = json.loads((RESULTS / f"{f}.json").read_text())["targets"]["0.5"]
        runs += [(f"ppo seed {r['seed']}", r["ratios"]) for r in target["rl-ppo"]["runs"]]
        if not any(name == "uniform" for name, _ in runs):
            runs.append(("uniform", target["uniform"]["ratios"]))

    def score(ratios: dict[str, float]) -> dict:
        model = session.build(ratios)
        return {"reward": accuracy(model, session.split("reward")), "select": accuracy(model, session.split("select")),
                "flops_ratio": session.measure(ratios)["flops_ratio"]}

    def taylor_within(ratios: dict[str, float], cap: float = 0.9) -> dict[str, float]:
        out = dict(ratios)
        for names in stages(ratios).values():
            c = channels[names[0]]
            budget = sum(round(ratios[n] * c) for n in names)
            removed = dict.fromkeys(names, 0)
            for _, owner in sorted((float(v), n) for n in names for v in session.scores[n]):
                if sum(removed.values()) >= budget:
                    break
                if removed[owner] < int(cap * c):
                    removed[owner] += 1
            out.update({n: removed[n] / c for n in names})
        return out

    def slope(ratios: dict[str, float], s: float) -> dict[str, float]:
        out = dict(ratios)
        for names in stages(ratios).values():
            mid = (len(names) - 1) / 2
            out.update({n: min(0.9, max(0.0, ratios[n] + s * (i - mid) / mid)) for i, n in enumerate(names)})
        return out

    variants = {"taylor-within": taylor_within, **{f"slope{s:+.1f}": (lambda r, s=s: slope(r, s))
                                                   for s in (-0.2, -0.1, 0.1, 0.2)}}
    rows = []
    for name, ratios in runs:
        row = {"run": name, "searched": score(ratios), **{v: score(f(ratios)) for v, f in variants.items()}}
        print(row, flush=True)
        rows.append(row)
    summary = {v: {split: statistics.mean(r[v][split] - r["searched"][split] for r in rows)
                   for split in ("reward", "select")} for v in variants}
    write_result("within_stage", {"config": {"model": "resnet56", "target": 0.5, "runs": [n for n, _ in runs]},
                                  "summary_mean_change": summary, "rows": rows})


if __name__ == "__main__":
    main()
