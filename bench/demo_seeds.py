"""`prunepilot demo` over several seeds: dense, uniform, the search and its transfer, as the demo prints them.

Each seed trains the demo's two digits CNNs afresh, so the spread covers the models as well as the search.

Example (from bench/, PYTHONPATH=..):
    python demo_seeds.py --seeds 0 1 2 --name demo_seeds_amd
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import write_result
from methods import commit

from agent.demo import run_demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--episodes", type=int, default=60)
    p.add_argument("--flops", type=float, default=0.25)
    p.add_argument("--name", default="demo_seeds")
    args = p.parse_args()
    config = {"seeds": args.seeds, "episodes": args.episodes, "flops": args.flops}
    runs = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            rows = run_demo(f"{out}/demo", episodes=args.episodes, flops=args.flops, seed=seed)
            runs[str(seed)] = {"rows": rows, "time_s": round(time.perf_counter() - t, 1)}
    write_result(args.name, {"commit": commit(), "config": config, "runs": runs})


if __name__ == "__main__":
    main()
