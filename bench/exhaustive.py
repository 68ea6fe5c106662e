"""Every allocation of a compact action space, evaluated: the ceiling that any search in that space can reach, and
its accuracy / latency trade-off.

With ``--round-to 8`` at substage granularity, ResNet-56's five decisions have 2, 4, 4, 7 and 7 distinct widths:
1,568 allocations, of which 186 fit a 50% FLOPs budget. A search of 120 evaluations covers much of such a space.
This script takes the setting of one search benchmark result (target, rounding, granularity, reward split, and
the latency table it budgeted with, if any), evaluates every allocation that fits its budgets on the same reward
split, and:

- keeps the best after the same re-scoring on the select split (exhaustive search as a method, row
  ``exhaustive``), and ranks the allocation that each method of that result kept among all of them;
- with ``--max-latency L...``, predicts every allocation's latency with a freshly measured table (ORT, batch
  64), or the one a result recorded (``--latency-table NAME``), and for each L keeps the best allocation
  within it the same way (rows ``exhaustive latency<=L``): the best accuracy each latency budget allows here.

The kept rows are written under ``targets`` as the search benchmarks write theirs, so ``bench/latency.py
--results NAME`` times them.

    python bench/exhaustive.py --results search_substage_r8 --max-latency 0.55 0.6 0.62 0.65 --name exhaustive_r8
"""

from __future__ import annotations

import argparse
import json
import math
import time

from common import RESULTS, cifar_session, write_result
from tqdm.auto import tqdm

from envs import PruneEnv, select_best
from pruning_core import LatencyBudget, LatencyTable, accuracy, kept_counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, metavar="NAME",
                   help="search results file whose setting to enumerate and whose methods to rank, e.g. search_latency")
    p.add_argument("--target", type=float, default=None, help="FLOPs target (default: the result's first)")
    p.add_argument("--latency-table", metavar="NAME",
                   help="results file whose latency table predicts latency (default: measure one, ORT at batch 64)")
    p.add_argument("--max-latency", type=float, nargs="*", default=[],
                   help="latency budgets (fractions of dense, as the table predicts) to keep the best one within")
    p.add_argument("--limit", type=int, default=2000, help="refuse spaces of more allocations than this")
    p.add_argument("--name", default="exhaustive", help="results file to write (default: exhaustive)")
    args = p.parse_args()
    res = json.loads((RESULTS / f"{args.results}.json").read_text())
    cfg = res["config"]
    target = args.target if args.target is not None else cfg["targets"][0]
    round_to, top = cfg.get("round_to"), cfg.get("rescore_top", 5)
    session = cifar_session(cfg["model"], reward_images=cfg["reward_images"], calib_batches=cfg["calib_batches"])
    budget = None
    if "latency_budget" in res:  # the very table the search budgeted with, so that the feasible set is the same
        budget = LatencyBudget(LatencyTable.from_dict(res["latency_budget"]["table"]),
                               res["latency_budget"]["max_latency"])
    table = None
    if args.latency_table:
        table = LatencyTable.from_dict(json.loads((RESULTS / f"{args.latency_table}.json").read_text())
                                       ["latency_budget"]["table"])
    elif args.max_latency:  # a fresh table, as --max-latency measures one
        table = session.latency_table("onnxruntime", 64)
        print(f"latency table (onnxruntime, batch 64): dense {table.dense_ms:.1f} ms, offset {table.offset_ms:.2f} ms",
              flush=True)
    env = PruneEnv(session=session, flops=target, max_ratio=cfg["max_ratio"], round_to=round_to,
                   granularity=res["rl_config"]["granularity"], latency_budget=budget)
    feasible = env.feasible_allocations(args.limit)
    size = math.prod(len(grid) for grid in env.ratio_grid)
    print(f"{size} allocations, {len(feasible)} within the budgets", flush=True)
    started = time.perf_counter()
    best = None
    for kept in tqdm(feasible, desc="evaluating", unit="model", disable=None):
        reward, info = env.evaluate(kept)
        if best is None or reward > best["reward"]:
            best = {"reward": reward, "ratios": info["ratios"]}
    search_s = time.perf_counter() - started

    def key(ratios: dict[str, float]) -> tuple[int, ...]:
        kept = kept_counts(session.trace, ratios, round_to)
        return tuple(kept[g.name] for g in env.groups)

    predicted = {}
    if table is not None:
        predicted = {k: table.ratio(session.trace, {g.name: w for g, w in zip(env.groups, k)}) for k in env.cache}
    ranking = sorted(env.cache.items(), key=lambda item: item[1][0], reverse=True)
    rank_of = {k: i + 1 for i, (k, _) in enumerate(ranking)}
    allocations = [{"kept": list(k), "acc_reward": info["acc"], "flops_ratio": info["flops_ratio"],
                    "latency_pred_ratio": predicted.get(k)} for k, (_, info) in ranking]

    def keep_within(max_latency: float | None) -> dict:
        """The best allocation (after re-scoring) among those predicted within ``max_latency``, and its test
        accuracy (reported, never used to choose)."""
        among = [k for k in env.cache if max_latency is None or predicted[k] <= max_latency]
        if not among:
            return {"feasible": 0}
        kept, rescored = select_best(env, top, among=among)
        feasible_here = len(among)
        model = session.build(kept["ratios"], round_to)
        m = session.measure(kept["ratios"], round_to)
        k = key(kept["ratios"])
        return {"round_to": round_to, "ratios": kept["ratios"], "feasible": feasible_here, "rank": rank_of[k],
                "acc_reward": accuracy(model, session.splits.reward), "acc_test": accuracy(model, session.splits.test),
                "flops_ratio": m["flops_ratio"], "params_ratio": m["params_ratio"],
                "latency_pred_ratio": predicted.get(k), "rescored": rescored}

    rows = {"exhaustive": keep_within(None)}
    for lat in args.max_latency:
        rows[f"exhaustive latency<={lat}"] = keep_within(lat)
    for name, r in rows.items():
        print(f"{name}: {r['feasible']} allocations, kept rank {r.get('rank')}, reward-split "
              f"{r.get('acc_reward', 0):.2f}, test {r.get('acc_test', 0):.2f}, FLOPs {r.get('flops_ratio', 0):.3f}, "
              f"predicted latency {r.get('latency_pred_ratio')}", flush=True)
    ranks = {}
    for method, r in res["targets"][str(target)].items():
        for run in r.get("runs", [r]):
            label = method + (f" seed {run['seed']}" if "seed" in run else "")
            rank = rank_of.get(key(run["ratios"]))  # None: outside this space (e.g. a per-group allocation)
            ranks[label] = {"rank": rank, "acc_reward": run["acc_reward"], "acc_test": run["acc_test"],
                            "unique_evaluations": run.get("unique_evaluations")}
            print(f"  {label}: rank {rank} of {len(feasible)}, reward-split {run['acc_reward']:.2f}", flush=True)
    write_result(args.name, {
        "config": {**vars(args), "target": target, "round_to": round_to, "granularity": env.granularity,
                   "max_latency_searched": budget.fraction if budget else None},
        "allocations_in_space": size, "feasible": len(feasible), "search_s": search_s,
        "within_1pt_of_best": sum(a["acc_reward"] >= allocations[0]["acc_reward"] - 1 for a in allocations),
        "targets": {str(target): rows}, "ranks": ranks, "allocations": allocations,
        "latency_table": table.to_dict() if table is not None else None})


if __name__ == "__main__":
    main()
