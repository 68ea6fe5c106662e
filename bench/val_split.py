"""Which images should a search score candidates on? Rank agreement with the exact test images.

Candidates: distinct allocations of a random search in the agent's default action space, plus the uniform, centre and
global allocations, all at one FLOPs target. Each is scored as the kept model is built (refitted) on:

- ``train``: the select split, exact training images the pretrained network memorised;
- ``unseen``: CIFAR-10 JPEG test images minus the twins of the exact test images (never seen, but JPEG-shifted);
- ``reward_plain``: the reward split without the refit, what the search itself optimises;
- ``reward_refit``: the reward split, refitted;
- ``reward_loss``: the reward split's mean cross-entropy (negated), refitted: a finer-grained reward than accuracy;
- ``both_refit`` / ``both_loss``: accuracy / negated loss on the reward and select splits together, refitted;

and the Spearman correlation of each with the accuracy on the 1,017 exact test images is reported, over all
candidates and over the ten best on test (the finalists a search's selection has to order), with the test accuracy
of each proxy's top candidate; likewise against the unseen images (``vs_unseen``) for every proxy but ``unseen``.

Example (from bench/, PYTHONPATH=..): python val_split.py --models resnet20 resnet56 --name val_split_amd
"""

from __future__ import annotations

import argparse

from common import cifar_session, unseen_split, write_result
from methods import commit
from scipy.stats import spearmanr

from envs import PruneEnv, floor_allocations, random_search
from pruning_core import accuracy
from pruning_core.evaluate import mean_loss

PROXIES = ("train", "unseen", "reward_plain", "reward_refit", "reward_loss", "both_refit", "both_loss")


def agreement(rows: list[dict], proxy: str, target: str) -> dict:
    """Spearman of ``proxy`` with ``target`` over all rows and over the ten best on ``target``, and the ``target``
    value of the proxy's top row and the mean over its top three."""
    values, truth = [r[proxy] for r in rows], [r[target] for r in rows]
    finalists = sorted(range(len(rows)), key=truth.__getitem__)[-10:]
    by_proxy = sorted(range(len(rows)), key=values.__getitem__)
    return {"spearman": float(spearmanr(values, truth).statistic),
            "spearman_top10": float(spearmanr([values[i] for i in finalists], [truth[i] for i in finalists]).statistic),
            "top_test": truth[by_proxy[-1]], "top3_mean": sum(truth[i] for i in by_proxy[-3:]) / 3}


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
        sp = session.splits
        row = {"reward_plain": accuracy(plain, sp.reward), "reward_refit": accuracy(refit, sp.reward),
               "train": accuracy(refit, sp.select), "reward_loss": -mean_loss(refit, sp.reward),
               "select_loss": -mean_loss(refit, sp.select), "unseen": accuracy(refit, unseen),
               "test": accuracy(refit, sp.test), "flops_ratio": info["flops_ratio"]}
        n_r, n_s = len(sp.reward), len(sp.select)
        row["both_refit"] = (row["reward_refit"] * n_r + row["train"] * n_s) / (n_r + n_s)
        row["both_loss"] = (row["reward_loss"] * n_r + row["select_loss"] * n_s) / (n_r + n_s)
        rows.append(row)
    out = {"candidates": len(rows), "unseen_images": len(unseen), "rows": rows}
    for proxy in PROXIES:
        out[proxy] = agreement(rows, proxy, "test")
        if proxy != "unseen":
            out[proxy]["vs_unseen"] = agreement(rows, proxy, "unseen")
    out["best_test"] = max(r["test"] for r in rows)
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
