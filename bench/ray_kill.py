"""A Ray actor killed during a search: random search on the shared ResNet-56 with 2 actors on a local cluster, one
of them killed (SIGKILL) as the second batch of evaluations starts, against the same search evaluated in process.

    python ray_kill.py --evaluations 16 --name ray_kill_r56_amd
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import ray
from common import cifar_session, write_result
from methods import commit

from envs import PruneEnv, evaluation_workers, random_search
from pruning_core.ray_pool import RayPool


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evaluations", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="ray_kill")
    args = p.parse_args()
    launched = commit()
    session = cifar_session("resnet56", reconstruct=True)
    plain = PruneEnv(session=session, flops=0.5)
    t = time.perf_counter()
    expected = random_search(plain, 100 * args.evaluations, args.seed, args.evaluations)
    plain_s = time.perf_counter() - t
    ray.init(include_dashboard=False, log_to_driver=False)
    calls, accuracies = [], RayPool.accuracies

    def kill_on_second_batch(pool, jobs):
        calls.append(len(jobs))
        if len(calls) == 2:
            os.kill(pool.pids[0], signal.SIGKILL)
        return accuracies(pool, jobs)

    RayPool.accuracies = kill_on_second_batch
    env = PruneEnv(session=session, flops=0.5)
    t = time.perf_counter()
    with evaluation_workers(env, 2, ray="auto") as pool:
        found = random_search(env, 100 * args.evaluations, args.seed, args.evaluations)
        restarts = pool.restarts
    ray_s = time.perf_counter() - t
    ray.shutdown()
    rewards = {k: r for k, (r, _) in plain.cache.items()}
    row = {"evaluations_plain": len(plain.cache), "evaluations_ray": len(env.cache), "actor_restarts": restarts,
           "best_reward_plain": expected["reward"], "best_reward_ray": found["reward"],
           "same_best": found["kept"] == expected["kept"],
           "same_rewards": {k: r for k, (r, _) in env.cache.items()} == rewards,
           "episodes": [expected["episodes"], found["episodes"]], "plain_s": round(plain_s, 1),
           "ray_s": round(ray_s, 1)}
    print(row, flush=True)
    write_result(args.name, {"commit": launched, "config": vars(args), "row": row})


if __name__ == "__main__":
    main()
