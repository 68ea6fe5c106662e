"""Cost of PruneEnv episodes on the shared ResNet-56: episodes per minute and where the time goes.

    python bench/env_cost.py --episodes 10
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import cifar_session, write_result

from envs import PruneEnv, run_episode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--reward-images", type=int, default=1000)
    p.add_argument("--calib-batches", type=int, default=10)
    args = p.parse_args()
    session = cifar_session("resnet56", reward_images=args.reward_images, calib_batches=args.calib_batches)
    env = PruneEnv(session=session, flops=0.5, granularity="group", action_center="uniform")  # as measured
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(args.episodes):
        run_episode(env, lambda _: rng.uniform(-1, 1, 1).astype(np.float32))
    wall = time.perf_counter() - started
    split = {k: env.timings[k] for k in ("prune_s", "adapt_s", "eval_s")}
    split["other_s"] = wall - sum(split.values())
    result = {"config": vars(args), "wall_s": wall, "episodes_per_min": 60 * args.episodes / wall,
              "share": {k: v / wall for k, v in split.items()}, "seconds": split,
              "unique_evaluations": len(env.cache), "setup": session.timings}
    print(result)
    write_result("env_cost", result)


if __name__ == "__main__":
    main()
