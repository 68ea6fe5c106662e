"""The check behind removing dropped blocks (``pruning_core.prune`` now does it for every model).

Before, a dropped residual branch left a constant c (the shift of the BN after it), so the block still computed
ReLU(x + c): an add and a ReLU in every runtime. With c set to 0 the block is exactly the identity (x is a ReLU
output, or the zero-padded shortcut of one) and can be removed. This script takes models with dropped blocks
from bench/results and reports reward/select/test accuracy with c and with c = 0 (BN recalibrated after the
change), and the ONNX Runtime speed-up over dense with the blocks kept (c) and removed. It knows the zoo's
CIFAR ResNet block (``bn2``, ``shortcut``) and nothing else. It needs the pruning core from before the change
to build the models with c: ``identity_drop_xeon.json`` was written at commit 8af2217 (``git checkout 8af2217``
to reproduce it); with the current core it stops with that message.

    python bench/identity_drop.py --results search_group_r16_drop search_substage_r16_drop
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from common import RESULTS, cifar_session, write_result
from torch import nn

from pruning_core import accuracy, adapt_bn, compare_latency


def without_blocks(model: nn.Module, dropped: list[str]) -> nn.Module:
    """``model`` (its dropped branches' BN shifts already zero) with each dropped block replaced by its shortcut."""
    out = copy.deepcopy(model)
    for group in dropped:
        name = group.rsplit(".", 1)[0]  # layer1.3.conv1 -> the block layer1.3
        block = out.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent), attr, block.shortcut)  # nn.Sequential() when it is the identity
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", nargs="+", default=["search_group_r16_drop", "search_substage_r16_drop"])
    p.add_argument("--method", default="rl-ppo")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--name", default="identity_drop")
    args = p.parse_args()
    session = cifar_session("resnet56", reward_images=1000, calib_batches=10)
    dense = session.model.eval()
    rows = []
    for res_name in args.results:
        res = json.loads((RESULTS / f"{res_name}.json").read_text())
        rt = res["config"].get("round_to")
        for target, methods in res["targets"].items():
            entry = methods.get(args.method)
            for run in (entry or {}).get("runs", [entry] if entry else []):
                dropped = sorted(g for g, r in run["ratios"].items() if r == 1.0)
                if not dropped:
                    continue
                kept_c = session.build(run["ratios"], rt)
                if not hasattr(kept_c.get_submodule(dropped[0].rsplit(".", 1)[0]), "bn2"):
                    raise SystemExit("this check needs the pruning core from before dropped blocks were removed "
                                     "(git checkout 8af2217): the current one removes them already")
                zero = copy.deepcopy(kept_c)
                with torch.no_grad():
                    for g in dropped:
                        zero.get_submodule(g.rsplit(".", 1)[0]).bn2.bias.zero_()
                adapt_bn(zero, session.splits.calib, session.config.calib_batches, session.config.batch_size)
                removed = without_blocks(zero, dropped)
                x = torch.randn(8, *session.data.input_shape)
                with torch.no_grad():
                    diff = float((removed(x) - zero(x)).abs().max())
                row = {"results": res_name, "target": target, "seed": run.get("seed"), "blocks_dropped": len(dropped),
                       "flops_speedup": 1 / run["flops_ratio"], "identity_max_abs_diff": diff}
                for label, model in (("c", kept_c), ("zero", zero)):
                    for split in ("reward", "select", "test"):
                        row[f"acc_{split}_{label}"] = accuracy(model, session.split(split))
                for batch in (1, 64):
                    for label, model in (("c", kept_c), ("removed", removed)):
                        timed = compare_latency(dense, model, session.data.input_shape, batch, "onnxruntime",
                                                repeats=args.repeats)
                        row[f"ort_speedup_b{batch}_{label}"] = timed["speedup"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_result(args.name, {"config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
