"""Dropped residual branches: the modules that replace a branch's layers, and the removal of the blocks around them
that then compute the identity (or their shortcut alone).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from pruning_core.graph import ModelTrace

__all__ = ["DroppedBranch", "EmptyChannels", "drop_branches", "replace_module"]


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
    (or to its shortcut), :func:`~pruning_core.prune.prune` removes the block instead.
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


def replace_module(net: nn.Module, name: str, new: nn.Module, training: bool) -> None:
    """Put ``new`` in ``net`` at ``name``, in train or eval mode as ``training`` says."""
    new.train(training)
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, new)


def drop_branches(net: nn.Module, trace: ModelTrace, kept: dict[str, int], device: torch.device) -> None:
    """Remove from ``net``, in place, the residual branches whose groups keep no channels (``kept`` 0): their
    producing layers become :class:`EmptyChannels`, the conv reading them a :class:`DroppedBranch` (zeros, made
    on ``device``) and the BN after that conv an identity; then the blocks around them, now the identity or their
    shortcut alone, are replaced by that.
    """
    dropped = [m for g in trace.groups if kept[g.name] == 0 for m in g.members]
    if not dropped:
        return
    modules = dict(net.named_modules())
    for slope in (s for g in trace.groups if kept[g.name] == 0 for s in g.shared_slopes):  # a PReLU of no channels
        replace_module(net, slope, nn.Identity(), modules[slope].training)
    adds = {m.module: trace.branch_add(m.module) for m in dropped if m.dim == "in"}
    into, inputs = Counter(adds.values()), Counter(b for _, b in trace.edges)
    for m in dropped:
        old = modules[m.module]
        if m.dim == "out":
            replace_module(net, m.module, EmptyChannels(), old.training)
            continue
        add = adds[m.module]  # zeros broadcast only where the add has a full-size input left
        replace_module(net, m.module, DroppedBranch(old.out_channels, trace.layers[m.module].out_hw,
                                                    into[add] < inputs[add]), old.training)
        for bn in trace.branch_bns(m.module):  # the branch's BN would turn its zeros into a constant shift
            replace_module(net, bn, nn.Identity(), old.training)
    net.to(device)  # the zeros of a dropped branch are made on the CPU
    _remove_dead_blocks(net, trace, kept)


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
    live = _live_layers(trace, kept)
    named = dict(net.named_modules())
    candidates = _candidates(trace, kept)
    watched = {c: named[c] for names in candidates.values() for c in names if c in named}
    modes = {m: m.training for m in net.modules()}
    try:
        net.eval()
        with torch.no_grad():
            io = _recorded_io(net, trace, watched)
            chosen = _replacements(candidates, io, named, live)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    for c, new in chosen.items():
        if not any(c.startswith(other + ".") for other in chosen):  # the outermost of nested ones
            replace_module(net, c, new, named[c].training)


def _live_layers(trace: ModelTrace, kept: dict[str, int]) -> list[str]:
    """The layers (and shared PReLU slopes) that still compute once the groups keeping no channels are gone."""
    dead = {m.module for g in trace.groups if kept[g.name] == 0 for m in g.members}
    dead |= {bn for bn, g in trace.branch_bn_of.items() if kept[g] == 0}
    live = [name for name in trace.layers if name not in dead]
    live += [name for name, g in trace.shared_slopes.items() if kept.get(g, 1) > 0]  # not layers, but parameters
    return live


def _candidates(trace: ModelTrace, kept: dict[str, int]) -> dict[str, list[str]]:
    """Per dropped group: the names of the modules enclosing all its layers, innermost first."""
    candidates: dict[str, list[str]] = {}
    for g in trace.groups:
        if kept[g.name] == 0:
            parts = _common_prefix([m.module.split(".") for m in g.members])
            candidates[g.name] = [".".join(parts[:k]) for k in range(len(parts), 0, -1)]
    return candidates


def _recorded_io(net: nn.Module, trace: ModelTrace, watched: dict[str, nn.Module]) -> dict[str, list]:
    """The ``(inputs, output)`` of every call of each ``watched`` module, by name, in one forward pass of ``net`` on
    a random input batch of 2. Where that pass fails on the broadcast zeros of a
    :class:`DroppedBranch`, they are made full-size and the pass runs again.
    """
    io: dict[str, list] = {}
    hooks = [mod.register_forward_hook(lambda mod, inp, out, c=c: io.setdefault(c, []).append((inp, out)))
             for c, mod in watched.items()]
    try:
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
    finally:
        for h in hooks:
            h.remove()
    return io


def _replacements(candidates: dict[str, list[str]], io: dict[str, list], named: dict[str, nn.Module],
                  live: list[str]) -> dict[str, nn.Module]:
    """Per dropped group, its innermost candidate module that computes the identity (replaced by
    :class:`~torch.nn.Identity`) or what one child computes alone (replaced by that child), by their ``io``.
    """
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
    return chosen


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
