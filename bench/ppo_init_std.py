"""PPO's initial exploration std on ResNet-56 at 50% FLOPs, with bench/search.py's protocol
(500 reward images, 5 calibration batches, 80 episodes, the same Taylor scores and splits).

    python bench/ppo_init_std.py --stds 1.0 0.3 --seeds 0 1
"""

from __future__ import annotations

import argparse
import time

from common import CIFAR, WEIGHTS, write_result

from agent import Search, TrainConfig
from envs import PruneEnv
from pruning_core import PruningSession, SessionConfig, accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stds", type=float, nargs="+", default=[1.0, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--episodes", type=int, default=80)
    args = p.parse_args()
    s = PruningSession("resnet56", WEIGHTS["resnet56"], CIFAR, SessionConfig(reward_images=500, calib_batches=5))
    rows = []
    for std in args.stds:
        for seed in args.seeds:
            t = time.perf_counter()
            search = Search(TrainConfig(algo="ppo", episodes=args.episodes, seed=seed, init_std=std, progress=False),
                            PruneEnv(session=s, flops=0.5))
            best = search.run(args.episodes)
            model = s.build(best["ratios"])
            rows.append({"init_std": std, "seed": seed, "acc_reward": accuracy(model, s.splits.reward),
                         "acc_test": accuracy(model, s.splits.test), "best_episode": best["episode"],
                         "flops_ratio": s.measure(best["ratios"])["flops_ratio"],
                         "search_s": time.perf_counter() - t})
            print(rows[-1], flush=True)
    write_result("ppo_init_std", {"config": vars(args), "runs": rows})


if __name__ == "__main__":
    main()
