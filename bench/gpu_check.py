"""Searches on a GPU against the CPU: episodes per minute, and whether both devices keep the same model.

Runs ``prunepilot train``'s search (a few episodes, uniform as the only floor method, seed 0) on each device for
ResNet-56 on the shared CIFAR-10 subset and for a 224-px torchvision ResNet-18 (random weights, 10 classes) on the
CIFAR-10 JPEG folder, and reports episodes/min, the kept ratios and accuracies per device. Run it whenever an NVIDIA
GPU is at hand; ``--devices cpu`` gives this machine's side.

Example (from bench/, PYTHONPATH=..):
    python gpu_check.py --devices cuda,cpu --episodes 12 --name gpu_check_h200
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import CIFAR, WEIGHTS, jpeg_folder, write_result
from methods import commit

from agent.train import train

MODELS = {"resnet56": dict(model="resnet56", weights=WEIGHTS["resnet56"], data=CIFAR),
          "torchvision:resnet18@224": dict(model="torchvision:resnet18", data=None, image_size=224, loader_workers=4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cuda,cpu")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--episodes", type=int, default=12)
    p.add_argument("--name", default="gpu_check")
    args = p.parse_args()
    rows = []
    for name in args.models.split(","):
        spec = dict(MODELS[name])
        if spec["data"] is None:
            spec["data"] = f"imagefolder:{jpeg_folder()}"
        for device in args.devices.split(","):
            with tempfile.TemporaryDirectory() as out:
                report = train(**spec, device=device, episodes=args.episodes, floor=("uniform",), seed=0,
                               out=f"{out}/run", progress=False)
            s = report["search"]
            rows.append({"model": name, "device": device, "episodes": s["episodes"],
                         "episodes_per_min": s["episodes_per_min"], "search_s": s["search_s"],
                         "acc": report["acc"], "acc_reward": report["acc_reward"], "chosen": s["chosen"],
                         "ratios": report["ratios"]})
            print({k: v for k, v in rows[-1].items() if k != "ratios"}, flush=True)
    for name in {r["model"] for r in rows}:  # the same kept model on every device?
        mine = [r for r in rows if r["model"] == name]
        for r in mine[1:]:
            r["same_ratios_as_" + mine[0]["device"]] = r["ratios"] == mine[0]["ratios"]
            r["acc_diff_vs_" + mine[0]["device"]] = round(r["acc"] - mine[0]["acc"], 3)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    write_result(args.name, {"commit": commit(), "config": vars(args), "gpu": gpu, "rows": rows})


if __name__ == "__main__":
    main()
