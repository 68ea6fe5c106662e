"""The trace's types: layers, channel groups, the layer graph, and the one FLOPs count.

A :class:`ModelTrace` (made by :func:`pruning_core.tracer.trace_model`) holds a model's prunable channel groups,
per-layer shapes and its layer graph. FLOPs are multiply-accumulates (MACs) of one forward pass at batch 1, counted
over conv and linear layers only (BN, activations and pooling are not counted). :func:`layer_macs` is the single
formula; :meth:`ModelTrace.flops` applies it to any choice of kept channels without building the model, and
:func:`measure_flops` applies it to a real module with forward hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pruning_core.errors import UserError

__all__ = ["OP_TYPES", "ChannelGroup", "GraphNode", "LayerInfo", "Member", "ModelTrace", "grouped_step",
           "layer_macs", "measure_flops"]

OP_TYPES = ("conv", "dwconv", "linear", "bn", "add", "concat", "pool")

@dataclass(frozen=True)
class LayerInfo:
    """Static shape of a conv, linear, norm or PReLU layer in the dense model."""

    name: str
    kind: str  # "conv" | "linear" | "bn" (a per-channel norm) | "act" (a per-channel activation: PReLU)
    in_channels: int
    out_channels: int
    kernel: int = 1  # its height
    stride: int = 1
    groups: int = 1
    out_hw: tuple[int, int] = (1, 1)
    kernel_w: int = 0  # a non-square kernel's width (Inception's 1x7); 0: square

    @property
    def kernel_size(self) -> tuple[int, int]:
        """(height, width) of the kernel."""
        return self.kernel, self.kernel_w or self.kernel

    @property
    def weighted(self) -> bool:
        """A conv or linear layer: one that produces channels, and that the FLOPs count (not a norm or a PReLU)."""
        return self.kind in ("conv", "linear")

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclass(frozen=True)
class Member:
    """One layer in a channel group: which dimension is cut and where each group channel lands.

    ``index[j]`` lists the channels of this layer's ``dim`` that belong to group channel ``j``
    (one for a plain layer, several after a flatten).
    """

    module: str
    dim: str  # "out" (conv/linear out, BN features, depthwise conv) or "in"
    index: tuple[tuple[int, ...], ...]


@dataclass
class ChannelGroup:
    """Layers whose channels must be removed together, named after their root module.

    ``blocks`` > 1 where a grouped conv reads or writes the group: its channels fall into that many equal
    consecutive blocks (one per conv group, or a multiple), and each block keeps the same number of them.
    ``unit`` > 1 where a group norm normalises the group: its channels go in runs of ``unit`` consecutive ones
    (a norm group, or several), since removing part of a norm group would change the statistics of the rest.
    A group has one of the two at most.
    """

    name: str
    channels: int
    members: list[Member]
    blocks: int = 1
    shared_slopes: tuple[str, ...] = ()  # PReLUs with one shared slope that these channels pass
    unit: int = 1

    def layers(self, dim: str) -> list[str]:
        return [m.module for m in self.members if m.dim == dim]

    @property
    def step(self) -> int:
        """What the group's kept channels are a multiple of: its ``blocks`` or its ``unit`` (one is 1)."""
        return self.blocks * self.unit


@dataclass(frozen=True)
class GraphNode:
    name: str
    op: str  # one of OP_TYPES
    module: str | None  # named_modules() name for layers, None for functional ops


@dataclass
class ModelTrace:
    """Everything prunepilot needs to know about a model's structure, from one trace."""

    input_shape: tuple[int, ...]
    layers: dict[str, LayerInfo]
    groups: list[ChannelGroup]  # prunable, in topological order
    excluded: dict[str, str]  # group name -> reason it is not prunable
    nodes: list[GraphNode]  # layer graph in topological order
    edges: list[tuple[int, int]]  # data flow between nodes (source, target)
    out_group: dict[str, str] = field(default_factory=dict)  # layer -> group governing its out channels
    in_groups: dict[str, list[str]] = field(default_factory=dict)  # layer -> groups among its in channels

    has_bias: dict[str, bool] = field(default_factory=dict)  # conv/linear: a bias; BN: affine (gate and bias)
    # PReLUs with one shared slope (element-wise, never cut) -> the group whose channels they pass ("" for none):
    # the slope goes when that residual branch is dropped
    shared_slopes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.group_index = {g.name: i for i, g in enumerate(self.groups)}
        # input features per group channel, per (layer, group): >1 after a flatten
        self.in_multiplicity: dict[tuple[str, str], int] = {}
        for g in self.groups:
            for m in g.members:
                if m.dim == "out":
                    self.out_group[m.module] = g.name
                else:  # a layer after a concat reads several groups
                    self.in_groups.setdefault(m.module, []).append(g.name)
                    self.in_multiplicity[m.module, g.name] = len(m.index[0])
        self._node_of = {n.module: i for i, n in enumerate(self.nodes) if n.module}
        self._succ: dict[int, list[int]] = {}
        for a, b in self.edges:
            self._succ.setdefault(a, []).append(b)
        self.droppable = self._droppable()
        # BN layers that only scale a residual branch's output: they go with the branch when it is dropped
        self.branch_bn_of = {bn: g.name for g in self.groups if g.name in self.droppable
                             for m in g.members if m.dim == "in" for bn in self.branch_bns(m.module)}

    def branch_add(self, layer: str) -> int | None:
        """Index of the ``add`` node that ``layer``'s output reaches through BN layers only, if any."""
        path = self._branch_path(layer)
        return path[-1] if path else None

    def branch_bns(self, layer: str) -> list[str]:
        """The BN layers between ``layer`` and the ``add`` its output reaches through them (see :meth:`branch_add`)."""
        return [self.nodes[i].module for i in (self._branch_path(layer) or [])[:-1]]

    def _branch_path(self, layer: str) -> list[int] | None:
        """Node indices from ``layer``'s successor to an ``add`` through BN layers only (the add last), if any."""
        if layer not in self._node_of:
            return None
        path, nxt = [], self._succ.get(self._node_of[layer], [])
        while len(nxt) == 1 and self.nodes[nxt[0]].op == "bn":
            path.append(nxt[0])
            nxt = self._succ.get(nxt[0], [])
        return [*path, nxt[0]] if len(nxt) == 1 and self.nodes[nxt[0]].op == "add" else None

    def _droppable(self) -> frozenset[str]:
        """Groups that may lose all their channels: residual branches.

        Every layer reading the group's channels must be a dense conv fed by this group alone whose output reaches
        an ``add`` through BN layers only. With the group gone the branch contributes nothing (``prune`` drops the
        conv's bias and those BN layers too), and the add keeps its other input: the shortcut. A plain chain
        (VGG) has no such group, since removing one would disconnect the network.
        """
        def branch_end(m: Member, channels: int) -> bool:
            info = self.layers[m.module]
            return (info.kind == "conv" and not info.depthwise and info.in_channels == channels * len(m.index[0])
                    and self.branch_add(m.module) is not None)

        return frozenset(g.name for g in self.groups
                         if (readers := [m for m in g.members if m.dim == "in"])
                         and all(branch_end(m, g.channels) for m in readers))

    def group(self, name: str) -> ChannelGroup:
        if name not in self.group_index:
            raise UserError(f"unknown group {name!r}; prunable groups are: {', '.join(self.group_index)}")
        return self.groups[self.group_index[name]]

    def channels_of(self, layer: str, kept: dict[str, int]) -> tuple[int, int, int]:
        """(in, out, groups) channels of ``layer`` when each group keeps ``kept[group]`` channels."""
        info = self.layers[layer]
        g_out = self.out_group.get(layer)
        out_c = kept.get(g_out, info.out_channels) if g_out else info.out_channels
        if info.depthwise:
            return out_c, out_c, out_c
        in_c = info.in_channels
        for g_in in self.in_groups.get(layer, ()):
            removed = self.groups[self.group_index[g_in]].channels - kept.get(g_in, 0)
            in_c -= removed * self.in_multiplicity[layer, g_in]
        if not info.weighted and layer in self.in_groups:  # a norm or PReLU reading a concat: out follows in
            out_c = in_c
        return in_c, out_c, info.groups

    def layer_flops(self, kept: dict[str, int] | None = None) -> dict[str, int]:
        """MACs of each conv/linear layer at batch 1 (dense when ``kept`` is None)."""
        kept = kept if kept is not None else self.dense_kept()
        out = {}
        for name, info in self.layers.items():
            if not info.weighted:
                continue
            in_c, out_c, groups = self.channels_of(name, kept)
            out[name] = layer_macs(info.kind, in_c, out_c, groups, info.kernel_size, info.out_hw)
        return out

    def flops(self, kept: dict[str, int] | None = None) -> int:
        return sum(self.layer_flops(kept).values())

    def layer_params(self, kept: dict[str, int] | None = None) -> dict[str, int]:
        kept = kept if kept is not None else self.dense_kept()
        out = {}
        for name, info in self.layers.items():
            in_c, out_c, groups = self.channels_of(name, kept)
            if name in self.branch_bn_of and kept[self.branch_bn_of[name]] == 0:
                out[name] = 0  # the BN of a dropped branch goes with it
            elif info.kind == "bn":
                out[name] = 2 * out_c if self.has_bias.get(name) else 0  # affine weight and bias
            elif info.kind == "act":
                out[name] = out_c  # one PReLU slope per channel
            elif in_c == 0:  # reads a dropped branch: gone, bias included
                out[name] = 0
            else:
                bias = out_c if self.has_bias.get(name) else 0
                out[name] = out_c * (in_c // max(groups, 1)) * math.prod(info.kernel_size) + bias
        return out

    def params(self, kept: dict[str, int] | None = None) -> int:
        """Parameters of conv, linear, norm and PReLU layers (weights, biases, norm affine, slopes)."""
        kept = kept if kept is not None else self.dense_kept()
        return sum(self.layer_params(kept).values()) + sum(kept.get(g, 1) > 0 for g in self.shared_slopes.values())

    def dense_kept(self) -> dict[str, int]:
        return {g.name: g.channels for g in self.groups}


def grouped_step(step: int, groups: int, channels: int) -> int:
    """The width step of ``channels`` that a grouped conv splits over its ``groups`` conv groups: a multiple of
    both ``step`` (e.g. the CPU's channel block) and ``groups`` where that fits in ``channels``, else of ``groups``.
    """
    both = math.lcm(step, groups)
    return both if both <= channels else groups


def layer_macs(kind: str, in_c: int, out_c: int, groups: int, kernel: int | tuple[int, int],
               out_hw: tuple[int, int]) -> int:
    """Multiply-accumulates of one conv or linear layer at batch 1: the project's only FLOPs formula. ``kernel`` is
    a square kernel's side or (height, width).
    """
    if kind == "linear":
        return in_c * out_c
    if not groups:  # a depthwise conv in a dropped branch
        return 0
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    return out_hw[0] * out_hw[1] * out_c * (in_c // groups) * kh * kw


def measure_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Count MACs of a real module at batch 1 with forward hooks, using :func:`layer_macs`."""
    total = 0

    def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += layer_macs("conv", mod.in_channels, mod.out_channels, mod.groups, tuple(mod.kernel_size),
                                tuple(out.shape[2:]))
        else:
            total += layer_macs("linear", mod.in_features, mod.out_features, 1, 1, (1, 1))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return total
