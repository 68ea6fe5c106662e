"""Physical channel removal and the ratio helpers (uniform for a FLOPs target, Taylor global ranking), with an
optional predicted-latency budget on top of the FLOPs one.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import TYPE_CHECKING

import torch
from torch import nn

from pruning_core.device import model_device
from pruning_core.errors import UserError
from pruning_core.graph import ChannelGroup, ModelTrace, grouped_step

if TYPE_CHECKING:
    from pruning_core.latency import LatencyBudget

__all__ = ["DroppedBranch", "EmptyChannels", "branch_width", "check_ratios", "drop_order", "fits_budget",
           "global_ratios", "kept_channels", "kept_counts", "kept_indices", "prune", "removed_channels",
           "uniform_ratios"]


def kept_channels(channels: int, ratio: float, round_to: int | None = None, drop: bool = False,
                  multiple: int = 1) -> int:
    """Channels a group of ``channels`` keeps at pruning ``ratio``: at least one, rounded up to ``round_to``.

    Ratio 1 keeps none (a dropped residual branch, see :attr:`ModelTrace.droppable`). With ``drop`` the group
    keeps a whole number of ``round_to`` blocks, possibly none: a width under half a block drops the branch.
    A group whose channels go in steps (``multiple`` > 1, :attr:`ChannelGroup.step`: the blocks of a grouped conv,
    or a group norm's norm groups) keeps a multiple of ``multiple`` too (of both where that fits in ``channels``,
    else of ``multiple`` alone).
    """
    if ratio >= 1.0:
        return 0
    raw = (1.0 - ratio) * channels
    block = round_to if round_to and round_to > 1 else 1
    if drop and raw < block / 2:
        return 0
    keep = max(1, int(round(raw)))
    step = block if block > 1 and (channels > block or drop) else 1
    if multiple > 1:
        step = grouped_step(step, multiple, channels)
    if step > 1:
        keep = min(channels, int(math.ceil(keep / step) * step))
    return keep


def branch_width(channels: int, ratio: float, round_to: int, multiple: int = 1) -> int:
    """Channels a residual branch keeps at ``ratio`` when only a drop decision may remove it: whole ``round_to``
    blocks (:func:`kept_channels` with ``drop``), at least one (as :func:`kept_channels` rounds it for ``multiple``).
    """
    one_block = kept_channels(channels, 1.0 - min(channels, round_to) / channels, round_to, multiple=multiple)
    return max(one_block, kept_channels(channels, ratio, round_to, drop=True, multiple=multiple))


def kept_indices(group: ChannelGroup, scores: torch.Tensor, kept: int) -> list[int]:
    """The ``kept`` highest-scoring channels of ``group``, in their original order. With ``group.blocks`` > 1 the
    same number from each block; with ``group.unit`` > 1 whole units, by their channels' summed score (``kept``
    must be a multiple of either, as :func:`kept_channels` makes it).
    """
    if kept % group.step:
        what = f"{group.blocks} blocks" if group.blocks > 1 else f"group norm's {group.unit}-channel unit"
        raise ValueError(f"group {group.name} keeps {kept} channels, not a multiple of its {what}")
    if group.unit > 1:
        u = group.unit
        best = torch.topk(scores.float().reshape(-1, u).sum(1), kept // u).indices
        return sorted(int(b) * u + i for b in best for i in range(u))
    size, per = group.channels // group.blocks, kept // group.blocks
    return sorted(b * size + int(i) for b in range(group.blocks)
                  for i in torch.topk(scores[b * size:(b + 1) * size].float(), per).indices)


def drop_order(trace: ModelTrace, costs: dict[str, float]) -> list[str]:
    """The droppable groups (:attr:`ModelTrace.droppable`), cheapest to remove first by ``costs`` (one number per
    branch, e.g. :meth:`PruningSession.drop_costs`); ties by name, so the order is deterministic.
    """
    return sorted(trace.droppable, key=lambda name: (float(costs[name]), name))


def check_ratios(trace: ModelTrace, ratios: dict[str, float]) -> None:
    """Raise :class:`UserError` for an unknown group name or a ratio outside ``[0, 1)`` (1 is allowed for a
    droppable group).
    """
    for name, r in ratios.items():
        trace.group(name)  # raises for unknown names
        if not isinstance(r, (int, float)) or math.isnan(r) or not 0.0 <= r <= 1.0:
            raise UserError(f"ratio for group {name!r} is {r!r}; a pruning ratio must be in [0, 1)")
        if r == 1.0 and name not in trace.droppable:
            raise UserError(f"ratio for group {name!r} is 1, which removes it, but it is not a residual branch "
                            "(removing it would cut the network); a pruning ratio must be in [0, 1)")


def kept_counts(trace: ModelTrace, ratios: dict[str, float], round_to: int | None = None,
                drop: bool = False) -> dict[str, int]:
    """Channels kept per group; groups missing from ``ratios`` stay dense. ``drop`` applies to the groups in
    ``trace.droppable`` (see :func:`kept_channels`).
    """
    return {g.name: kept_channels(g.channels, ratios.get(g.name, 0.0), round_to, drop and g.name in trace.droppable,
                                  g.step) for g in trace.groups}


class EmptyChannels(nn.Module):
    """A layer whose output channels were all removed: a zero-channel slice of its input (batch and size kept)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :0]


class DroppedBranch(nn.Module):
    """A conv whose input channels were all removed, in a dropped residual branch: it contributes nothing.

    With ``broadcast`` it is a ``(1, C, 1, 1)`` zero tensor that the residual add broadcasts (no extra memory
    traffic, and PyTorch keeps its channels-last layout). Otherwise it is a fresh zero tensor of the output shape
    that the trace fixed (the model's input size), the input giving the batch: where every input of the add is
    a dropped branch, or where the model adds into the branch's output in place (torchvision's
    ``out += identity``), which a broadcast tensor cannot hold. Where its whole block reduces to the identity
    (or to its shortcut), :func:`prune` removes the block instead.
    """

    def __init__(self, out_channels: int, out_hw: tuple[int, int], broadcast: bool = True):
        super().__init__()
        self.out_channels, self.out_hw, self.broadcast = out_channels, tuple(out_hw), broadcast
        self.register_buffer("zeros", torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.broadcast:
            return self.zeros
        return x.new_zeros(x.shape[0], self.out_channels, *self.out_hw)

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, out_hw={self.out_hw}, broadcast={self.broadcast}"


def prune(model: nn.Module, ratios: dict[str, float], scores: dict[str, torch.Tensor], trace: ModelTrace,
          round_to: int | None = None) -> nn.Module:
    """Return a physically smaller copy of ``model``; the input model is never modified.

    Each group keeps its ``kept_channels`` highest-scoring channels (in their original order), removed
    from every member layer's weights, biases and BN statistics. A droppable group at ratio 1 is a dropped
    residual branch, which contributes nothing: its producing layers become :class:`EmptyChannels`, the conv
    reading it a :class:`DroppedBranch` (zeros) and the BN after that conv an identity; then the block around it,
    now the identity or its shortcut alone, is replaced by that (ResNet and MobileNetV2 blocks are removed whole).

    :param ratios: pruning ratio per group name, each in ``[0, 1)``, or 1 for a group in ``trace.droppable``;
        missing groups are not pruned.
    :param scores: one score per channel per group (e.g. from :class:`TaylorImportance`).
    """
    check_ratios(trace, ratios)
    kept = kept_counts(trace, ratios, round_to)
    net = copy.deepcopy(model)
    modules = dict(net.named_modules())
    for (name, dim), gone_idx in removed_channels(trace, kept, scores).items():
        info = trace.layers[name]
        full = info.out_channels if dim == "out" else info.in_channels
        _slice(modules[name], dim, torch.tensor([i for i in range(full) if i not in gone_idx], dtype=torch.long),
               info.depthwise)
    # dropped branches last: the conv reading one may write a stream that another group narrowed (MobileNetV2)
    dropped = [m for g in trace.groups if kept[g.name] == 0 for m in g.members]
    if not dropped:
        return net
    for slope in (s for g in trace.groups if kept[g.name] == 0 for s in g.shared_slopes):  # a PReLU of no channels
        _replace(net, slope, nn.Identity(), modules[slope].training)
    adds = {m.module: trace.branch_add(m.module) for m in dropped if m.dim == "in"}
    into, inputs = Counter(adds.values()), Counter(b for _, b in trace.edges)
    for m in dropped:
        old = modules[m.module]
        if m.dim == "out":
            _replace(net, m.module, EmptyChannels(), old.training)
            continue
        add = adds[m.module]  # zeros broadcast only where the add has a full-size input left
        _replace(net, m.module, DroppedBranch(old.out_channels, trace.layers[m.module].out_hw,
                                              into[add] < inputs[add]), old.training)
        for bn in trace.branch_bns(m.module):  # the branch's BN would turn its zeros into a constant shift
            _replace(net, bn, nn.Identity(), old.training)
    net.to(model_device(model))  # the zeros of a dropped branch are made on the CPU
    _remove_dead_blocks(net, trace, kept)
    return net


def removed_channels(trace: ModelTrace, kept: dict[str, int], scores: dict[str, torch.Tensor]
                     ) -> dict[tuple[str, str], set[int]]:
    """The channels each layer loses when every group keeps ``kept[name]`` of its best channels, as dense indices,
    keyed by ``(layer, "in" | "out")``. Gathered over every group: a layer after a concat reads several groups,
    whose indices all refer to its dense input. Dropped groups (0 kept) are left out: :func:`prune` removes
    their layers whole.
    """
    removed: dict[tuple[str, str], set[int]] = {}
    for g in trace.groups:
        if kept[g.name] in (0, g.channels):
            continue
        keep = set(kept_indices(g, scores[g.name], kept[g.name]))
        gone = [j for j in range(g.channels) if j not in keep]
        for m in g.members:
            removed.setdefault((m.module, m.dim), set()).update(i for j in gone for i in m.index[j])
    return removed


def _replace(net: nn.Module, name: str, new: nn.Module, training: bool) -> None:
    new.train(training)
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, new)


def _remove_dead_blocks(net: nn.Module, trace: ModelTrace, kept: dict[str, int]) -> None:
    """Replace each module around a dropped branch that now computes the identity, or what one of its children
    computes alone, by that: a ResNet block whose branch is gone is ReLU(x + 0) = x on a ReLU output, and its
    downsampling form ReLU(shortcut(x)) = shortcut(x); a MobileNetV2 block is x + 0. Without this the add and
    the activation stay, an element-wise pass each, with layout reorders around them in ONNX Runtime.

    The candidates are the modules enclosing a dropped group's layers, innermost first, up to one that holds a
    layer still computing outside the kept child. A candidate is replaced only when, on a random input in eval
    mode, its output equals its input (or its child's output on that input) exactly. Where that forward pass
    fails on the broadcast zeros of a :class:`DroppedBranch`, every one of them yields full-size zeros instead.
    """
    dead = {m.module for g in trace.groups if kept[g.name] == 0 for m in g.members}
    dead |= {bn for bn, g in trace.branch_bn_of.items() if kept[g] == 0}
    live = [name for name in trace.layers if name not in dead]
    live += [name for name, g in trace.shared_slopes.items() if kept.get(g, 1) > 0]  # not layers, but parameters
    named = dict(net.named_modules())
    candidates: dict[str, list[str]] = {}  # dropped group -> enclosing module names, innermost first
    for g in trace.groups:
        if kept[g.name] == 0:
            parts = _common_prefix([m.module.split(".") for m in g.members])
            candidates[g.name] = [".".join(parts[:k]) for k in range(len(parts), 0, -1)]
    watched = {c for names in candidates.values() for c in names if c in named}
    io: dict[str, list] = {}
    hooks = [named[c].register_forward_hook(lambda mod, inp, out, c=c: io.setdefault(c, []).append((inp, out)))
             for c in watched]
    modes = {m: m.training for m in net.modules()}
    try:
        net.eval()
        with torch.no_grad():
            x = torch.randn(2, *trace.input_shape, generator=torch.Generator().manual_seed(0))
            param = next(net.parameters(), None)
            x = x if param is None else x.to(param.device)
            try:
                net(x)
            except RuntimeError:
                # an add into a dropped branch's output in place (torchvision's ``out += identity``) cannot hold
                # broadcast zeros (at batch 1 on a 1x1 map it would write into their buffer; this batch is 2)
                broadcast = [m for m in net.modules() if isinstance(m, DroppedBranch) and m.broadcast]
                if not broadcast:
                    raise
                for m in broadcast:
                    m.broadcast = False
                io.clear()
                net(x)
            chosen: dict[str, nn.Module] = {}
            for names in candidates.values():
                for c in names:
                    if c in chosen or c not in io or len(io[c]) != 1 or len(io[c][0][0]) != 1:
                        continue
                    (x,), out = io[c][0]
                    if not isinstance(out, torch.Tensor) or out.shape[0] != x.shape[0]:
                        continue  # not a whole block: e.g. a branch whose output is the broadcast zeros
                    alive = [n for n in live if n.startswith(c + ".")]
                    if not alive and torch.equal(x, out):
                        chosen[c] = nn.Identity()
                        break
                    child = _child_computing(named[c], c, x, out, alive)
                    if child is not None:
                        chosen[c] = child
                        break
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    for c, new in chosen.items():
        if not any(c.startswith(other + ".") for other in chosen):  # the outermost of nested ones
            _replace(net, c, new, named[c].training)


def _child_computing(module: nn.Module, name: str, x: torch.Tensor, out: torch.Tensor,
                     alive: list[str]) -> nn.Module | None:
    """The child of ``module`` that alone maps ``x`` to ``out``, holding every layer in ``alive``."""
    for child_name, child in module.named_children():
        prefix = f"{name}.{child_name}"
        if any(n != prefix and not n.startswith(prefix + ".") for n in alive):
            continue
        try:
            y = child(x)
        except (RuntimeError, TypeError, ValueError):
            continue
        if isinstance(y, torch.Tensor) and y.shape == out.shape and torch.equal(y, out):
            return child
    return None


def _common_prefix(paths: list[list[str]]) -> list[str]:
    """The longest common leading run of ``paths`` (module names split at dots), excluding each leaf's own name."""
    first = paths[0][:-1]
    k = 0
    while k < len(first) and all(len(p) > k + 1 and p[k] == first[k] for p in paths):
        k += 1
    return first[:k]


@torch.no_grad()
def _slice(mod: nn.Module, dim: str, idx: torch.Tensor, depthwise: bool = False) -> None:
    def cut(p: torch.Tensor | None, axis: int) -> torch.Tensor | None:
        return None if p is None else p.index_select(axis, idx.to(p.device)).clone()

    if isinstance(mod, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):  # BN, instance norm, group norm
        if isinstance(mod, nn.GroupNorm):  # whole norm groups go (ChannelGroup.unit): the others keep their statistics
            size = mod.num_channels // mod.num_groups
            if len(idx) % size:
                raise ValueError(f"a group norm of {size} channels per group cannot keep {len(idx)} channels")
            mod.num_groups, mod.num_channels = len(idx) // size, len(idx)
        else:
            mod.running_mean, mod.running_var = cut(mod.running_mean, 0), cut(mod.running_var, 0)
            mod.num_features = len(idx)
        if mod.affine:
            mod.weight = nn.Parameter(cut(mod.weight, 0))
            mod.bias = nn.Parameter(cut(mod.bias, 0))
    elif isinstance(mod, nn.PReLU):  # one slope per channel
        mod.weight = nn.Parameter(cut(mod.weight, 0))
        mod.num_parameters = len(idx)
    elif isinstance(mod, nn.Conv2d):
        if dim == "out":
            mod.weight = nn.Parameter(cut(mod.weight, 0))
            if mod.bias is not None:
                mod.bias = nn.Parameter(cut(mod.bias, 0))
            mod.out_channels = len(idx)
            if depthwise:  # input channels and groups follow
                mod.in_channels = mod.groups = len(idx)
        elif mod.groups > 1:  # grouped: each conv group's filters keep that group's remaining inputs
            size, rows = mod.in_channels // mod.groups, mod.out_channels // mod.groups
            mod.weight = nn.Parameter(torch.cat([
                mod.weight[b * rows:(b + 1) * rows].index_select(1, idx[(idx >= b * size) & (idx < (b + 1) * size)]
                                                                  - b * size)
                for b in range(mod.groups)]).clone())
            mod.in_channels = len(idx)
        else:
            mod.weight = nn.Parameter(cut(mod.weight, 1))
            mod.in_channels = len(idx)
    elif isinstance(mod, nn.Linear):
        if dim == "out":
            mod.weight = nn.Parameter(cut(mod.weight, 0))
            if mod.bias is not None:
                mod.bias = nn.Parameter(cut(mod.bias, 0))
            mod.out_features = len(idx)
        else:
            mod.weight = nn.Parameter(cut(mod.weight, 1))
            mod.in_features = len(idx)


def fits_budget(trace: ModelTrace, kept: dict[str, int], max_flops: float,
                latency: LatencyBudget | None = None) -> bool:
    """Whether ``kept`` channels stay within ``max_flops`` FLOPs and, given ``latency``, its predicted latency."""
    return trace.flops(kept) <= max_flops and (latency is None or latency.fits(trace, kept))


def _check_target(trace: ModelTrace, target: float, max_ratio: float, round_to: int | None,
                  latency: LatencyBudget | None = None) -> int:
    if not 0.0 < target <= 1.0:
        raise UserError(f"FLOPs target {target} must be in (0, 1]")
    dense = trace.flops()
    floor_kept = kept_counts(trace, {g.name: max_ratio for g in trace.groups}, round_to)
    floor = trace.flops(floor_kept) / dense
    if floor > target + 1e-12:
        raise UserError(f"FLOPs target {target:.3f} is unreachable: with every prunable group at max ratio "
                        f"{max_ratio} the model keeps {floor:.3f} of its FLOPs; raise the target or --max-ratio")
    if latency is not None and not latency.fits(trace, floor_kept):
        raise UserError(f"latency budget {latency.fraction:.3f} is unreachable: with every prunable group at max "
                        f"ratio {max_ratio} the model keeps {latency.table.ratio(trace, floor_kept):.3f} of its "
                        "predicted latency; raise --max-latency or --max-ratio")
    return dense


def uniform_ratios(trace: ModelTrace, target: float, max_ratio: float = 0.9,
                   round_to: int | None = None, latency: LatencyBudget | None = None) -> dict[str, float]:
    """The smallest single ratio for all groups whose pruned FLOPs are at most ``target`` of dense (and, given
    ``latency``, whose predicted latency fits it too).

    Groups then take back one channel each, in order, while the budget holds, so the result lands
    close below the target even when every group is narrow.
    """
    dense = _check_target(trace, target, max_ratio, round_to, latency)
    lo, hi = 0.0, max_ratio

    def fits(ratios: dict[str, float]) -> bool:
        return fits_budget(trace, kept_counts(trace, ratios, round_to), target * dense, latency)

    if fits({g.name: 0.0 for g in trace.groups}):
        return {g.name: 0.0 for g in trace.groups}
    for _ in range(40):
        mid = (lo + hi) / 2
        if fits({g.name: mid for g in trace.groups}):
            hi = mid
        else:
            lo = mid
    # One shared ratio moves every group at once, so the FLOPs step can be coarse; give back one channel
    # per group, in order, while the budget still holds (ratios stay within one channel of uniform).
    ratios = {g.name: hi for g in trace.groups}
    step = round_to if round_to and round_to > 1 else 1
    for g in trace.groups:
        kept = kept_channels(g.channels, ratios[g.name], round_to, multiple=g.step)
        if kept + step > g.channels:
            continue
        trial = {**ratios, g.name: 1.0 - (kept + step) / g.channels}
        if fits(trial):
            ratios = trial
    return ratios


def global_ratios(trace: ModelTrace, scores: dict[str, torch.Tensor], target: float, max_ratio: float = 0.9,
                  round_to: int | None = None, latency: LatencyBudget | None = None) -> dict[str, float]:
    """Molchanov's global ranking: remove the lowest-scoring channels network-wide until FLOPs meet ``target``
    (and, given ``latency``, the predicted latency its budget).

    No group loses more than ``max_ratio`` of its channels.
    """
    dense = _check_target(trace, target, max_ratio, round_to, latency)
    entries = sorted((float(s), g.name) for g in trace.groups for s in scores[g.name])
    cap = {g.name: g.channels - kept_channels(g.channels, max_ratio, multiple=g.step) for g in trace.groups}

    def ratios_for(k: int) -> dict[str, float]:
        removed = dict.fromkeys(cap, 0)
        for _, name in entries[:k]:
            if removed[name] < cap[name]:
                removed[name] += 1
        return {g.name: removed[g.name] / g.channels for g in trace.groups}

    def fits(k: int) -> bool:
        return fits_budget(trace, kept_counts(trace, ratios_for(k), round_to), target * dense, latency)

    lo, hi = 0, len(entries)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return ratios_for(lo)
