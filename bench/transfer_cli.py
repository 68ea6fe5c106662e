"""Transfer through the CLI with default flags: train on ResNet-20, export, apply to ResNet-56 zero-shot and with a
K-episode warm start. Every command's JSON report is kept, with the commit.

Example (from bench/, PYTHONPATH=..): python transfer_cli.py --flops 0.5 --k 20 --name transfer_cli_amd
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

from common import CIFAR, WEIGHTS, write_result
from methods import commit

from agent.cli import main as cli


def run(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(argv)
    if code != 0:
        raise SystemExit(f"prunepilot {' '.join(argv)} exited {code}")
    return json.loads(out.getvalue()) if "--json" in argv else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source-run", help="an existing ResNet-20 train run folder to export instead of training one")
    p.add_argument("--name", required=True)
    args = p.parse_args()
    data = ["--data", CIFAR, "--flops", str(args.flops), "--seed", str(args.seed), "--json"]
    results = {"commit": commit(), "config": {k: v for k, v in vars(args).items() if k != "name"}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = args.source_run
        if source is None:
            source = str(tmp / "r20")
            results["source"] = run(["train", "--model", "resnet20", "--weights", WEIGHTS["resnet20"], *data,
                                     "--out", source, "--no-progress"])
        run(["export", source, "--out", str(tmp / "policy")])
        target = ["--model", "resnet56", "--weights", WEIGHTS["resnet56"], *data]
        for name, extra in (("zero_shot", []), ("warm_start", ["--search-episodes", str(args.k)])):
            report = run(["apply", str(tmp / "policy"), *target, *extra, "--out", str(tmp / name)])
            results[name] = report
            t = report["transfer"]
            print(f"== {name}: test {report['acc']:.2f} (chosen {t['chosen']})", flush=True)
            write_result(args.name, results)


if __name__ == "__main__":
    main()
