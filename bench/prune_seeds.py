"""``prunepilot prune`` through the CLI for some methods and seeds on one model and budget; every JSON report is kept.

The seed draws the reward, calibration and select images, as ``train --seed`` and ``apply --seed`` do, so these are the
baselines of a seeded run on its own images (uniform and sensitivity for ``bench/transfer_cli.py``'s seeds).

Example (from bench/, PYTHONPATH=..):
    python prune_seeds.py --model resnet56 --flops 0.5 --methods sensitivity --seeds 2 3 --name prune_r56_05_amd
"""

from __future__ import annotations

import argparse

from common import CIFAR, WEIGHTS, write_result
from methods import commit
from transfer_cli import run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--methods", nargs="+", default=["uniform", "sensitivity"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--name", required=True)
    args = p.parse_args()
    results = {"commit": commit(), "config": {k: v for k, v in vars(args).items() if k != "name"}, "reports": {}}
    for method in args.methods:
        for seed in args.seeds:
            report = run(["prune", "--model", args.model, "--weights", WEIGHTS[args.model], "--data", CIFAR,
                          "--flops", str(args.flops), "--seed", str(seed), "--method", method, "--json"])
            results["reports"].setdefault(method, {})[str(seed)] = report
            print(f"== {method} seed {seed}: test {report['acc']:.2f}", flush=True)
            write_result(args.name, results)


if __name__ == "__main__":
    main()
