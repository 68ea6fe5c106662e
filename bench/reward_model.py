"""How well the search's reward model predicts: evaluate N random episodes of train's action space, fit the
reward model (envs.RewardModel) on the first n, and rank-correlate its predictions with the rewards of the rest.

With ``--table-points K`` the sensitivity table (K ratios per decision, as train's floor measures it) is evaluated
first and joins every fit, which is then made with and without the table's additive prior (``RewardModel``'s
``table_prior``); the rows also give the rank correlation over the best quarter of the rest, where the search picks.

Example (from bench/, PYTHONPATH=..): python reward_model.py --model resnet20 --flops 0.5 --episodes 120 --workers 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import cifar_session, write_result
from methods import commit
from scipy.stats import spearmanr

from envs import PruneEnv, RewardModel, evaluation_workers, run_episodes, sensitivity_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--episodes", type=int, default=120)
    p.add_argument("--fit", nargs="+", type=int, default=[10, 20, 40, 60, 80])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--table-points", type=int, default=0, help="evaluate the sensitivity table first (0: none)")
    p.add_argument("--name", default=None)
    args = p.parse_args()
    sha = commit()  # at launch: the code that runs
    session = cifar_session(args.model, select_images=1000, seed=args.seed, reconstruct=True)
    env = PruneEnv(session=session, flops=args.flops)  # train's default action space
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    with evaluation_workers(env, args.workers):
        tables = sensitivity_table(env, args.table_points) if args.table_points else []
        table = [(env.allocation([r if i == t else 0.0 for i in range(env.num_steps)]), acc / 100.0)
                 for t, rows in enumerate(tables) for r, acc in rows]
        ends = run_episodes(env, lambda _: rng.uniform(-1, 1, 1).astype(np.float32), args.episodes)
    kept = [info["kept"] for _, info in ends]
    rewards = np.array([reward for reward, _ in ends])
    rows = [fit_row(env, table, kept, rewards, n, prior) for n in args.fit for prior in ([False, True] if table
                                                                                       else [False])]
    name = args.name or f"reward_model_{args.model}_{args.flops}"
    write_result(name, {"commit": sha, "config": vars(args), "steps": env.num_steps,
                        "evaluate_s": time.perf_counter() - started, "rows": rows})


def fit_row(env: PruneEnv, table: list, kept: list, rewards: np.ndarray, n: int, prior: bool) -> dict:
    """Fit on ``table`` and the first ``n`` episodes, predict the rest: rank correlation over all of them and over
    their best quarter, and the reward of the top pick."""
    model = RewardModel(env, table_prior=prior).fit([k for k, _ in table] + kept[:n],
                                                    [r for _, r in table] + list(rewards[:n]))
    mean, _ = model.predict(kept[n:])
    rest, top = rewards[n:], int(np.argmax(mean))
    best = rest >= np.quantile(rest, 0.75)
    row = {"fit": n, "table": len(table), "table_prior": prior, "spearman": float(spearmanr(mean, rest)[0]),
           "spearman_top_quarter": float(spearmanr(mean[best], rest[best])[0]),
           "top_predicted_reward": float(rest[top]), "best_held_out": float(rest.max()),
           "best_seen": float(rewards[:n].max())}
    print(f"fit on {len(table)} + {n}{' with the table prior' if prior else ''}: Spearman {row['spearman']:.3f} on "
          f"the other {len(rest)} ({row['spearman_top_quarter']:.3f} on their best quarter); its top pick "
          f"{row['top_predicted_reward']:.4f} (best held out {row['best_held_out']:.4f})", flush=True)
    return row


if __name__ == "__main__":
    main()
