"""Zero-shot transfer: a policy trained on ResNet-20 applied to ResNet-56, VGG-16 and MobileNetV2, and a
K-episode warm start on ResNet-56 against a cold RL search with the same K episodes.

    python bench/transfer.py --train-episodes 100 --k 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import CIFAR, WEIGHTS, write_result

from agent import Search, TrainConfig, apply_policy, save_policy
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
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = SessionConfig(reward_images=args.reward_images, calib_batches=args.calib_batches, seed=args.seed)
    result: dict = {"config": vars(args), "targets": {}}

    source = PruningSession("resnet20", WEIGHTS["resnet20"], CIFAR, cfg)
    train_cfg = TrainConfig(algo=args.algo, flops=args.flops, episodes=args.train_episodes, seed=args.seed,
                            warmup_episodes=args.warmup, progress=False, model="resnet20")
    search = Search(train_cfg, build_env(train_cfg, source))
    t = time.perf_counter()
    best = search.run(args.train_episodes)
    kept, _, _ = finish_search(search, train_cfg.rescore_top)
    result["source"] = {"model": "resnet20", "search_s": time.perf_counter() - t, "best_reward": best["reward"],
                        "acc_test": accuracy(source.build(kept["ratios"]), source.splits.test),
                        "acc_test_uniform": accuracy(source.build(uniform_ratios(source.trace, args.flops, 0.8)),
                                                     source.splits.test)}
    policy_dir = Path(tempfile.mkdtemp()) / "policy"
    save_policy(search.algo, train_cfg, best, policy_dir)

    r56 = PruningSession("resnet56", WEIGHTS["resnet56"], CIFAR, cfg)
    targets = {"resnet56": r56}
    for name in ("vgg16_bn", "mobilenetv2"):  # random init: FLOPs only
        targets[name] = PruningSession(build_model(name), None, CIFAR, SessionConfig(
            reward_images=64, calib_batches=1, seed=args.seed))
    for name, session in targets.items():
        t = time.perf_counter()
        rep = apply_policy(policy_dir, name, session=session, flops=args.flops, fallback=False)  # the raw policy
        row = {"flops_ratio": rep["flops_ratio"], "params_ratio": rep["params_ratio"],
               "apply_s": time.perf_counter() - t, "ratios": rep["ratios"]}
        if name == "resnet56":
            uni = session.build(uniform_ratios(session.trace, args.flops, 0.8))
            row.update(acc_test=rep["acc"], acc_reward=rep["acc_reward"],
                       acc_test_uniform=accuracy(uni, session.splits.test),
                       acc_reward_uniform=accuracy(uni, session.splits.reward))
        result["targets"][name] = row
        print(name, {k: v for k, v in row.items() if k != "ratios"}, flush=True)

    # K episodes on ResNet-56: warm start from the ResNet-20 policy against a cold start
    for label, warm in (("warm", True), ("cold", False)):
        t = time.perf_counter()
        if warm:
            rep = apply_policy(policy_dir, "resnet56", session=r56, flops=args.flops, search_episodes=args.k,
                               seed=args.seed, fallback=False)
            acc_test, acc_reward = rep["acc"], rep["acc_reward"]
        else:
            cold_cfg = TrainConfig(algo=args.algo, flops=args.flops, episodes=args.k, seed=args.seed,
                                   warmup_episodes=min(args.warmup, args.k // 2), progress=False)
            cold = Search(cold_cfg, build_env(cold_cfg, r56))
            cold.run(args.k)
            kept, _, _ = finish_search(cold, cold_cfg.rescore_top)  # as apply's warm start: policy episode, re-score
            model = r56.build(kept["ratios"])
            acc_test, acc_reward = accuracy(model, r56.splits.test), accuracy(model, r56.splits.reward)
        result["targets"][f"resnet56_k{args.k}_{label}"] = {"acc_test": acc_test, "acc_reward": acc_reward,
                                                            "wall_s": time.perf_counter() - t}
        print(label, acc_test, acc_reward, flush=True)
    write_result("transfer", result)


if __name__ == "__main__":
    main()
