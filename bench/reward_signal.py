"""How well does each candidate reward rank pruned models by test accuracy? (the reward-signal question)

Samples allocations at one FLOPs target the way a search does (actions around the uniform centre at several
spreads, clamped into the budget by the env), builds each with adaptive BN, and scores it on the reward
split of training images with every candidate signal: top-1 accuracy on all of the split and on its first
half, cross-entropy, and KL divergence from the dense model. Test accuracy is measured only to judge the
signals. Reports Spearman's rho with test accuracy and the test accuracy of each signal's pick.

    python bench/reward_signal.py --samples 48 --target 0.5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import cifar_session, write_result
from scipy.stats import spearmanr

from envs import PruneEnv, run_episode


@torch.no_grad()
def logits(model, split) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x) for x, _ in split.batches(256)])


def signals(out: torch.Tensor, dense: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    half = len(y) // 2
    return {"acc": float((out.argmax(1) == y).float().mean()),
            "acc_half": float((out[:half].argmax(1) == y[:half]).float().mean()),
            "neg_ce": -float(F.cross_entropy(out, y)),
            "neg_kl": -float(F.kl_div(F.log_softmax(out, 1), F.log_softmax(dense, 1), log_target=True,
                                      reduction="batchmean"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--spreads", type=float, nargs="+", default=[0.3, 0.6, 1.0],
                   help="std of the Gaussian actions around the uniform centre (cycled over the samples)")
    p.add_argument("--reward-images", type=int, default=1000)
    p.add_argument("--calib-batches", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="reward_signal")
    args = p.parse_args()

    session = cifar_session(args.model, reward_images=args.reward_images, calib_batches=args.calib_batches)
    env = PruneEnv(session=session, flops=args.target, granularity="group", action_center="uniform")
    rng = np.random.default_rng(args.seed)
    y_reward = session.splits.reward.y
    dense_reward = logits(session.model, session.splits.reward)
    rows, started = [], time.perf_counter()
    for i in range(args.samples):
        spread = args.spreads[i % len(args.spreads)]
        act = (lambda _: np.zeros(1, np.float32)) if i == 0 else (
            lambda _, s=spread: np.clip(rng.normal(0, s, 1), -1, 1).astype(np.float32))
        _, info = run_episode(env, act)
        model = session.build(info["ratios"])
        row = {"spread": 0.0 if i == 0 else spread, "flops_ratio": info["flops_ratio"],
               **signals(logits(model, session.splits.reward), dense_reward, y_reward),
               "acc_test": float((logits(model, session.splits.test).argmax(1) == session.splits.test.y)
                                 .float().mean())}
        rows.append(row)
        print(f"{i:3d} spread {row['spread']:.1f} acc {row['acc']:.3f} ce {-row['neg_ce']:.3f} "
              f"kl {-row['neg_kl']:.3f} test {row['acc_test']:.3f}", flush=True)
    test = np.array([r["acc_test"] for r in rows])
    summary = {}
    for key in ("acc", "acc_half", "neg_ce", "neg_kl"):
        vals = np.array([r[key] for r in rows])
        summary[key] = {"spearman_test": float(spearmanr(vals, test).statistic),
                        "pick_acc_test": float(test[int(vals.argmax())]),
                        "top5_mean_acc_test": float(test[np.argsort(-vals)[:5]].mean())}
    summary["oracle_acc_test"] = float(test.max())
    summary["uniform_acc_test"] = float(test[0])
    for k, v in summary.items():
        print(k, v)
    write_result(args.name, {"config": vars(args), "wall_s": time.perf_counter() - started, "summary": summary,
                             "rows": rows})


if __name__ == "__main__":
    main()
