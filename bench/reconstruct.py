"""What least-squares reconstruction (``SessionConfig.reconstruct``) does to models other searches kept.

Every kept model of the given search results files is rebuilt twice from its ratios, with the same Taylor scores,
calibration images and adaptive BN: as the search built it, and with every conv and linear layer refitted to the
dense model's outputs first. Both are scored on the reward split, the select split and the test images (reporting
only); the plain rebuild must reproduce the file's own test accuracy. The architecture is the same, so latency is
unchanged. With ``--finetune-epochs`` the refitted models of the rows that ``--finetune`` matches also get the
shared fine-tune recipe (1 epoch of SGD with KD from the dense model on the training images).

    python bench/reconstruct.py --results search_substage_r8_drop_amd search_substage_r8_drop_s345_amd \\
        --name reconstruct_r8_drop_amd
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

from common import RESULTS, cifar_session, labelled_runs, write_result

from pruning_core import accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", nargs="+", required=True, metavar="NAME", help="search results files in bench/results")
    p.add_argument("--model", default="resnet56")
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--finetune", default=".", metavar="REGEX", help="rows to fine-tune (default: every row)")
    p.add_argument("--name", default="reconstruct")
    args = p.parse_args()
    paths = [RESULTS / f"{name}.json" for name in args.results]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        p.error(f"no such results file: {', '.join(missing)}")
    session = cifar_session(args.model)
    rows = {}
    for label, run, _ in labelled_runs(paths):
        row = {"source_acc_test": run["acc_test"], "round_to": run.get("round_to"), "ratios": run["ratios"]}
        for key in ("plain", "refit"):
            timings = {}
            model = session.build(run["ratios"], run.get("round_to"), timings=timings, reconstruct=key == "refit")
            row[key] = {split: accuracy(model, session.split(split)) for split in ("reward", "select", "test")}
            row[key]["build_s"] = sum(timings.values())
        if args.finetune_epochs and re.search(args.finetune, label):
            t = time.perf_counter()
            model = session.finetune(model, args.finetune_epochs)
            row["refit"]["test_finetuned"] = accuracy(model, session.splits.test)
            row["refit"]["finetune_s"] = time.perf_counter() - t
        rows[label] = row
        print(f"{label}: test {row['plain']['test']:.2f} -> {row['refit']['test']:.2f} (file {run['acc_test']:.2f}), "
              f"reward {row['plain']['reward']:.1f} -> {row['refit']['reward']:.1f}, select "
              f"{row['plain']['select']:.1f} -> {row['refit']['select']:.1f}, refit build "
              f"{row['refit']['build_s']:.1f}s"
              + (f", fine-tuned {row['refit']['test_finetuned']:.2f}" if "test_finetuned" in row["refit"] else ""),
              flush=True)
    mismatched = [label for label, r in rows.items() if abs(r["plain"]["test"] - r["source_acc_test"]) > 1e-6]
    gains = [r["refit"]["test"] - r["plain"]["test"] for r in rows.values()]
    summary = {"rows": len(rows), "test_gain_mean": statistics.mean(gains), "test_gain_min": min(gains),
               "test_gain_max": max(gains), "plain_differs_from_file": mismatched}
    print(json.dumps(summary, indent=1))
    write_result(args.name, {"config": vars(args), "dense": {"acc_test": session.dense_accuracy("test")},
                             "reconstruction": {"images": session.config.reconstruct_images}, "summary": summary,
                             "rows": rows})


if __name__ == "__main__":
    main()
