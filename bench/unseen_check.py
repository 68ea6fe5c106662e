"""Every kept model of the results table, re-measured on the ~9,000 CIFAR-10 images the networks never saw.

The 1,017 exact test images resolve about 1.3 points per model; two methods that differ by less are not told apart
there. This rebuilds each kept model of the methods runs as ``bench/methods.py`` built it (the run's seed draws its
calibration images, so the same refitted model; its test accuracy is checked against the file) and scores it on
the JPEG test images minus the twins of the exact test images (``common.unseen_split``, all of them), the
validation images the protocol allows choices on. Per method it reports the mean test and unseen accuracy, and per
seed the paired difference of ``train`` rows against random search.

Example (from bench/, PYTHONPATH=..): python unseen_check.py methods_r20_05_screen_amd methods_r56_05_screen_amd \
    --name unseen_check_amd
"""

from __future__ import annotations

import argparse
import statistics

from common import cifar_session, unseen_split, write_result
from methods import commit
from render_methods import merged

from pruning_core import accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", help="methods results files in bench/results/, without .json (merged as "
                                            "render_methods.py merges them)")
    p.add_argument("--name", required=True)
    args = p.parse_args()
    sessions, unseen, out = {}, {}, {}
    for (model, target), methods in merged(args.names).items():
        block = out.setdefault(model, {}).setdefault(target, {})
        for method, (entry, run_commit, _) in methods.items():
            runs = []
            for run in entry.get("runs", [entry]):
                seed = run.get("seed", 0)
                if (model, seed) not in sessions:
                    sessions[(model, seed)] = cifar_session(model, select_images=1000, seed=seed, reconstruct=True)
                session = sessions[(model, seed)]
                if model not in unseen:  # and the dense network's accuracy there, for scale
                    unseen[model] = unseen_split(session)
                    out[model]["dense"] = {"acc_test": accuracy(session.model, session.splits.test),
                                           "acc_unseen": accuracy(session.model, unseen[model])}
                    print(f"{model} dense test {out[model]['dense']['acc_test']:.2f}  "
                          f"unseen {out[model]['dense']['acc_unseen']:.2f}", flush=True)
                kept, _ = session.build_final(run["ratios"])
                test = accuracy(kept, session.splits.test)
                assert abs(test - run["acc_test"]) < 1e-6, (model, target, method, seed, test, run["acc_test"])
                runs.append({"seed": seed, "acc_test": test, "acc_unseen": accuracy(kept, unseen[model])})
            block[method] = {"commit": run_commit, "runs": runs,
                             "acc_test": statistics.mean(r["acc_test"] for r in runs),
                             "acc_unseen": statistics.mean(r["acc_unseen"] for r in runs)}
            print(f"{model} {target} {method:16s} test {block[method]['acc_test']:.2f}  "
                  f"unseen {block[method]['acc_unseen']:.2f}  ({len(runs)} runs)", flush=True)
        for method in [m for m in block if m.startswith("train")]:
            for other in [m for m in block if m.startswith("random")]:
                mine = {r["seed"]: r for r in block[method]["runs"]}
                diffs = [mine[r["seed"]]["acc_unseen"] - r["acc_unseen"] for r in block[other]["runs"]
                         if r["seed"] in mine]
                if diffs:
                    block[method][f"minus_{other}_unseen"] = diffs
                    print(f"   {method} - {other} on unseen, per seed: " + " ".join(f"{d:+.2f}" for d in diffs)
                          + f"  (mean {statistics.mean(diffs):+.2f})", flush=True)
        write_result(args.name, {"commit": commit(), "config": {"names": args.names,
                                                                "unseen_images": len(next(iter(unseen.values())).y)},
                                 "models": out})


if __name__ == "__main__":
    main()
