"""Side-by-side search benchmark on the shared ResNet-56 (see ../shared/DESIGN.md, benchmark protocol).

Every method uses the same session: the same Taylor scores, reward split, calibration batches, and (for the
search methods) the same budget: ``--episodes``, or with ``--evaluations`` the same number of distinct pruned-model
evaluations (an episode that repeats an evaluated allocation reuses its cached reward, so a converging agent
would otherwise evaluate fewer models than random search). Test images are only used for reporting.

    python bench/search.py --targets 0.5 0.3 --episodes 100 --seeds 0 1 2 --algos ddpg ppo
    python bench/search.py --targets 0.5 --round-to 8 --max-latency 0.6 --algos ppo --name search_latency  # + latency
    python bench/search.py --targets 0.5 --round-to 8 --evaluations 120 --episodes 600 --algos ppo  # equal evaluations
    python bench/search.py --targets 0.5 --round-to 16 --drop-blocks --granularity group --algos ppo  # + taylor-drop
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
from common import cifar_session, evaluate_method, latency_ms, write_result

from agent import Search, TrainConfig
from agent.apply import policy_ratios, run_episode
from agent.train import build_env, finish_search
from envs import GRANULARITIES, PruneEnv, select_best
from pruning_core import (
    DROP_CRITERIA,
    L1Importance,
    LatencyBudget,
    LatencyTable,
    PruningSession,
    SessionConfig,
    UserError,
    branch_width,
    drop_order,
    global_ratios,
    kept_channels,
    uniform_ratios,
)
from pruning_core.latency import BACKENDS


def random_search(session: PruningSession, target: float, episodes: int, seed: int, max_ratio: float,
                  granularity: str = "group", rescore_top: int = TrainConfig.rescore_top,
                  round_to: int | None = None, latency: LatencyBudget | None = None,
                  evaluations: int | None = None, drop: bool = False) -> dict:
    """EagleEye-style: ``episodes`` random ratio vectors (one ratio per group, or per stage) pushed into the budget
    by the env's clamp, or as many as it takes to evaluate ``evaluations`` distinct allocations (at most
    ``episodes``); the best by reward, re-scored like the agent's (``envs.select_best``)."""
    # actions uniform in [-1, 1] around the fixed uniform allocation
    env = PruneEnv(session=session, flops=target, max_ratio=max_ratio, granularity=granularity,
                   action_center="uniform", round_to=round_to, latency_budget=latency, drop=drop)
    rng = np.random.default_rng(seed)
    best, started, done = None, time.perf_counter(), 0
    while done < episodes and (evaluations is None or len(env.cache) < evaluations):
        reward, info = run_episode(env, lambda _: rng.uniform(-1, 1, 1).astype(np.float32))
        done += 1
        if best is None or reward > best["reward"]:
            best = {"reward": reward, "ratios": info["ratios"]}
    wall, eval_s = time.perf_counter() - started, env.evaluation_s
    t = time.perf_counter()
    kept, rescored = select_best(env, rescore_top)
    return {**kept_after_rescoring(kept, rescored, best, t), "search_s": wall, "episodes": done,
            "episodes_per_min": 60 * done / wall, "agent_share": max(0.0, 1 - eval_s / wall),
            "unique_evaluations": len(env.cache)}


def taylor_drop_ratios(session: PruningSession, target: float, max_ratio: float, round_to: int) -> dict[str, float]:
    """The simple allocation of the ``--drop-blocks`` space: drop the cheapest residual branches (by
    ``session.drop_costs()``; as few as the budget allows), and prune every other group by one shared ratio in whole
    ``round_to`` blocks of its highest-Taylor channels (a residual branch keeps at least one block)."""
    trace, dense = session.trace, session.trace.flops()
    order = drop_order(trace, session.drop_costs())

    def kept_at(ratio: float, dropped: set[str]) -> dict[str, int]:
        branch = trace.droppable
        return {g.name: 0 if g.name in dropped
                else branch_width(g.channels, ratio, round_to, g.step) if g.name in branch
                else kept_channels(g.channels, ratio, round_to, multiple=g.step) for g in trace.groups}

    for k in range(len(order) + 1):
        dropped = set(order[:k])
        if trace.flops(kept_at(max_ratio, dropped)) > target * dense:
            continue
        lo, hi = 0.0, max_ratio
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if trace.flops(kept_at(mid, dropped)) <= target * dense else (mid, hi)
        return {g.name: 1.0 - k / g.channels for g, k in zip(trace.groups, kept_at(hi, dropped).values())}
    raise UserError(f"FLOPs target {target} is unreachable even with every residual branch dropped")


def rl_search(session: PruningSession, cfg: TrainConfig, table: LatencyTable | None = None) -> dict:
    """One RL search on ``session`` as ``prunepilot train`` runs it: ``cfg.episodes - 1`` search episodes (or
    until ``cfg.evaluations - 1`` distinct allocations are evaluated), the learned policy's deterministic episode
    (a candidate like the others), then the re-scoring. Returns the kept allocation and what the search cost."""
    env = build_env(cfg, session, table)
    search = Search(cfg, env)
    search.run(cfg.episodes - 1, cfg.evaluations - 1 if cfg.evaluations else None)
    eval_s = env.evaluation_s
    t = time.perf_counter()
    done = finish_search(search, cfg.rescore_top)
    return {**kept_after_rescoring(done["kept"], done["rescored"], done["best"], t), "search_s": search.search_s,
            "policy_episode": done["policy_episode"], "episodes": search.episodes_done + 1,
            "episodes_per_min": 60 * (search.episodes_done + 1) / search.search_s,
            "best_episode": done["best"]["episode"],
            "agent_share": max(0.0, 1 - eval_s / search.search_s), "unique_evaluations": len(env.cache),
            "reexplorations": search.reexplorations}


def kept_after_rescoring(kept: dict, rescored: list[dict], best: dict, started: float) -> dict:
    """``reward`` and ``ratios`` of the allocation kept after re-scoring, the search's own best episode
    (``search_best``), the re-scored candidates and the seconds since ``started`` (the re-scoring's cost)."""
    return {"reward": kept["reward"], "ratios": kept["ratios"], "rescored": rescored,
            "rescore_s": time.perf_counter() - started, "search_best": {"reward": best["reward"],
                                                                        "ratios": best["ratios"]}}


SUMMARY_KEYS = ("acc_test", "acc_reward", "acc_test_finetuned", "search_best_acc_test", "search_s", "episodes_per_min",
                "agent_share", "flops_ratio", "speedup_b1", "speedup_b64", "latency_pred_ratio")


def summarise(rows: list[dict], keys: tuple[str, ...]) -> dict:
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        if vals:
            out[k] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                      "min": min(vals), "max": max(vals)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--episodes", type=int, default=100,
                   help="episodes of each search method (its evaluation budget, cache hits included)")
    p.add_argument("--evaluations", type=int, default=None,
                   help="instead, a budget of distinct pruned-model evaluations per search method (episodes that "
                        "repeat an evaluated allocation are free); --episodes then caps the episodes")
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algos", nargs="+", default=["ppo", "ddpg"],
                   help="the first (the default algorithm) runs with every seed, the others with the first seed")
    p.add_argument("--reward-images", type=int, default=1000)
    p.add_argument("--calib-batches", type=int, default=10)
    p.add_argument("--max-ratio", type=float, default=0.8)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--rescore-top", type=int, default=TrainConfig.rescore_top,
                   help="candidates every search method re-scores on the select split (0: keep its best episode)")
    p.add_argument("--round-to", type=int, default=None,
                   help="every method keeps channel counts rounded up to this multiple (e.g. 8, for latency)")
    p.add_argument("--granularity", choices=GRANULARITIES, default=TrainConfig.granularity,
                   help="the agent's action space; random search in the same space runs as random-GRANULARITY")
    p.add_argument("--init-std", type=float, default=TrainConfig.init_std,
                   help=f"PPO's initial action std (default: {TrainConfig.init_std}, TrainConfig's)")
    p.add_argument("--clone-warmup", action="store_true",
                   help="PPO starts from the best of its --warmup random episodes (TrainConfig.clone_warmup)")
    p.add_argument("--no-reexplore", action="store_true",
                   help="PPO is not re-centred and widened after rollouts that only repeat evaluated allocations "
                        "(TrainConfig.reexplore off)")
    p.add_argument("--repeat-penalty", type=float, default=TrainConfig.repeat_penalty,
                   help="RL reward subtracted for an episode that repeats an evaluated allocation "
                        f"(default: {TrainConfig.repeat_penalty}, TrainConfig's)")
    p.add_argument("--drop-blocks", action="store_true",
                   help="let the searches remove residual branches whole (with --round-to, best --granularity group)")
    p.add_argument("--drop-criterion", choices=DROP_CRITERIA, default=SessionConfig.drop_criterion,
                   help="what it costs to remove a branch, which orders drop steps (SessionConfig.drop_criterion)")
    p.add_argument("--reconstruct", action="store_true",
                   help="refit every pruned model's layers to the dense model by least squares before adaptive BN, "
                        "in every reward and row (SessionConfig.reconstruct)")
    p.add_argument("--skip", nargs="*", default=[], metavar="METHOD",
                   help="methods not to run, e.g. global l1-uniform random rl-ddpg")
    p.add_argument("--max-latency", type=float, default=None,
                   help="every method also keeps the predicted latency within this fraction of dense "
                        "(TrainConfig.max_latency; pair with --round-to 8)")
    p.add_argument("--latency-backend", choices=BACKENDS, default="onnxruntime",
                   help="runtime the latency table times (default: onnxruntime)")
    p.add_argument("--latency-batch", type=int, default=64, help="batch size the latency table times (default: 64)")
    p.add_argument("--time-backend", choices=BACKENDS, default="onnxruntime",
                   help="runtime that times every kept model (and dense, in pairs) inside the run (default: "
                        "onnxruntime, the usual CPU deployment; eager torch swings by tens of percent)")
    p.add_argument("--time-repeats", type=int, default=5,
                   help="paired sweeps per model and batch size; the speed-up is their median (default: 5)")
    p.add_argument("--name", default="search")
    args = p.parse_args()

    t = time.perf_counter()
    session = cifar_session(args.model, reward_images=args.reward_images, calib_batches=args.calib_batches,
                            drop_criterion=args.drop_criterion, reconstruct=args.reconstruct)
    if args.drop_blocks:
        session.drop_costs()  # once, shared by every method (session.timings["drop_costs_s"])
    setup_s = time.perf_counter() - t
    l1 = copy.copy(session)
    l1.scores = L1Importance()(session.model, None, session.trace)
    shape = session.data.input_shape
    timing = {"backend": args.time_backend, "repeats": args.time_repeats}  # paired with dense (evaluate_method)
    dense_latency = {b: latency_ms(session.model, shape, b, args.time_backend) for b in (1, 64)}
    table = latency = None
    if args.max_latency is not None:
        t = time.perf_counter()
        table = session.latency_table(args.latency_backend, args.latency_batch, progress=False)
        latency = LatencyBudget(table, args.max_latency)
        print(f"latency table ({args.latency_backend}, batch {args.latency_batch}): {time.perf_counter() - t:.1f}s, "
              f"dense {table.dense_ms:.1f} ms", flush=True)
    defaults = TrainConfig()
    results = {"config": vars(args), "setup_s": setup_s, "timings": session.timings, "in_run_latency": timing,
               "rl_config": {**{k: getattr(defaults, k) for k in ("action_center", "sde", "max_ratio",
                                                                       "select_images")}, "init_std": args.init_std,
                             "granularity": args.granularity, "warmup_episodes": args.warmup,
                             "clone_warmup": args.clone_warmup, "reexplore": not args.no_reexplore,
                             "repeat_penalty": args.repeat_penalty, "drop_blocks": args.drop_blocks},
               "dense": {"acc_test": session.dense_accuracy("test"), "acc_reward": session.dense_accuracy("reward"),
                         "latency_b1_ms": dense_latency[1], "latency_b64_ms": dense_latency[64],
                         "flops": session.flops_dense, "params": session.params_dense},
               "targets": {}}
    if args.reconstruct:
        results["reconstruct_images"] = session.config.reconstruct_images
    if table is not None:
        results["latency_budget"] = {"max_latency": args.max_latency, "backend": table.backend,
                                     "batch_size": table.batch_size, "dense_ms": table.dense_ms,
                                     "table": table.to_dict()}
    for target in args.targets:
        mr, rt = args.max_ratio, args.round_to
        rows: dict[str, object] = {}
        print(f"== target {target}: fixed allocations", flush=True)
        for method, s in (("uniform", session), ("global", session), ("l1-uniform", l1)):
            if method in args.skip:
                continue
            ratios = (global_ratios(session.trace, session.scores, target, mr, rt, latency) if method == "global"
                      else uniform_ratios(session.trace, target, mr, rt, latency))  # L1: uniform ratios, L1 ranking
            rows[method] = evaluate_method(s, ratios, args.finetune_epochs, timing, rt, table, search_s=0.0)
        if args.drop_blocks and "taylor-drop" not in args.skip:
            rows["taylor-drop"] = evaluate_method(session, taylor_drop_ratios(session, target, mr, rt),
                                                  args.finetune_epochs, timing, rt, table, search_s=0.0)
        if args.drop_blocks and args.granularity != "group" and "centre-drop" not in args.skip:
            # the staged space's own simple allocation: action 0 on every step (what the agent starts from)
            centre = PruneEnv(session=session, flops=target, max_ratio=mr, granularity=args.granularity,
                              round_to=rt, latency_budget=latency, drop=True)
            rows["centre-drop"] = evaluate_method(session, policy_ratios(None, centre)[0], args.finetune_epochs,
                                                  timing, rt, table, search_s=0.0)
        # the search methods: random per group (one seed), random in the agent's own action space (every seed:
        # the baseline it must beat) and the agents (the default algorithm with every seed)
        searches = [("random", None, args.seeds[:1]), (f"random-{args.granularity}", None, args.seeds)]
        searches += [(f"rl-{algo}", algo, args.seeds if i == 0 else args.seeds[:1])
                     for i, algo in enumerate(args.algos)]
        for method, algo, seeds in searches:
            if method in args.skip:
                continue
            runs = []
            for seed in seeds:
                budget = (f"{args.evaluations} distinct evaluations, at most {args.episodes} episodes"
                          if args.evaluations else f"{args.episodes} episodes")
                print(f"== target {target}: {method} seed {seed} ({budget})", flush=True)
                if algo is None:
                    r = random_search(session, target, args.episodes, seed, mr,
                                      "group" if method == "random" else args.granularity, args.rescore_top, rt,
                                      latency, args.evaluations, args.drop_blocks)
                else:
                    r = rl_search(session, TrainConfig(algo=algo, flops=target, episodes=args.episodes,
                                                       evaluations=args.evaluations, seed=seed,
                                                       max_ratio=mr, warmup_episodes=args.warmup, progress=False,
                                                       rescore_top=args.rescore_top, round_to=rt,
                                                       granularity=args.granularity,
                                                       clone_warmup=args.clone_warmup, init_std=args.init_std,
                                                       reexplore=not args.no_reexplore,
                                                       repeat_penalty=args.repeat_penalty,
                                                       drop_blocks=args.drop_blocks,
                                                       max_latency=args.max_latency,
                                                       latency_backend=args.latency_backend,
                                                       latency_batch=args.latency_batch), table)
                runs.append(evaluate_method(session, r.pop("ratios"), args.finetune_epochs, timing, rt, table,
                                            seed=seed, **r))
                print(f"   reward-split {runs[-1]['acc_reward']:.2f}  test {runs[-1]['acc_test']:.2f} (search best "
                      f"{runs[-1]['search_best_acc_test']:.2f})  {runs[-1]['search_s']:.0f}s  agent share "
                      f"{runs[-1]['agent_share']:.3f}  {runs[-1]['unique_evaluations']} evaluations in "
                      f"{runs[-1]['episodes']} episodes"
                      + (f", {runs[-1]['reexplorations']} re-explorations" if "reexplorations" in runs[-1] else ""),
                      flush=True)
            rows[method] = runs[0] if len(runs) == 1 else {"runs": runs, "summary": summarise(runs, SUMMARY_KEYS)}
        results["targets"][str(target)] = rows
        write_result(args.name, results)  # after every target, so a long run leaves partial results


if __name__ == "__main__":
    main()
