"""Physical channel removal: which channels each group keeps, and the pruned copy of a model without the others."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pruning_core.blocks import drop_branches
from pruning_core.device import model_device
from pruning_core.errors import UserError
from pruning_core.graph import ChannelGroup, ModelTrace, grouped_step

__all__ = ["branch_width", "check_ratios", "drop_order", "kept_channels", "kept_counts", "kept_indices", "prune",
           "removed_channels"]


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


def prune(model: nn.Module, ratios: dict[str, float], scores: dict[str, torch.Tensor], trace: ModelTrace,
          round_to: int | None = None) -> nn.Module:
    """Return a physically smaller copy of ``model``; the input model is never modified.

    Each group keeps its ``kept_channels`` highest-scoring channels (in their original order), removed
    from every member layer's weights, biases and BN statistics. A droppable group at ratio 1 is a dropped
    residual branch, which contributes nothing: its producing layers become
    :class:`~pruning_core.blocks.EmptyChannels`, the conv reading it a :class:`~pruning_core.blocks.DroppedBranch`
    (zeros) and the BN after that conv an identity; then the block around it, now the identity or its shortcut
    alone, is replaced by that (ResNet and MobileNetV2 blocks are removed whole).

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
    drop_branches(net, trace, kept, model_device(model))
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
