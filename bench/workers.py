"""Search throughput with parallel evaluation workers: ``prunepilot train`` on the shared ResNet-56 with 1 worker
(in process), N local worker processes, and N Ray actors on a local cluster, same seed and budget.

Each row: episodes/min of the search, distinct evaluations, the workers' start-up seconds, and whether the run
evaluated the same allocations with the same rewards as the 1-worker run.

    python workers.py --workers 1 2 --ray 2 --episodes 24 --name workers_r56_amd
    python workers.py --workers 1 --ray --threads 1 --episodes 24 --name workers_r56_1thread_amd  # per-core baseline
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import CIFAR, WEIGHTS, write_result
from methods import commit

from agent.train import train


def run(args: argparse.Namespace, workers: int, ray: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        report = train(model=args.model, weights=WEIGHTS[args.model], data=CIFAR, flops=args.flops,
                       episodes=args.episodes, floor=("uniform",), seed=0, out=f"{tmp}/run", progress=False,
                       workers=workers, ray=ray)
        wall = time.perf_counter() - t
        history = json.loads(Path(f"{tmp}/run/history.json").read_text())
    s = report["search"]
    return {"workers": workers, "ray": ray, "episodes": s["episodes"], "evaluations": s["evaluations"],
            "search_s": s["search_s"], "episodes_per_min": s["episodes_per_min"], "env_eval_s": s["env_eval_s"],
            "wall_s": round(wall, 1),
            "worker_restarts": s["worker_restarts"], "acc_test": report["acc"],
            "history": [(h["reward"], h["cached"], h.get("worker")) for h in history]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56", choices=sorted(WEIGHTS))
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--episodes", type=int, default=24)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ray", type=int, nargs="*", default=[2], help="Ray actor counts on a local cluster")
    p.add_argument("--threads", type=int, help="torch threads of the driver (the 1-worker run evaluates there)")
    p.add_argument("--name", default="workers")
    args = p.parse_args()
    launched = commit()  # the code that runs; the tree may change while it does
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [run(args, n, None) for n in args.workers]
    if args.ray:
        import ray
        ray.init(include_dashboard=False, log_to_driver=False)  # a local cluster of this machine's cores
        rows += [run(args, n, "auto") for n in args.ray]
        ray.shutdown()
    base = next((r for r in rows if r["workers"] == 1 and r["ray"] is None), rows[0])
    for r in rows:
        r["speedup"] = round(r["episodes_per_min"] / base["episodes_per_min"], 3)
        r["same_rewards_as_1"] = [h[:2] for h in r["history"]] == [h[:2] for h in base["history"]]
        print({k: v for k, v in r.items() if k != "history"}, flush=True)
    write_result(args.name, {"commit": launched, "config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
