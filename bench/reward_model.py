"""How well the search's reward model predicts: evaluate N random episodes of train's action space, fit the
reward model (envs.RewardModel) on the first n, and rank-correlate its predictions with the rewards of the rest.

Example (from bench/, PYTHONPATH=..): python reward_model.py --model resnet20 --flops 0.5 --episodes 120 --workers 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import cifar_session, write_result
from methods import commit
from scipy.stats import spearmanr

from envs import PruneEnv, RewardModel, evaluation_workers, run_episodes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--episodes", type=int, default=120)
    p.add_argument("--fit", nargs="+", type=int, default=[10, 20, 40, 60, 80])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--name", default=None)
    args = p.parse_args()
    sha = commit()  # at launch: the code that runs
    session = cifar_session(args.model, select_images=1000, seed=args.seed, reconstruct=True)
    env = PruneEnv(session=session, flops=args.flops)  # train's default action space
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    with evaluation_workers(env, args.workers):
        ends = run_episodes(env, lambda _: rng.uniform(-1, 1, 1).astype(np.float32), args.episodes)
    kept = [info["kept"] for _, info in ends]
    rewards = np.array([reward for reward, _ in ends])
    rows = []
    for n in args.fit:
        model = RewardModel(env).fit(kept[:n], rewards[:n])
        mean, _ = model.predict(kept[n:])
        top = int(np.argmax(mean))
        rows.append({"fit": n, "spearman": float(spearmanr(mean, rewards[n:])[0]),
                     "top_predicted_reward": float(rewards[n:][top]), "best_held_out": float(rewards[n:].max()),
                     "best_seen": float(rewards[:n].max())})
        print(f"fit on {n}: Spearman {rows[-1]['spearman']:.3f} on the other {len(kept) - n}; its top pick "
              f"{rows[-1]['top_predicted_reward']:.4f} (best held out {rows[-1]['best_held_out']:.4f})", flush=True)
    name = args.name or f"reward_model_{args.model}_{args.flops}"
    write_result(name, {"commit": sha, "config": vars(args), "steps": env.num_steps,
                        "evaluate_s": time.perf_counter() - started, "rows": rows})


if __name__ == "__main__":
    main()
