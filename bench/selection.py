"""Does the final selection leave accuracy behind? A search's finalists, each scored on more images.

Per seed, a search runs as the CLI runs it (``train`` with default flags, or ``prune --method random --evaluations
N``); then the ``top`` best distinct allocations of its cache by reward, and the floor allocations train scored, are
built as the kept model is (refitted) and scored on:

- ``reward``: the search's reward split (``--reward-images`` training images, 1,000 as in train), what the search
  optimised;
- ``select``: the select split (1,000 more training images), what ``select_best`` re-scores the top 5 on;
- ``spare``: every other training image (2,445 on the CIFAR-10 subset), which no search or selection saw;
- ``unseen``: unseen JPEG test images (``common.unseen_split``), the protocol's validation images;
- ``test``: the 1,017 exact test images, reported only.

Each selection rule then picks one finalist from the training-image scores alone (and the reward model's posterior
mean), and the unseen and test accuracy of its pick is reported beside the best any rule could pick (``oracle``).

Example (from bench/, PYTHONPATH=..): python selection.py --model resnet56 --target 0.3 --seeds 0 3 --name sel_amd
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time

import torch
from common import CIFAR, WEIGHTS, cifar_session, unseen_split, write_result
from methods import commit

from envs import PruneEnv, evaluation_workers, random_search, select_best
from envs.reward_model import RewardModel
from pruning_core import accuracy
from pruning_core.data import make_splits

train_module = importlib.import_module("agent.train")  # the package's ``train`` names the function


def spare_split(session):
    """The training images outside the reward, calibration and select splits: ``make_splits``' own draw with a
    select split of every image left, less the session's select images at its start."""
    s = session.splits
    left = make_splits(session.data, len(s.reward), len(s.calib), session.config.seed, len(s.train)).select
    return left.subset(torch.arange(len(s.select) if s.select is not None else 0, len(left)))


def searched_env(method: str, session, args, seed: int) -> tuple[PruneEnv, dict, dict[str, tuple]]:
    """Run ``method`` on ``session``; returns its env (the cache holds every evaluation), the kept ratios and the
    floor allocations' keys by name."""
    if method == "random":
        env = PruneEnv(session=session, flops=args.target)
        with evaluation_workers(env, args.workers):
            random_search(env, 100 * args.evaluations, seed, args.evaluations)
        kept, _ = select_best(env, 5)
        return env, kept["ratios"], {}
    captured = {}
    finish = train_module.finish_search

    def spy(search, top, floor, *rest):
        captured["env"], captured["floor"] = search.env, floor
        return finish(search, top, floor, *rest)

    train_module.finish_search = spy
    try:
        with tempfile.TemporaryDirectory() as out:
            report = train_module.train(session=session, model=args.model, weights=WEIGHTS[args.model], data=CIFAR,
                                        flops=args.target, seed=seed, out=out, progress=False, workers=args.workers,
                                        **({"episodes": args.episodes} if args.episodes else {}),
                                        **({"evaluations": args.train_evaluations} if args.train_evaluations else {}))
    finally:
        train_module.finish_search = finish
    env = captured["env"]
    return env, report["ratios"], {name: env.evaluator.key(kept) for name, kept in captured["floor"].items()}


def rules(rows: list[dict], kept_index: int) -> dict[str, int]:
    """Each rule's pick (an index of ``rows``, which are sorted by reward, best first)."""
    def weighted(row, splits):
        sizes = {"reward": row["n_reward"], "select": row["n_select"], "spare": row["n_spare"]}
        return sum(row[s] * sizes[s] for s in splits) / sum(sizes[s] for s in splits)

    search = [i for i, r in enumerate(rows) if r["source"] == "search"]
    floor = [i for i, r in enumerate(rows) if r["source"] != "search"]
    out = {"kept": kept_index, "reward": 0}
    for k in (5, 10, 20):
        pool = search[:k] + floor
        out[f"top{k} reward+select"] = max(pool, key=lambda i: weighted(rows[i], ("reward", "select")))
        out[f"top{k} reward+select+spare"] = max(pool, key=lambda i: weighted(rows[i], ("reward", "select", "spare")))
        out[f"top{k} select+spare"] = max(pool, key=lambda i: weighted(rows[i], ("select", "spare")))
    out["gp mean"] = max(range(len(rows)), key=lambda i: rows[i]["gp_mean"])
    out["oracle"] = max(range(len(rows)), key=lambda i: rows[i]["unseen"])
    return out


def measure(method: str, seed: int, args: argparse.Namespace) -> dict:
    session = cifar_session(args.model, select_images=1000, seed=seed, reconstruct=True,
                            reward_images=args.reward_images)
    t = time.perf_counter()
    env, kept_ratios, floor = searched_env(method, session, args, seed)
    search_s = time.perf_counter() - t
    splits = {"select": session.splits.select, "spare": spare_split(session),
              "unseen": unseen_split(session, args.unseen_images), "test": session.splits.test}
    fits = [key for key in env.cache if env.fits(env.evaluator.allocation(key))]
    ranked = sorted(fits, key=lambda key: env.cache[key][0], reverse=True)[:args.top]
    sources = {**dict.fromkeys(ranked, "search"), **{key: name for name, key in floor.items()}}
    gp = RewardModel(env).fit([env.evaluator.allocation(k) for k in env.cache], [r for r, _ in env.cache.values()])
    means, _ = gp.predict([env.evaluator.allocation(k) for k in sources])
    rows, kept_index = [], None
    for (key, source), mean in zip(sources.items(), means):
        reward, info = env.cache[key]
        model, _ = session.build_final(info["ratios"])
        row = {"source": source, "reward": info["acc"], "gp_mean": float(mean), "n_reward": len(session.splits.reward),
               **{f"n_{s}": len(splits[s]) for s in ("select", "spare")},
               **{s: accuracy(model, split) for s, split in splits.items()}}
        if info["ratios"] == kept_ratios:
            kept_index = len(rows)
        rows.append(row)
    if kept_index is None:
        raise SystemExit(f"{method} seed {seed}: the kept allocation is not among the {len(rows)} finalists")
    picks = rules(rows, kept_index)
    out = {"seed": seed, "evaluations": env.evaluator.evaluations, "search_s": search_s, "rows": rows,
           "picks": {rule: {"index": i, "unseen": rows[i]["unseen"], "test": rows[i]["test"]}
                     for rule, i in picks.items()}}
    print(f"== {method} seed {seed}: " + "  ".join(f"{rule} {p['unseen']:.2f}/{p['test']:.2f}"
                                                  for rule, p in out["picks"].items()), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet56", choices=sorted(WEIGHTS))
    p.add_argument("--target", type=float, default=0.3)
    p.add_argument("--methods", nargs="+", choices=("train", "random"), default=["train"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--evaluations", type=int, default=120, help="random search's budget")
    p.add_argument("--episodes", type=int, default=None, help="train's --episodes (default: its own)")
    p.add_argument("--train-evaluations", type=int, default=None,
                   help="train's --evaluations cap, for an equal-budget comparison (default: none)")
    p.add_argument("--reward-images", type=int, default=1000, help="the reward split's training images")
    p.add_argument("--top", type=int, default=20, help="finalists scored, best by reward (the floor's beside them)")
    p.add_argument("--unseen-images", type=int, default=4000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--name", required=True)
    args = p.parse_args()
    results = {"commit": commit(), "config": {k: v for k, v in vars(args).items() if k != "name"}, "methods": {}}
    for method in args.methods:
        results["methods"][method] = []
        for seed in args.seeds:
            results["methods"][method].append(measure(method, seed, args))
            write_result(args.name, results)


if __name__ == "__main__":
    main()
