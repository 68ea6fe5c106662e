"""Images per second of the image-folder loader against the in-memory path, by decoding workers and image size.

The folder is the CIFAR-10 JPEG set of ../shared/assets (50,000 training images of 32x32), streamed as
``imagefolder:`` does, in normalised minibatches of 256; the in-memory path is the same images already decoded
(``Split.batches``), which is what the CIFAR-10 and digits specs use.

Example (from bench/, PYTHONPATH=..):
    python data_throughput.py --images 10000 --name data_throughput_amd
"""

from __future__ import annotations

import argparse
import time

import torch
from common import jpeg_folder, write_result
from methods import commit

from pruning_core import load_data


def rate(split, images: int, batch: int = 256) -> float:
    """Images per second over the first ``images`` images of ``split``, shuffled as training passes are."""
    gen = torch.Generator().manual_seed(0)
    seen, t = 0, time.perf_counter()
    for x, _ in split.batches(batch, shuffle=True, generator=gen):
        seen += len(x)
        if seen >= images:
            break
    return seen / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--name", default="data_throughput")
    args = p.parse_args()
    root = jpeg_folder()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for workers in (int(w) for w in args.workers.split(",")):
            data = load_data(f"imagefolder:{root}", image_size=size, workers=workers)
            r = rate(data.train, args.images)
            rows.append({"path": "stream", "image_size": size, "workers": workers, "images_per_s": round(r)})
            print(rows[-1], flush=True)
        data = load_data(f"imagefolder:{root}", image_size=size, workers=2)
        memory = data.train.subset(torch.arange(args.images))  # the same images, decoded once
        rows.append({"path": "memory", "image_size": size, "workers": None,
                     "images_per_s": round(rate(memory, args.images))})
        print(rows[-1], flush=True)
    write_result(args.name, {"commit": commit(), "config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
