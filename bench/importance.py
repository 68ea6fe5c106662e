"""Each channel criterion against the oracle: Spearman correlation with the loss change of removing one channel.

For every channel of every prunable group, the oracle is the squared change in cross-entropy when that channel's
gate (its BN's gamma and beta, or its filter where the group has no BN) is zeroed, measured on CIFAR-10 JPEG test
images the network never saw (its training images give near-zero loss). The criteria (first- and second-order
Taylor, L1, DRIVE) are computed on the same images. The oracle is stored in the results, and ``--oracle-from``
reuses it (the same model, images and seed) to score more criteria without measuring it again. Correlations are
pooled over the network (as Molchanov et al. 2019 report theirs, >93% on ImageNet ResNets) and per group.

Example (from bench/, PYTHONPATH=..):
    python importance.py --models resnet20 --images 512 --name importance_r20_amd
    python importance.py --models resnet20 --images 512 --criteria drive --oracle-from importance_r20_amd ...
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from common import RESULTS, cifar_session, unseen_split, write_result
from methods import commit

from pruning_core.importance import DriveImportance, L1Importance, Taylor2Importance, TaylorImportance

CRITERIA = ("taylor", "taylor2", "l1", "drive")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def mean_loss(model, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    return sum(float(F.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="sum"))
               for i in range(0, len(y), batch)) / len(y)


def oracle(session, x, y) -> dict[str, torch.Tensor]:
    """Per group and channel: (loss with that channel's gate zeroed - dense loss)^2."""
    model, trace = session.model.eval(), session.trace
    modules = dict(model.named_modules())
    base = mean_loss(model, x, y)
    out = {}
    for g in trace.groups:
        outs = [m.module for m in g.members if m.dim == "out"]
        gates = [n for n in outs if trace.layers[n].kind == "bn" and trace.has_bias.get(n)] or \
                [n for n in outs if trace.layers[n].weighted]
        members = {m.module: m for m in g.members if m.dim == "out"}
        deltas = torch.zeros(g.channels, dtype=torch.float64)
        for c in range(g.channels):
            saved = []
            for n in gates:
                idx = torch.tensor(members[n].index[c])
                for p in (modules[n].weight, modules[n].bias):
                    if p is not None:
                        saved.append((p, idx, p.data[idx].clone()))
                        p.data[idx] = 0
            deltas[c] = (mean_loss(model, x, y) - base) ** 2
            for p, idx, value in saved:
                p.data[idx] = value
        out[g.name] = deltas
    return out


def run_model(name: str, args: argparse.Namespace) -> dict:
    session = cifar_session(name)
    unseen = unseen_split(session, limit=args.images, seed=0)
    x, y = unseen.normalise(unseen.x), unseen.y
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64)]
    stored = None
    if args.oracle_from:
        stored = json.loads((RESULTS / f"{args.oracle_from}.json").read_text())["models"][name]
        if stored.get("images") != len(y):
            raise SystemExit(f"{args.oracle_from} measured its oracle on {stored.get('images')} images, not {len(y)}")
    t = time.perf_counter()
    truth = ({g: torch.tensor(v, dtype=torch.float64) for g, v in stored["oracle"].items()} if stored
             else oracle(session, x, y))
    rows = {"images": len(y), "oracle_s": stored["oracle_s"] if stored else time.perf_counter() - t,
            "dense_loss": mean_loss(session.model, x, y), "criteria": {},
            "oracle": {g: v.tolist() for g, v in truth.items()}}
    make = {"taylor": lambda: TaylorImportance(len(batches)),
            "taylor2": lambda: Taylor2Importance(len(batches), probes=args.probes),
            "l1": L1Importance, "drive": lambda: DriveImportance(len(batches))}
    for label in args.criteria:
        criterion = make[label]()
        t = time.perf_counter()
        scores = criterion(session.model, batches, session.trace)
        seconds = time.perf_counter() - t
        pooled = spearman(torch.cat([scores[g] for g in truth]), torch.cat([truth[g] for g in truth]))
        per_group = {g: spearman(scores[g], truth[g]) for g in truth}
        rows["criteria"][label] = {"spearman_pooled": pooled, "spearman_per_group": per_group,
                                   "spearman_group_mean": sum(per_group.values()) / len(per_group), "time_s": seconds}
        mean = rows["criteria"][label]["spearman_group_mean"]
        print(f"{name} {label}: pooled {pooled:.3f}, per-group mean {mean:.3f} ({seconds:.1f} s)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20"])
    p.add_argument("--images", type=int, default=512, help="unseen JPEG test images for criteria and oracle")
    p.add_argument("--probes", type=int, default=4, help="Hutchinson probes per minibatch for taylor2")
    p.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA))
    p.add_argument("--oracle-from", metavar="NAME", help="results file (bench/results/NAME.json) whose oracle to reuse")
    p.add_argument("--name", required=True)
    args = p.parse_args()
    results = {"commit": commit(), "config": {k: v for k, v in vars(args).items() if k != "name"}, "models": {}}
    for name in args.models:
        results["models"][name] = run_model(name, args)
        write_result(args.name, results)


if __name__ == "__main__":
    main()
