"""How far each kept model of the results table's ``train`` rows leads uniform on its own run's reward and select
images, in standard errors of the paired difference: the test ``train`` and ``apply`` now make before they leave
uniform (``--uniform-z``, :func:`envs.uniform_test`). A run whose lead is within the threshold would now keep uniform.

Each kept model and uniform are rebuilt as the commands build them (refitted, on the run's seed's images; the kept
model's test accuracy is checked against its file).

Example (from bench/, PYTHONPATH=..): python uniform_lead.py methods_r20_05_screen_amd --name uniform_lead_amd
"""

from __future__ import annotations

import argparse

from common import cifar_session, write_result
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
    p.add_argument("--z", type=float, default=TrainConfig.uniform_z)
    p.add_argument("--name", required=True)
    args = p.parse_args()
    at = commit()
    sessions, out = {}, {}
    for (model, target), methods in merged(args.names).items():
        for method, (entry, run_commit, _) in methods.items():
            if method not in args.methods:
                continue
            runs = []
            for run in entry["runs"]:
                seed = run["seed"]
                if (model, seed) not in sessions:
                    sessions[(model, seed)] = cifar_session(model, select_images=1000, seed=seed, reconstruct=True)
                s = sessions[(model, seed)]
                env = PruneEnv(session=s, flops=float(target))
                kept, _ = s.build_final(run["ratios"])
                assert abs(accuracy(kept, s.splits.test) - run["acc_test"]) < 1e-6, (model, target, method, seed)
                uniform = uniform_ratios(s.trace, float(target), TrainConfig.max_ratio)
                test = uniform_test(env, run["ratios"], uniform, args.z, reconstruct=True)
                runs.append({"seed": seed, "chosen": run["chosen"], **test, "z_score": test["lead"] / test["se"]})
                print(f"{model} {target} {method:14s} seed {seed}: lead {test['lead']:+.2f} +- {test['se']:.2f} "
                      f"({runs[-1]['z_score']:.1f} se) -> {test['kept']}", flush=True)
            out.setdefault(model, {}).setdefault(target, {})[method] = {"commit": run_commit, "runs": runs}
            write_result(args.name, {"commit": at, "config": {"names": args.names, "z": args.z}, "models": out})


if __name__ == "__main__":
    main()
