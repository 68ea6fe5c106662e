"""Channel importance criteria: first-order Taylor (Molchanov et al. 2019) and L1 magnitude.

An importance is a callable ``importance(model, batches, trace) -> dict[group, Tensor]`` returning
one score per channel of every prunable group (higher means more important).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.graph import ModelTrace

__all__ = ["L1Importance", "TaylorImportance", "taylor_term"]


def _to_group_scores(trace: ModelTrace, per_layer: dict[str, torch.Tensor], use: dict[str, list[str]]) -> dict:
    """Sum per-layer channel scores into group channel scores through each member's index map."""
    out = {}
    for g in trace.groups:
        total = torch.zeros(g.channels, dtype=torch.float64)
        members = {m.module: m for m in g.members if m.dim == "out"}  # a gate conv may also read the group
        for layer in use[g.name]:
            idx = torch.tensor(members[layer].index)  # (channels, 1) for out members
            total += per_layer[layer][idx].sum(dim=1).double()
        out[g.name] = total
    return out


def _score_layers(trace: ModelTrace) -> dict[str, list[str]]:
    """Per group, the layers whose gates are scored: its affine norms, or its conv/linear outputs where it has none."""
    use = {}
    for g in trace.groups:
        outs = [m.module for m in g.members if m.dim == "out"]
        bns = [n for n in outs if trace.layers[n].kind == "bn" and trace.has_bias.get(n)]
        use[g.name] = bns or [n for n in outs if trace.layers[n].weighted]
    return use


def taylor_term(module: nn.Module, gate: bool) -> torch.Tensor:
    """Per output channel, the first-order change in the loss from zeroing the channel, after a backward pass: on a
    norm layer's gate (``gate``) ``gamma*dL/dgamma + beta*dL/dbeta``, else ``sum over the filter of w*dL/dw``
    (plus the bias term). :class:`TaylorImportance` squares it per minibatch.
    """
    if gate:
        s = module.weight * module.weight.grad + module.bias * module.bias.grad
    else:
        s = (module.weight * module.weight.grad).flatten(1).sum(1)
        if module.bias is not None:
            s = s + module.bias * module.bias.grad
    return s.double()


class TaylorImportance:
    """First-order Taylor importance of Molchanov et al., CVPR 2019 (https://arxiv.org/abs/1906.10771).

    Per minibatch and channel, on the BN gate: ``(sum_c gamma*dL/dgamma + beta*dL/dbeta)^2``; on the
    weights where a group has no BN: ``(sum over the filter of w*dL/dw)^2``. Averaged over minibatches and
    summed over the layers of a coupled group. Runs on a copy in eval mode, so the model is untouched.

    :param num_batches: minibatches to average over (the paper accumulates over many; see
        :class:`pruning_core.SessionConfig` for the measured default).
    """

    def __init__(self, num_batches: int = 32):
        self.num_batches = num_batches

    def __call__(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 trace: ModelTrace) -> dict[str, torch.Tensor]:
        net = copy.deepcopy(model).eval()
        modules = dict(net.named_modules())
        use = _score_layers(trace)
        layers = sorted({n for names in use.values() for n in names})
        acc = {n: torch.zeros(trace.layers[n].out_channels, dtype=torch.float64) for n in layers}
        seen = 0
        for x, y in batches:
            if seen >= self.num_batches:
                break
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            with torch.no_grad():
                for n in layers:
                    acc[n] += taylor_term(modules[n], trace.layers[n].kind == "bn") ** 2
            seen += 1
        if seen == 0:
            raise ValueError("TaylorImportance needs at least one minibatch")
        return _to_group_scores(trace, {n: a / seen for n, a in acc.items()}, use)


class L1Importance:
    """L1 norm of the producing filters (Li et al. 2017), summed over a group's conv/linear outputs."""

    def __call__(self, model: nn.Module, batches: object, trace: ModelTrace) -> dict[str, torch.Tensor]:
        modules = dict(model.named_modules())
        use = {g.name: [m.module for m in g.members if m.dim == "out" and trace.layers[m.module].weighted]
               for g in trace.groups}
        with torch.no_grad():
            per_layer = {n: modules[n].weight.abs().flatten(1).sum(1) for names in use.values() for n in names}
        return _to_group_scores(trace, per_layer, use)
