"""Every allocation method on several models and budgets, through the code paths the CLI runs.

Rows per (model, FLOPs target), each kept model refitted as the commands keep it, tested on the 1,017 exact test
images before fine-tuning, and timed against dense in ONNX Runtime at batch 1:

- ``uniform``: ``prunepilot prune --method uniform`` (per seed with ``--uniform-seeds``);
- ``centre``, ``global``, ``sensitivity``: the floor allocations in the agent's default action space
  (``prune --method centre|global|sensitivity``); sensitivity's evaluation count sets random search's budget;
- ``random-N``: ``prune --method random --evaluations N`` (per seed), N = sensitivity's count and ``--evaluations``;
- ``train``: ``prunepilot train`` with default flags (per seed: the seed also draws the splits, as on the CLI);
  ``train-N`` with ``--train-evaluations N``, ``train-fast`` with ``--train-preset fast``, ``train-group`` with
  ``--train-granularity group``;
- ``agent-alone``: ``train --floor none --warm-start none`` (per seed), what the agent finds by itself.

Example (from bench/, PYTHONPATH=..):
    python methods.py --models resnet20 resnet56 --targets 0.3 0.4 0.5 --seeds 0 1 --name methods_amd
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import CIFAR, ROOT, WEIGHTS, cifar_session, write_result

from agent.config import PRESETS, TrainConfig
from agent.train import train
from envs import GRANULARITIES, PruneEnv, evaluation_workers, floor_allocations, random_search, select_best
from pruning_core import accuracy, uniform_ratios
from pruning_core.latency import compare_latency

METHODS = ("uniform", "centre", "global", "sensitivity", "random", "train", "agent-alone")


def commit() -> str:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def row(session, ratios: dict[str, float], latency: bool, **extra) -> dict:
    """The kept model of ``ratios`` as the commands build it (refitted), measured."""
    model, built = session.build_final(ratios)
    out = {"acc_test": accuracy(model, session.splits.test), "acc_reward": accuracy(model, session.splits.reward),
           **session.measure(ratios), **built, **extra}
    if latency:
        c = compare_latency(session.model, model, session.data.input_shape, 1, "onnxruntime", repeats=3)
        out["ort_speedup_b1"] = c["speedup"]
    out["ratios"] = ratios
    return out


def run_target(model: str, target: float, args: argparse.Namespace) -> dict:
    rows: dict[str, object] = {}
    sessions: dict[int, object] = {}

    def session_of(seed: int):  # a seed draws the reward, calibration and select images, as train's --seed does
        if seed not in sessions:
            sessions[seed] = cifar_session(model, select_images=1000, seed=seed, reconstruct=True,
                                           reward_images=args.reward_images)
        return sessions[seed]

    session = session_of(0)
    env = PruneEnv(session=session, flops=target)  # train's default action space
    if "uniform" not in args.skip and args.uniform_seeds == [0]:
        rows["uniform"] = row(session, uniform_ratios(session.trace, target, 0.8), args.latency)
    elif "uniform" not in args.skip:  # the same ratios; each seed's calibration images move the refitted model
        rows["uniform"] = {"runs": [row(session_of(seed), uniform_ratios(session.trace, target, 0.8), args.latency,
                                        seed=seed) for seed in args.uniform_seeds]}
    floor, sens_evals, floor_s = {}, None, 0.0
    if {"centre", "global", "sensitivity"} - set(args.skip) or ("random" not in args.skip
                                                                and "sensitivity" in args.random_budgets):
        t = time.perf_counter()
        with evaluation_workers(env, args.workers):
            floor = floor_allocations(env, points=args.sensitivity_points)
        sens_evals = len(env.cache) - 3  # the sensitivity table and its allocation (the other three cost one each)
        floor_s = time.perf_counter() - t
    for name, kept in floor.items():
        if name in args.skip:
            continue
        ratios = env.cache[tuple(kept[g.name] for g in env.groups)][1]["ratios"]
        rows[name] = row(session, ratios, args.latency, **({"evaluations": sens_evals, "floor_s": floor_s}
                                                           if name == "sensitivity" else {}))
    print(f"== {model} {target}: " + "  ".join(f"{k} " + " ".join(f"{r['acc_test']:.2f}" for r in v.get("runs", [v]))
                                            for k, v in rows.items()), flush=True)
    if "random" not in args.skip:
        budgets = {sens_evals if b == "sensitivity" else args.evaluations for b in args.random_budgets}
        for budget in sorted(budgets):
            runs = []
            for seed in args.random_seeds:
                renv = PruneEnv(session=session_of(seed), flops=target)
                t = time.perf_counter()
                with evaluation_workers(renv, args.workers):
                    random_search(renv, 100 * budget, seed, budget)
                kept, _ = select_best(renv, 5)
                runs.append(row(session_of(seed), kept["ratios"], args.latency, seed=seed, evaluations=len(renv.cache),
                                search_s=time.perf_counter() - t))
                print(f"   random-{budget} seed {seed}: {runs[-1]['acc_test']:.2f}", flush=True)
            rows[f"random-{budget}"] = {"runs": runs}
    budget = {"evaluations": args.train_evaluations} if args.train_evaluations else {}
    if args.train_preset != "default":
        budget["preset"] = args.train_preset
    budget["granularity"] = args.train_granularity
    if args.train_sensitivity_points != TrainConfig.sensitivity_points:
        budget["sensitivity_points"] = args.train_sensitivity_points
    if args.train_table_prior:
        budget["table_prior"] = True
    if args.reward_images != TrainConfig.reward_images:
        budget["reward_images"] = args.reward_images  # the session's already; recorded in train's report
    for method, flags in (("train", budget), ("agent-alone", {"floor": (), "warm_start": "none", **budget})):
        if method in args.skip:
            continue
        runs = []
        for seed in args.seeds:
            s = session_of(seed)
            with tempfile.TemporaryDirectory() as out:
                report = train(session=s, model=model, weights=WEIGHTS[model], data=CIFAR, flops=target,
                               seed=seed, out=out, progress=False, workers=args.workers, **flags)
                history = json.loads((Path(out) / "history.json").read_text())
            search = report["search"]
            # who proposed each evaluated episode: warm-up, the agent, or the screen's random and local candidates
            proposers = Counter(h.get("proposer", "warm-up") for h in history)
            r = row(s, report["ratios"], args.latency, seed=seed, chosen=search["chosen"],
                    evaluations=search["evaluations"], search_s=search["search_s"], time_s=report["time_s"],
                    rescored=search["rescored"], proposers=dict(proposers),
                    best_reward=search["best_reward"])
            assert abs(r["acc_test"] - report["acc"]) < 1e-9, (r["acc_test"], report["acc"])  # the CLI's own model
            runs.append(r)
            print(f"   {method} seed {seed}: {r['acc_test']:.2f} (chosen {r['chosen']}, {r['evaluations']} "
                  f"evaluations, {report['time_s']:.0f} s)", flush=True)
        rows[method] = {"runs": runs}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.4, 0.5])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--random-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--uniform-seeds", nargs="+", type=int, default=[0],
                   help="seeds whose images calibrate and refit uniform's model (one row per seed unless just 0)")
    p.add_argument("--evaluations", type=int, default=120, help="random search's other evaluation budget")
    p.add_argument("--random-budgets", nargs="+", choices=("sensitivity", "evaluations"),
                   default=["sensitivity", "evaluations"], help="random search's budgets: the sensitivity method's "
                   "evaluation count and --evaluations (without sensitivity and the floor rows, no floor is run)")
    p.add_argument("--train-evaluations", type=int, default=None,
                   help="cap train's distinct evaluations, floor and sensitivity table included (default: its own)")
    p.add_argument("--train-preset", choices=PRESETS, default="default", help="train's --preset (row train-fast, ...)")
    p.add_argument("--train-granularity", choices=GRANULARITIES, default=TrainConfig.granularity,
                   help="train's --granularity (row train-group, ...)")
    p.add_argument("--train-sensitivity-points", type=int, default=TrainConfig.sensitivity_points,
                   help="train's --sensitivity-points (row train-120-5pt, ...)")
    p.add_argument("--train-table-prior", action="store_true", help="train's --table-prior (row train-prior)")
    p.add_argument("--sensitivity-points", type=int, default=10)
    p.add_argument("--reward-images", type=int, default=TrainConfig.reward_images,
                   help="training images in every method's reward split (row names unchanged)")
    p.add_argument("--skip", nargs="*", default=[], choices=METHODS)
    p.add_argument("--no-latency", dest="latency", action="store_false")
    p.add_argument("--workers", type=int, default=1, help="evaluation workers (the results do not depend on it)")
    p.add_argument("--name", required=True)
    args = p.parse_args()
    config = {k: v for k, v in vars(args).items() if k != "name"}
    results = {"commit": commit(), "config": config, "models": {}}
    for model in args.models:
        results["models"][model] = {}
        for target in args.targets:
            results["models"][model][str(target)] = run_target(model, target, args)
            write_result(args.name, results)  # after every target, so a long run leaves partial results


if __name__ == "__main__":
    main()
