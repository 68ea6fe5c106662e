"""How far each kept model of the results table's ``train`` rows leads uniform on its own run's reward and select
images, in standard errors of the paired difference: the test ``train`` and ``apply`` now make before they leave
uniform (``--uniform-z``, :func:`envs.uniform_test`). A run whose lead is within the threshold would now keep uniform.
With ``--transfer``, the same for ``bench/transfer_cli.py``'s zero-shot and warm-start ``apply`` runs.

Each kept model and uniform are rebuilt as the commands build them (refitted, on the run's seed's images; the kept
model's test accuracy is checked against its file).

Example (from bench/, PYTHONPATH=..): python uniform_lead.py methods_r20_05_screen_amd --name uniform_lead_amd
"""

from __future__ import annotations

import argparse
import json

from common import RESULTS, cifar_session, write_result
from methods import commit
from render_methods import merged

from agent.config import TrainConfig
from envs import PruneEnv, uniform_test
from pruning_core import accuracy, uniform_ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", help="methods results files in bench/results/, without .json (merged as "
                                            "render_methods.py merges them)")
    p.add_argument("--methods", nargs="+", default=["train", "train-120"], help="the rows to test (labels as in the "
                                                                                "results table)")
    p.add_argument("--transfer", nargs="*", default=[], metavar="NAME",
                   help="transfer_cli.py results files: test their zero-shot and warm-start kept models too")
    p.add_argument("--z", type=float, default=TrainConfig.uniform_z)
    p.add_argument("--name", required=True)
    args = p.parse_args()
    at = commit()
    sessions, out = {}, {}

    def tested(model: str, target: float, seed: int, ratios: dict, acc_test: float,
               round_to: int | None = None) -> dict:
        """The kept model (checked against its test accuracy) against uniform on ``seed``'s images."""
        if (model, seed) not in sessions:
            sessions[(model, seed)] = cifar_session(model, select_images=1000, seed=seed, reconstruct=True)
        s = sessions[(model, seed)]
        kept, _ = s.build_final(ratios, round_to)
        assert abs(accuracy(kept, s.splits.test) - acc_test) < 1e-6, (model, target, seed, acc_test)
        uniform = uniform_ratios(s.trace, target, TrainConfig.max_ratio, round_to)
        test = uniform_test(PruneEnv(session=s, flops=target, round_to=round_to), ratios, uniform, args.z, True)
        return {"seed": seed, **test, "z_score": test["lead"] / test["se"] if test["se"] > 0 else 0.0}

    for (model, target), methods in merged(args.names).items():
        for method, (entry, run_commit, _) in methods.items():
            if method not in args.methods:
                continue
            runs = []
            for run in entry["runs"]:
                runs.append({**tested(model, float(target), run["seed"], run["ratios"], run["acc_test"]),
                             "chosen": run["chosen"]})
                show(f"{model} {target} {method} seed {run['seed']}", runs[-1])
            out.setdefault(model, {}).setdefault(target, {})[method] = {"commit": run_commit, "runs": runs}
            write_result(args.name, {"commit": at, "config": vars(args), "models": out})
    for name in args.transfer:
        res = json.loads((RESULTS / f"{name}.json").read_text())
        for step in [step for step in ("zero_shot", "warm_start") if step in res]:  # --k 0: no warm start
            report, seed = res[step], res["config"]["seed"]
            row = {**tested(report["model"], res["config"]["flops"], seed, report["ratios"], report["acc"],
                            report.get("round_to")), "chosen": report["transfer"]["chosen"], "commit": res["commit"]}
            out.setdefault("transfer", {}).setdefault(name, {})[step] = row
            show(f"{name} {step} seed {seed}", row)
            write_result(args.name, {"commit": at, "config": vars(args), "models": out})


def show(label: str, row: dict) -> None:
    print(f"{label}: lead {row['lead']:+.2f} +- {row['se']:.2f} ({row['z_score']:.1f} se) -> {row['kept']}", flush=True)


if __name__ == "__main__":
    main()
