"""Peak memory of a command and every process it starts (decoding workers included), sampled from /proc.

Memory is the sum of PSS (proportional set size: a page shared by n processes counts 1/n in each) over the process
tree, so forked workers that share the parent's pages are not counted twice; the largest single RSS is reported too.

Example (from the repository root):
    python bench/peak_memory.py --name reach_memory_amd -- prunepilot train --model torchvision:mobilenet_v3_small \\
        --num-classes 10 --data imagefolder:bench/.cache/cifar10-jpeg --image-size 64 --device cpu --out runs/m
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from methods import commit  # noqa: E402


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def kib(pid: int, field: str, file: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    t = time.perf_counter()
    proc = subprocess.Popen(command)
    peak_pss = peak_rss = most = 0
    while proc.poll() is None:
        pids = tree(proc.pid)
        peak_pss = max(peak_pss, sum(kib(q, "Pss", "smaps_rollup") for q in pids))
        peak_rss = max(peak_rss, max(kib(q, "VmRSS", "status") for q in pids))
        most = max(most, len(pids))
        time.sleep(args.interval)
    wall = time.perf_counter() - t
    result = {"command": command, "returncode": proc.returncode, "wall_s": round(wall, 1),
              "peak_pss_mib": round(peak_pss / 1024), "peak_single_rss_mib": round(peak_rss / 1024),
              "most_processes": most}
    print(result)
    write_result(args.name, {"commit": commit(), **result})
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
