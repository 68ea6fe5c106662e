"""Transfer through the CLI with default flags: train on ResNet-20, export, apply to ResNet-56 zero-shot and with a
K-episode warm start, and zero-shot to any further models and budgets. Every command's JSON report is kept, with the
commit.

Example (from bench/, PYTHONPATH=..): python transfer_cli.py --flops 0.5 --k 20 --name transfer_cli_amd

``--zero-shot-to resnet56@0.3 resnet20@0.4`` also applies the policy zero-shot to ResNet-56 at 30% FLOPs and to
ResNet-20 at 40% (``zero_shot_to`` in the results, keyed by target); ``--k 0`` skips the warm start.
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


def parse_target(spec: str) -> tuple[str, float]:
    """``MODEL@FLOPS`` (a model of ``common.WEIGHTS``) as (model, flops)."""
    model, _, flops = spec.partition("@")
    try:
        value = float(flops)
    except ValueError:
        value = -1.0
    if model not in WEIGHTS or not 0 < value <= 1:
        raise SystemExit(f"--zero-shot-to {spec!r}: expected MODEL@FLOPS with MODEL one of {', '.join(WEIGHTS)} "
                         "and FLOPS in (0, 1]")
    return model, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source-run", help="an existing ResNet-20 train run folder to export instead of training one")
    p.add_argument("--zero-shot-to", nargs="*", default=[], metavar="MODEL@FLOPS",
                   help="further zero-shot targets, such as resnet56@0.3")
    p.add_argument("--name", required=True)
    args = p.parse_args()
    more = [parse_target(spec) for spec in args.zero_shot_to]
    data = ["--data", CIFAR, "--seed", str(args.seed), "--json"]
    results = {"commit": commit(), "config": {k: v for k, v in vars(args).items() if k != "name"}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = args.source_run
        if source is None:
            source = str(tmp / "r20")
            results["source"] = run(["train", "--model", "resnet20", "--weights", WEIGHTS["resnet20"], *data,
                                     "--flops", str(args.flops), "--out", source, "--no-progress"])
        run(["export", source, "--out", str(tmp / "policy")])
        steps = [("zero_shot", "resnet56", args.flops, [])]
        steps += [("warm_start", "resnet56", args.flops, ["--search-episodes", str(args.k)])] if args.k else []
        steps += [(f"{model}@{flops}", model, flops, []) for model, flops in more]
        for name, model, flops, extra in steps:
            report = run(["apply", str(tmp / "policy"), "--model", model, "--weights", WEIGHTS[model], *data,
                          "--flops", str(flops), *extra, "--out", str(tmp / name)])
            if "@" in name:
                results.setdefault("zero_shot_to", {})[name] = report
            else:
                results[name] = report
            t = report["transfer"]
            print(f"== {name}: test {report['acc']:.2f} (chosen {t['chosen']})", flush=True)
            write_result(args.name, results)


if __name__ == "__main__":
    main()
