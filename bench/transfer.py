"""Zero-shot transfer: a policy trained on ResNet-20 applied to ResNet-56, VGG-16 and MobileNetV2, and a
K-episode warm start on ResNet-56 against a cold RL search and random search in the agent's action space, with the
same budget.

    python bench/transfer.py --train-episodes 100 --k 20
    python bench/transfer.py --train-episodes 100 --k 20 --round-to 16 --drop-blocks --repeat-penalty 0.02 \
        --name transfer_drop   # blocks may be dropped; also compared with the space's centre (action 0)
    python bench/transfer.py --round-to 8 --drop-blocks --repeat-penalty 0.02 --refit   # every kept model refitted

Searches score their candidates without the least-squares refit; ``--refit`` refits every model a row reports
(policy, uniform, centre, the K-episode searches' kept models), as the CLI does by default.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import CIFAR, cifar_session, write_result
from search import random_search

from agent import Search, TrainConfig, apply_policy, save_policy
from agent.apply import policy_ratios
from agent.train import build_env, finish_search
from pruning_core import PruningSession, SessionConfig, accuracy, build_model, uniform_ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--train-episodes", type=int, default=100)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--k", type=int, default=20, help="episodes of warm-start (and of the cold search)")
    p.add_argument("--algo", default="ppo")
    p.add_argument("--reward-images", type=int, default=1000)
    p.add_argument("--calib-batches", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the source search and the sessions")
    p.add_argument("--k-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the K-episode searches")
    p.add_argument("--granularity", default=TrainConfig.granularity, help="the agents' action space")
    p.add_argument("--round-to", type=int, default=None, help="round kept channels up to multiples of this")
    p.add_argument("--drop-blocks", action="store_true", help="let the agents remove residual branches whole")
    p.add_argument("--repeat-penalty", type=float, default=TrainConfig.repeat_penalty)
    p.add_argument("--refit", action="store_true",
                   help="refit every reported model to its dense model by least squares before adaptive BN")
    p.add_argument("--name", default="transfer", help="results file to write")
    args = p.parse_args()
    rt = args.round_to
    space = {"granularity": args.granularity, "round_to": rt, "drop_blocks": args.drop_blocks,
             "repeat_penalty": args.repeat_penalty}
    splits = {"reward_images": args.reward_images, "calib_batches": args.calib_batches, "seed": args.seed}
    result: dict = {"config": vars(args), "targets": {}}

    def build(session: PruningSession, ratios: dict[str, float]):
        """A row's model: built as the CLI keeps it (refitted with ``--refit``)."""
        return session.build(ratios, rt, reconstruct=args.refit)

    source = cifar_session("resnet20", **splits)
    train_cfg = TrainConfig(algo=args.algo, flops=args.flops, episodes=args.train_episodes, seed=args.seed,
                            warmup_episodes=args.warmup, progress=False, model="resnet20", **space)
    search = Search(train_cfg, build_env(train_cfg, source))
    t = time.perf_counter()
    best = search.run(args.train_episodes)
    kept = finish_search(search, train_cfg.rescore_top)["kept"]
    result["source"] = {"model": "resnet20", "search_s": time.perf_counter() - t, "best_reward": best["reward"],
                        "acc_test": accuracy(build(source, kept["ratios"]), source.splits.test),
                        "acc_test_uniform": accuracy(build(source, uniform_ratios(source.trace, args.flops, 0.8, rt)),
                                                     source.splits.test)}
    policy_dir = Path(tempfile.mkdtemp()) / "policy"
    save_policy(search.algo, train_cfg, best, policy_dir)

    r56 = cifar_session("resnet56", **splits)
    targets = {"resnet56": r56}
    for name in ("vgg16_bn", "mobilenetv2"):  # random init: FLOPs only
        targets[name] = PruningSession(build_model(name), None, CIFAR, SessionConfig(
            reward_images=64, calib_batches=1, seed=args.seed))
    for name, session in targets.items():
        t = time.perf_counter()
        rep = apply_policy(policy_dir, name, session=session, flops=args.flops, floor=(),  # the raw policy
                           reconstruct_final=args.refit and name == "resnet56")  # built as the uniform row is
        row = {"flops_ratio": rep["flops_ratio"], "params_ratio": rep["params_ratio"],
               "apply_s": time.perf_counter() - t, "ratios": rep["ratios"],
               "blocks_dropped": sum(r == 1.0 for r in rep["ratios"].values())}
        if name == "resnet56":
            uni = build(session, uniform_ratios(session.trace, args.flops, 0.8, rt))
            row.update(acc_test=rep["acc"], acc_reward=rep["acc_reward"],
                       acc_test_uniform=accuracy(uni, session.splits.test),
                       acc_reward_uniform=accuracy(uni, session.splits.reward))
            if args.drop_blocks:  # the drop space's own simple allocation: action 0 on every step
                env = build_env(replace(train_cfg, model="resnet56"), session)
                centre = build(session, policy_ratios(None, env)[0])
                row.update(acc_test_centre=accuracy(centre, session.splits.test),
                           acc_reward_centre=accuracy(centre, session.splits.reward))
        result["targets"][name] = row
        print(name, {k: v for k, v in row.items() if k != "ratios"}, flush=True)

    # K episodes on ResNet-56, each with K + 1 evaluations and the same re-scoring: a warm start from the
    # ResNet-20 policy (its zero-shot episode + K search episodes), a cold search (K episodes + its policy's
    # episode), and random search (K + 1 samples) in the agents' action space, the equal-budget baseline
    for label in ("warm", "cold", f"random-{args.granularity}"):
        runs = []
        for seed in args.k_seeds:
            t = time.perf_counter()
            if label == "warm":
                ratios = apply_policy(policy_dir, "resnet56", session=r56, flops=args.flops, search_episodes=args.k,
                                      seed=seed, floor=(), reconstruct_final=False)["ratios"]
            elif label == "cold":
                cold_cfg = TrainConfig(algo=args.algo, flops=args.flops, episodes=args.k, seed=seed,
                                       warmup_episodes=min(args.warmup, args.k // 2), progress=False, **space)
                cold = Search(cold_cfg, build_env(cold_cfg, r56))
                cold.run(args.k)
                ratios = finish_search(cold, cold_cfg.rescore_top)["kept"]["ratios"]
            else:
                ratios = random_search(r56, args.flops, args.k + 1, seed, train_cfg.max_ratio, args.granularity,
                                       round_to=rt, drop=args.drop_blocks)["ratios"]
            model = build(r56, ratios)
            runs.append({"seed": seed, "acc_test": accuracy(model, r56.splits.test),
                         "blocks_dropped": sum(r == 1.0 for r in ratios.values()),
                         "acc_reward": accuracy(model, r56.splits.reward), "wall_s": time.perf_counter() - t})
            print(label, runs[-1], flush=True)
        tests = [r["acc_test"] for r in runs]
        result["targets"][f"resnet56_k{args.k}_{label}"] = {
            "acc_test": statistics.mean(tests), "acc_test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "acc_reward": statistics.mean(r["acc_reward"] for r in runs), "runs": runs}
    write_result(args.name, result)


if __name__ == "__main__":
    main()
