"""Which images should a search score candidates on? Rank agreement with the exact test images.

Candidates: distinct allocations of a random search in the agent's default action space, plus the uniform, centre and
global allocations, all at one FLOPs target. Each is scored as the kept model is built (refitted) on:

- ``train``: the select split, exact training images the pretrained network memorised;
- ``unseen``: CIFAR-10 JPEG test images minus the twins of the exact test images (never seen, but JPEG-shifted);
- ``reward_plain``: the reward split without the refit, what the search itself optimises;
- ``reward_refit``: the reward split, refitted;

and the Spearman correlation of each with the accuracy on the 1,017 exact test images is reported, over all
candidates and over the ten best on test (the finalists a search's selection has to order), with the test accuracy
of each proxy's top candidate.

Example (from bench/, PYTHONPATH=..): python val_split.py --models resnet20 resnet56 --name val_split_amd
"""

from __future__ import annotations

import argparse

from common import cifar_session, unseen_split, write_result
from methods import commit
from scipy.stats import spearmanr

from envs import PruneEnv, floor_allocations, random_search
from pruning_core import accuracy

PROXIES = ("train", "unseen", "reward_plain", "reward_refit")


def measure(model: str, target: float, args: argparse.Namespace) -> dict:
    session = cifar_session(model, select_images=1000)
    unseen = unseen_split(session, args.unseen_images)
    env = PruneEnv(session=session, flops=target)
    floor_allocations(env, ("uniform", "centre", "global"))
    random_search(env, 100 * args.candidates, seed=0, evaluations=args.candidates + 3)
    rows = []
    for _, info in env.cache.values():
        plain = session.build(info["ratios"])
        refit = session.build(info["ratios"], reconstruct=True)
        rows.append({"reward_plain": accuracy(plain, session.splits.reward),
                     "reward_refit": accuracy(refit, session.splits.reward),
                     "train": accuracy(refit, session.splits.select), "unseen": accuracy(refit, unseen),
                     "test": accuracy(refit, session.splits.test), "flops_ratio": info["flops_ratio"]})
    test = [r["test"] for r in rows]
    finalists = sorted(range(len(rows)), key=test.__getitem__)[-10:]
    out = {"candidates": len(rows), "unseen_images": len(unseen), "rows": rows}
    for proxy in PROXIES:
        values = [r[proxy] for r in rows]
        out[proxy] = {"spearman": float(spearmanr(values, test).statistic),
                      "spearman_top10": float(spearmanr([values[i] for i in finalists],
                                                        [test[i] for i in finalists]).statistic),
                      "top_test": test[max(range(len(rows)), key=values.__getitem__)]}
    out["best_test"] = max(test)
    print(f"== {model} {target}: " + "  ".join(f"{p} rho {out[p]['spearman']:.3f} top10 {out[p]['spearman_top10']:.3f} "
                                              f"top {out[p]['top_test']:.2f}" for p in PROXIES)
          + f"  (best {out['best_test']:.2f})", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--targets", nargs="+", type=float, default=[0.5])
    p.add_argument("--candidates", type=int, default=30, help="random-search allocations besides the floor's 3")
    p.add_argument("--unseen-images", type=int, default=2000)
    p.add_argument("--name", required=True)
    args = p.parse_args()
    results = {"commit": commit(), "config": {k: v for k, v in vars(args).items() if k != "name"}, "models": {}}
    for model in args.models:
        results["models"][model] = {str(t): measure(model, t, args) for t in args.targets}
        write_result(args.name, results)


if __name__ == "__main__":
    main()
