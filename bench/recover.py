"""Recovery by fine-tuning: ResNet-56 at 50% FLOPs, fine-tuned on the 50,000 CIFAR-10 JPEG training images plus the
5,085 exact ones, tested on the 1,017 exact test images.

Rows are allocations (uniform, the default search's kept one, random search's; from
``bench/results/methods_r56_05_amd.json``) under a schedule (oneshot, spp, drive); ``dense`` fine-tunes the unpruned
model, the check that JPEG images do not lower exact-image accuracy. Each (row, epochs, seed) is its own run with
its own cosine schedule, through :meth:`PruningSession.finetune` as ``prunepilot finetune`` runs it. Results are
written after every run.

    cd bench && PYTHONPATH=.. python recover.py --rows train:oneshot,uniform:oneshot --epochs 1 --name recover_1ep
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

from common import RESULTS, ROOT, cifar_session, jpeg_folder, write_result

from pruning_core import FinetuneConfig, accuracy, measure_flops
from pruning_core.schedules import SCHEDULES, make_schedule

ALLOCATIONS = RESULTS / "methods_r56_05_amd.json"


def allocations() -> dict[str, dict[str, float]]:
    runs = json.loads(ALLOCATIONS.read_text())["models"]["resnet56"]["0.5"]
    return {"uniform": runs["uniform"]["ratios"], "train": runs["train"]["runs"][0]["ratios"],
            "random": runs["random-120"]["runs"][0]["ratios"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="dense:oneshot", help="ALLOCATION:SCHEDULE,... (allocation: dense, uniform, "
                                                            f"train or random; schedule: {', '.join(SCHEDULES)})")
    p.add_argument("--epochs", default="1", help="comma-separated epoch budgets, each a separate run")
    p.add_argument("--seeds", default="0")
    p.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    p.add_argument("--act-grads", type=float, default=0.0, help="--prune-act-grads RATE for every run")
    p.add_argument("--name", default="recover")
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    session = cifar_session("resnet56")
    jpeg = f"imagefolder:{jpeg_folder(('train', 'test'))}"
    ratios_of = allocations()
    results = {"commit": commit.strip(), "config": vars(args), "allocations": str(ALLOCATIONS.name), "runs": []}
    acc_dense = session.dense_accuracy("test")
    for row in args.rows.split(","):
        alloc, schedule = row.split(":")
        for epochs in map(int, args.epochs.split(",")):
            for seed in map(int, args.seeds.split(",")):
                cfg = FinetuneConfig(epochs=epochs, lr=args.lr, seed=seed, act_grad_sparsity=args.act_grads)
                t = time.perf_counter()
                report: dict = {}
                if alloc == "dense":
                    model = session.build({}, adapt=False)
                    start = acc_dense
                    sched = None
                else:
                    ratios = ratios_of[alloc]
                    sched = make_schedule(schedule, session, ratios, seed=seed)
                    model = session.finetune_start(ratios, schedule=sched)
                    start = accuracy(model, session.splits.test) if sched is None else None
                model = session.finetune(model, cfg, extra_data=[jpeg], schedule=sched, report=report)
                run = {"row": row, "epochs": epochs, "seed": seed, "acc_start": start,
                       "acc": accuracy(model, session.splits.test), "acc_dense": acc_dense,
                       "flops_ratio": measure_flops(model, session.data.input_shape) / session.flops_dense,
                       "wall_s": round(time.perf_counter() - t, 1), **report}
                results["runs"].append(run)
                print(f"{row} {epochs} ep seed {seed}: {run['acc']:.2f}% (start {start}, dense {acc_dense:.2f}), "
                      f"{run['wall_s']:.0f} s", flush=True)
                write_result(args.name, results)


if __name__ == "__main__":
    main()
