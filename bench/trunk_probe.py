"""Would narrowing ResNet-56's residual trunks give a better latency-friendly space than dropping blocks?

prunepilot leaves the CIFAR ResNets' three residual streams ("trunks": the stem, every block's output and the
option-A shortcuts that zero-pad channels between stages) unpruned, so at 50% FLOPs with widths in whole
16-channel blocks the only way to keep stage 1 whole is to drop blocks. Handling the padding shortcut exactly
would let stages 2 and 3's trunks be narrowed in 16-channel blocks instead. Before building that, this script
measures what such models would score, without pruning them: a removed trunk channel is zeroed on the stem's BN
output and on every block output of its stage (forward hooks). Every conv then reads zeros on that channel (as
if its input channel were cut), the next block's add gets zero from its shortcut there, and the final linear
layer reads zeros, so the logits are those of the physically pruned model. Branch widths are pruned for real
(``PruningSession.build``); BN is recalibrated with the hooks in place.

Trunk channels are chosen per stage by three criteria: ``bn-taylor`` (Molchanov's gate score on the BN layers
that write the trunk: the stem's and each block's last, as ``TaylorImportance`` scores a group), ``fm-taylor``
(first-order Taylor on the trunk feature maps themselves) and ``act-l2`` (mean squared activation). Scored on
the reward and select splits (training images), never on test.

    python bench/trunk_probe.py --name trunk_probe_xeon
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from common import cifar_session, write_result

from pruning_core import accuracy, layer_macs
from pruning_core.evaluate import adapt_bn, augment_batch
from pruning_core.importance import taylor_term

STAGES = (1, 2, 3)
FULL = {1: 16, 2: 32, 3: 64}
HW = {1: 32, 2: 16, 3: 8}
# (trunk widths, branch widths) per stage: all latency-friendly (stage 1 whole, the rest whole 16-channel blocks)
CONFIGS = [((16, 32, 64), (16, 32, 64)),
           ((16, 32, 48), (16, 32, 48)), ((16, 32, 32), (16, 32, 32)), ((16, 32, 64), (16, 16, 16)),
           ((16, 32, 48), (16, 16, 32)), ((16, 32, 48), (16, 16, 16)), ((16, 16, 48), (16, 16, 32)),
           ((16, 16, 32), (16, 16, 32))]


def trunk_points(blocks: int) -> dict[int, list[str]]:
    """Per stage, the modules whose outputs are the trunk: the stem's BN (stage 1) and each block."""
    return {s: (["bn1"] if s == 1 else []) + [f"layer{s}.{i}" for i in range(blocks)] for s in STAGES}


def trunk_scores(session, blocks: int, batches: int) -> dict[str, dict[int, torch.Tensor]]:
    """Per criterion and stage, one score per trunk channel, over ``batches`` augmented training minibatches (the
    same stream as the session's Taylor scores)."""
    net = copy.deepcopy(session.model).eval()
    mods = dict(net.named_modules())
    points = trunk_points(blocks)
    gates = {1: ["bn1"] + [f"layer1.{i}.bn2" for i in range(blocks)],
             **{s: [f"layer{s}.{i}.bn2" for i in range(blocks)] for s in (2, 3)}}
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_mod, _inp, out):
            out.retain_grad()
            acts[name] = out
        return hook

    handles = [mods[n].register_forward_hook(keep(n)) for names in points.values() for n in names]
    out = {c: {s: torch.zeros(FULL[s], dtype=torch.float64) for s in STAGES}
           for c in ("bn-taylor", "fm-taylor", "act-l2")}
    gen = torch.Generator().manual_seed(session.config.seed)
    seen = 0
    for x, y in session.splits.train.batches(session.config.batch_size, shuffle=True, generator=gen):
        if seen >= batches:
            break
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(augment_batch(x, gen)), y).backward()
        with torch.no_grad():
            for s in STAGES:
                for n in gates[s]:
                    out["bn-taylor"][s] += taylor_term(mods[n], gate=True) ** 2
                for n in points[s]:
                    a = acts[n]
                    out["fm-taylor"][s] += ((a * a.grad).sum((2, 3)).double() ** 2).mean(0)
                    out["act-l2"][s] += (a.double() ** 2).mean((0, 2, 3))
        seen += 1
    for h in handles:
        h.remove()
    return out


def macs(trunk: dict[int, int], branch: dict[int, int], blocks: int, classes: int) -> int:
    """MACs at batch 1 of a CIFAR ResNet with these trunk and branch widths, by the project's ``layer_macs``."""
    def conv(c_in: int, c_out: int, s: int) -> int:
        return layer_macs("conv", c_in, c_out, 1, 3, (HW[s], HW[s]))

    total, prev = conv(3, trunk[1], 1), trunk[1]
    for s in STAGES:
        for i in range(blocks):
            total += conv(prev if i == 0 else trunk[s], branch[s], s) + conv(branch[s], trunk[s], s)
        prev = trunk[s]
    return total + layer_macs("linear", trunk[3], classes, 1, 1, (1, 1))


def evaluate(session, blocks: int, trunk: dict[int, int], branch: dict[int, int],
             scores: dict[int, torch.Tensor]) -> dict:
    ratios = {g.name: 1 - branch[int(g.name.split(".")[0][-1])] / g.channels for g in session.trace.groups}
    model = session.build(ratios, adapt=False)
    masks = {}
    for s in STAGES:
        mask = torch.zeros(FULL[s])
        mask[torch.topk(scores[s], trunk[s]).indices] = 1.0
        masks[s] = mask.view(1, -1, 1, 1)
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda _m, _i, out, s=s: out * masks[s])
               for s, names in trunk_points(blocks).items() for n in names]
    adapt_bn(model, session.splits.calib, session.config.calib_batches, session.config.batch_size)
    model.eval()
    row = {"acc_reward": accuracy(model, session.splits.reward), "acc_select": accuracy(model, session.split("select"))}
    for h in handles:
        h.remove()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56", choices=["resnet20", "resnet56"])
    p.add_argument("--name", default="trunk_probe")
    args = p.parse_args()
    t0 = time.perf_counter()
    session = cifar_session(args.model)
    blocks = len(session.model.layer1)
    classes = session.data.num_classes
    dense = {s: FULL[s] for s in STAGES}
    if macs(dense, dense, blocks, classes) != session.flops_dense:
        raise SystemExit("the MACs formula here disagrees with the trace's on the dense model")
    scores = trunk_scores(session, blocks, session.config.taylor_batches)
    rows = []
    for trunk_w, branch_w in CONFIGS:
        trunk, branch = dict(zip(STAGES, trunk_w)), dict(zip(STAGES, branch_w))
        flops = macs(trunk, branch, blocks, classes) / session.flops_dense
        row = {"trunk": trunk_w, "branch": branch_w, "flops_ratio": round(flops, 4)}
        for criterion, sc in scores.items():
            row[criterion] = evaluate(session, blocks, trunk, branch, sc)
            if trunk == dense:
                break  # nothing masked: one criterion is enough
        rows.append(row)
        print(f"trunk {trunk_w} branch {branch_w} FLOPs {flops:.3f}: " + "  ".join(
            f"{c} {r['acc_reward']:.1f}/{r['acc_select']:.1f}" for c, r in row.items() if isinstance(r, dict)),
            flush=True)
    write_result(args.name, {"model": args.model, "rows": rows, "time_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
