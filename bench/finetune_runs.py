"""Fine-tune every seed of a search result that was not fine-tuned yet, and write the result back.

``search.py`` fine-tunes the first seed of each multi-seed method only (each fine-tune costs about 40 s here).
This completes ``acc_test_finetuned`` for the other seeds with the same recipe and the same session settings
(same Taylor scores, calibration images and fine-tune seed), and recomputes the summaries.

    python bench/finetune_runs.py search_0.5 search_0.3
"""

from __future__ import annotations

import argparse
import json
import time

from common import RESULTS, cifar_session
from search import SUMMARY_KEYS, summarise

from pruning_core import accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", help="result names in bench/results (without .json)")
    args = p.parse_args()
    for name in args.names:
        path = RESULTS / f"{name}.json"
        res = json.loads(path.read_text())
        c = res["config"]
        session = cifar_session(c["model"], reward_images=c["reward_images"], calib_batches=c["calib_batches"])
        for target, rows in res["targets"].items():
            for method, row in rows.items():
                for run in row.get("runs", []):
                    if "acc_test_finetuned" in run:
                        continue
                    t = time.perf_counter()
                    model = session.build(run["ratios"], run.get("round_to"))
                    model = session.finetune(model, c["finetune_epochs"])
                    run["acc_test_finetuned"] = accuracy(model, session.splits.test)
                    run["finetune_s"] = time.perf_counter() - t
                    print(f"{name} {target} {method} seed {run['seed']}: fine-tuned {run['acc_test_finetuned']:.2f}",
                          flush=True)
                if "runs" in row:
                    row["summary"] = summarise(row["runs"], SUMMARY_KEYS)
        path.write_text(json.dumps(res, indent=2) + "\n")  # same machine block and date: the runs are completed,
        print(f"wrote {path}")                                 # not re-run


if __name__ == "__main__":
    main()
