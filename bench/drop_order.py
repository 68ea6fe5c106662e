"""The check behind ordering drop steps by measured cost (``SessionConfig.drop_criterion``, default ``loss``).

A drop step removes a share of one run's residual branches, cheapest first. This script takes the allocations
that a search with drop steps kept (bench/results) and, for each criterion, keeps how many branches each run
drops but re-chooses which: the cheapest by that criterion. Each re-chosen model is built with adaptive BN and
scored on the reward split and on the select split (1,000 further training images that no search optimises),
never on the test images. ``drop_order_xeon.json`` took the searches made with the summed-Taylor order:

    python bench/drop_order.py --results search_substage_r16_drop_removed --name drop_order_xeon
"""

from __future__ import annotations

import argparse
import json
import time

from common import RESULTS, cifar_session, labelled_runs, write_result

from envs import PruneEnv
from pruning_core import DROP_CRITERIA, PruningSession, accuracy


def rechoose(env: PruneEnv, kept: dict[str, int], costs: dict[str, float]) -> dict[str, int]:
    """``kept`` with each drop step's dropped branches re-chosen as the same number of cheapest by ``costs``; the
    kept branches of a run get the run's width."""
    out = dict(kept)
    for t, decision in enumerate(env.decisions):
        if not env.drop_steps[t]:
            continue
        names = [env.groups[i].name for i in decision]
        k = sum(kept[n] == 0 for n in names)
        width = max(kept[n] for n in names)
        for j, name in enumerate(sorted(names, key=lambda n: (costs[n], n))):
            out[name] = 0 if j < k else width
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="search_substage_r16_drop_removed",
                   help="search results (in bench/results) whose kept allocations drop branches")
    p.add_argument("--name", default="drop_order")
    args = p.parse_args()
    path = RESULTS / f"{args.results}.json"
    res = json.loads(path.read_text())
    cfg, rl = res["config"], res["rl_config"]
    if not rl.get("drop_blocks") or rl.get("granularity", "group") == "group":
        raise SystemExit(f"{args.results} has no drop steps (it needs --drop-blocks with substage or stage)")
    sessions: dict[str, PruningSession] = {}
    costs: dict[str, dict[str, float]] = {}
    for criterion in DROP_CRITERIA:
        t = time.perf_counter()
        sessions[criterion] = cifar_session(cfg["model"], reward_images=cfg["reward_images"],
                                            calib_batches=cfg["calib_batches"], drop_criterion=criterion)
        costs[criterion] = sessions[criterion].drop_costs()
        print(f"{criterion} costs: {time.perf_counter() - t:.0f}s", flush=True)
    session = sessions["loss"]
    select = session.split("select")
    rows = []
    for label, run, _ in labelled_runs([path]):
        ratios = run["ratios"]
        if not any(r == 1.0 for r in ratios.values()):
            continue
        target = float(label.split()[0])
        env = PruneEnv(session=session, flops=target, max_ratio=rl["max_ratio"], round_to=cfg["round_to"],
                       granularity=rl["granularity"], drop=True)
        kept = {g.name: round((1 - ratios.get(g.name, 0.0)) * g.channels) for g in env.groups}
        row = {"label": label, "blocks_dropped": sum(k == 0 for k in kept.values())}
        for criterion in ("searched", *DROP_CRITERIA):
            alloc = kept if criterion == "searched" else rechoose(env, kept, costs[criterion])
            if env.trace.flops(alloc) != env.trace.flops(kept):  # a run's branches are alike: a swap costs the same
                raise SystemExit(f"{label}: re-choosing by {criterion} changed the FLOPs")
            model = session.build({g.name: 1.0 - alloc[g.name] / g.channels for g in env.groups}, cfg["round_to"])
            row[criterion] = {"acc_reward": accuracy(model, session.splits.reward),
                              "acc_select": accuracy(model, select), "same_as_searched": alloc == kept}
        rows.append(row)
        print(label, "  ".join(f"{c}: select {row[c]['acc_select']:.1f} reward {row[c]['acc_reward']:.1f}"
                               for c in ("searched", *DROP_CRITERIA)), flush=True)
    write_result(args.name, {"results": args.results, "costs": costs, "rows": rows,
                             "drop_costs_s": session.timings.get("drop_costs_s")})


if __name__ == "__main__":
    main()
