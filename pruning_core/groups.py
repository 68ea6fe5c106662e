"""Channel groups of a trace: each group Torch-Pruning's ``DependencyGraph`` proposes, checked rule by rule, becomes a
:class:`~pruning_core.graph.ChannelGroup` or is excluded with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch_pruning as tp
from torch import nn

from pruning_core.graph import ChannelGroup, LayerInfo, Member
from pruning_core.opcheck import NORMS, SUPPORTED, channel_op_problem, shared_slope

__all__ = ["channel_groups"]


@dataclass
class _Context:
    """What checking a group reads besides the group: module names, layer shapes and the traced ops."""

    names: dict
    layers: dict[str, LayerInfo]
    op_shapes: dict
    inner: set  # autograd nodes inside a layer's own forward, cut with the layer


@dataclass
class _Draft:
    """A group as its items are read: the members so far and the cut sizes their rules impose."""

    width: int  # the group's channels
    members: list[Member] = field(default_factory=list)
    slopes: list[str] = field(default_factory=list)
    blocks: int = 1  # grouped convs: the channels go in this many even blocks
    unit: int = 1  # group norms: channels go in whole units of this many


def channel_groups(dg: tp.DependencyGraph, model: nn.Module, names: dict, layers: dict[str, LayerInfo],
                   outputs: list[str], op_shapes: dict, inner: set) -> tuple[list[ChannelGroup], dict[str, str]]:
    """The prunable channel groups of ``dg`` (the ``outputs`` layers' output channels are never cut), and the
    excluded ones by name with the reason.
    """
    modules = dict(model.named_modules())
    ignored = [modules[n] for n in outputs]
    ctx = _Context(names, layers, op_shapes, inner)
    definition_order = {n: i for i, n in enumerate(modules)}
    groups: list[ChannelGroup] = []
    excluded: dict[str, str] = {}
    for tp_group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        draft = _Draft(len(tp_group.items[0].idxs))
        # the items are read up to the first problem; the members read so far name an excluded group
        problem = next((p for p in (_add_item(draft, item, ctx) for item in tp_group.items) if p), None)
        outs = [m for m in draft.members if m.dim == "out" and layers[m.module].weighted]
        candidates = sorted(outs or draft.members,
                            key=lambda m: (layers[m.module].depthwise, definition_order[m.module]))
        gname = candidates[0].module if candidates else names.get(tp_group.items[0].dep.target.module, "?")
        if problem is None and not outs:
            problem = "no conv or linear layer produces these channels"
        if problem:
            excluded[gname] = problem
            continue
        groups.append(ChannelGroup(gname, draft.width, draft.members, draft.blocks, tuple(dict.fromkeys(draft.slopes)),
                                   draft.unit))
    return groups, excluded


def _add_item(draft: _Draft, item, ctx: _Context) -> str | None:
    """Add one item of a Torch-Pruning group to ``draft``, or say why the group cannot be cut."""
    mod = item.dep.target.module
    if shared_slope(mod):  # element-wise
        draft.slopes.append(ctx.names[mod])
        return None
    if mod not in ctx.names or not isinstance(mod, SUPPORTED):  # functional op: nothing to cut, but it must keep
        if item.dep.target.grad_fn in ctx.inner:  # channels one to one, unless the op is part of a layer's own
            return None  # forward (instance norm's reshapes, PReLU's slopes), cut with the layer
        return channel_op_problem(item.dep.target.grad_fn, ctx.op_shapes)
    name = ctx.names[mod]
    dim = "out" if item.dep.handler.__name__ == "prune_out_channels" or isinstance(mod, (*NORMS, nn.PReLU)) else "in"
    info = ctx.layers[name]
    full = info.out_channels if dim == "out" else info.in_channels
    idxs = [int(i) for i in item.idxs]
    index, problem = _channels_by_group_channel(name, item, idxs, draft.width)
    if problem:
        return problem
    partial = len(idxs) != full or sorted(idxs) != list(range(full))
    if partial and dim == "out" and isinstance(mod, (*NORMS, nn.PReLU)) and not isinstance(mod, nn.GroupNorm):
        dim = "in"  # a norm reading a concat (DenseNet): sliced per input, as a conv reading it is
    # whether this layer's channels are the group's channels, one to one and in order
    alone = full == draft.width and all(ix == [j] for j, ix in enumerate(index))
    problem = (_coverage_problem(name, dim, partial, full, idxs, index)
               or _grouped_conv_problem(draft, name, info, alone)
               or _group_norm_problem(draft, name, mod, full, alone)
               or _blocks_and_units_problem(draft, name))
    if problem:
        return problem
    if (name, dim) not in {(m.module, m.dim) for m in draft.members}:  # a layer may read what it scales
        draft.members.append(Member(name, dim, tuple(tuple(ix) for ix in index)))
    return None


def _channels_by_group_channel(name: str, item, idxs: list[int], width: int) -> tuple[list[list[int]], str | None]:
    """The layer's channels of each group channel, or why the item maps outside the group."""
    root_idxs = [int(r) for r in (item.root_idxs if item.root_idxs is not None else item.idxs)]
    index: list[list[int]] = [[] for _ in range(width)]
    for r, i in zip(root_idxs, idxs):
        if r >= width:
            return index, f"{name} maps to group channel {r} of {width}"
        index[r].append(i)
    return index, None


def _coverage_problem(name: str, dim: str, partial: bool, full: int, idxs: list[int],
                      index: list[list[int]]) -> str | None:
    """A layer whose output channels are cut must be covered completely, and every layer evenly and without
    repeats.
    """
    if dim == "out" and partial:
        return (f"{name} has {full} output channels but the traced group covers {len(set(idxs))} of "
                "them (a channel-padding or slicing op couples unequal widths)")
    if any(len(ix) != len(index[0]) for ix in index) or len(set(idxs)) != len(idxs):
        return f"{name} maps group channels unevenly"
    return None


def _grouped_conv_problem(draft: _Draft, name: str, info: LayerInfo, alone: bool) -> str | None:
    """A grouped (not depthwise) conv keeps its conv groups even: the cut goes in ``draft.blocks`` even blocks."""
    if not (info.kind == "conv" and info.groups > 1 and not info.depthwise):
        return None
    if not alone:
        return f"grouped conv {name} (groups={info.groups}) has channels of this group among others"
    draft.blocks = math.lcm(draft.blocks, info.groups)
    if draft.blocks != draft.width:
        return None
    if info.groups == draft.width:
        return (f"grouped conv {name} (groups={info.groups}) reads each of these channels in a conv "
                "group of its own (a depthwise conv with a channel multiplier)")
    return (f"grouped convs on these {draft.width} channels have group counts whose least common "
            f"multiple is {draft.width} ({name}: groups={info.groups}), so no cut keeps them all even")


def _group_norm_problem(draft: _Draft, name: str, mod: nn.Module, full: int, alone: bool) -> str | None:
    """A group norm loses whole norm groups: the cut goes in units of ``draft.unit`` channels."""
    if not isinstance(mod, nn.GroupNorm):
        return None
    if not alone:
        return f"group norm {name} has channels of this group among others"
    width = draft.width
    draft.unit = math.lcm(draft.unit, full // mod.num_groups)
    if draft.unit == width:
        return (f"group norm {name} (num_groups={mod.num_groups}) normalises all these channels together"
                if mod.num_groups == 1 else
                f"group norms of {width} channels in norm groups that do not nest ({name}): "
                f"whole norm groups of all of them make one unit of all {width} channels")
    if width % draft.unit:
        return f"group norms of {width} channels in norm groups that do not nest ({name})"
    return None


def _blocks_and_units_problem(draft: _Draft, name: str) -> str | None:
    """Even conv blocks and whole norm units on the same channels are not combined."""
    if draft.blocks > 1 and draft.unit > 1:
        return f"{name}: a grouped conv and a group norm on the same channels are not supported"
    return None
