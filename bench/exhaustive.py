"""Every allocation of a compact action space, evaluated: the ceiling that any search in that space can reach.

With ``--round-to 8`` at substage granularity, ResNet-56's five decisions have 2, 4, 4, 7 and 7 distinct widths:
1,568 allocations, of which a few hundred fit a 50% FLOPs budget. A search of 120 evaluations covers a large part
of such a space. This script takes the setting of one search benchmark result (target, rounding, granularity,
reward split, and the latency table it budgeted with), evaluates every allocation that fits its budgets on the
same reward split, keeps the best after the same re-scoring on the select split (exhaustive search as a method),
and ranks the allocation each method of that result kept among all of them by reward-split accuracy.

    python bench/exhaustive.py --results search_latency --name exhaustive_latency
"""

from __future__ import annotations

import argparse
import json
import time

from common import RESULTS, cifar_session, write_result
from tqdm.auto import tqdm

from agent.search import keep_best
from envs import PruneEnv
from pruning_core import LatencyBudget, LatencyTable, accuracy, kept_counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, metavar="NAME",
                   help="search results file whose setting to enumerate and whose methods to rank, e.g. search_latency")
    p.add_argument("--target", type=float, default=None, help="FLOPs target (default: the result's first)")
    p.add_argument("--limit", type=int, default=2000, help="refuse spaces of more allocations than this")
    p.add_argument("--name", default="exhaustive", help="results file to write (default: exhaustive)")
    args = p.parse_args()
    res = json.loads((RESULTS / f"{args.results}.json").read_text())
    cfg = res["config"]
    target = args.target if args.target is not None else cfg["targets"][0]
    session = cifar_session(cfg["model"], reward_images=cfg["reward_images"], calib_batches=cfg["calib_batches"])
    budget = None
    if "latency_budget" in res:  # the very table the search budgeted with, so that the feasible set is the same
        budget = LatencyBudget(LatencyTable.from_dict(res["latency_budget"]["table"]),
                               res["latency_budget"]["max_latency"])
    env = PruneEnv(session=session, flops=target, max_ratio=cfg["max_ratio"], round_to=cfg.get("round_to"),
                   granularity=res["rl_config"]["granularity"], latency_budget=budget)
    feasible = env.feasible_allocations(args.limit)
    size = 1
    for grid in env.ratio_grid:
        size *= len(grid)
    print(f"{size} allocations, {len(feasible)} within the budgets", flush=True)
    started = time.perf_counter()
    best = None
    for kept in tqdm(feasible, desc="evaluating", unit="model", disable=None):
        reward, info = env.evaluate(kept)
        if best is None or reward > best["reward"]:
            best = {"reward": reward, "ratios": info["ratios"]}
    search_s = time.perf_counter() - started
    kept, rescored = keep_best(env, best, cfg.get("rescore_top", 5))
    ranking = sorted(env.cache.items(), key=lambda item: item[1][0], reverse=True)
    rank_of = {key: i + 1 for i, (key, _) in enumerate(ranking)}

    def key(ratios: dict[str, float]) -> tuple[int, ...]:
        kept = kept_counts(session.trace, ratios, cfg.get("round_to"))
        return tuple(kept[g.name] for g in env.groups)

    ranking = [info for _, (_, info) in ranking]
    model = session.build(kept["ratios"], cfg.get("round_to"))
    out = {"results": args.results, "target": target, "round_to": cfg.get("round_to"),
           "granularity": res["rl_config"]["granularity"], "max_latency": budget.fraction if budget else None,
           "allocations": size, "feasible": len(feasible), "search_s": search_s,
           "best_acc_reward": ranking[0]["acc"], "top10_acc_reward": [info["acc"] for info in ranking[:10]],
           "within_1pt_of_best": sum(info["acc"] >= ranking[0]["acc"] - 1 for info in ranking),
           "exhaustive": {"acc_reward": accuracy(model, session.splits.reward),
                          "acc_test": accuracy(model, session.splits.test), "rescored": rescored,
                          "rank": rank_of[key(kept["ratios"])], "ratios": kept["ratios"]},
           "methods": {}}
    print(f"exhaustive: kept rank {out['exhaustive']['rank']}, reward-split {out['exhaustive']['acc_reward']:.2f}, "
          f"test {out['exhaustive']['acc_test']:.2f} ({search_s:.0f}s)", flush=True)
    for method, r in res["targets"][str(target)].items():
        for run in r.get("runs", [r]):
            label = method + (f" seed {run['seed']}" if "seed" in run else "")
            rank = rank_of.get(key(run["ratios"]))  # None: outside this space (e.g. a per-group allocation)
            out["methods"][label] = {"rank": rank, "acc_reward": run["acc_reward"], "acc_test": run["acc_test"],
                                     "unique_evaluations": run.get("unique_evaluations")}
            print(f"  {label}: rank {rank} of {len(feasible)}, reward-split {run['acc_reward']:.2f}", flush=True)
    write_result(args.name, out)


if __name__ == "__main__":
    main()
