"""Channel importance criteria: first- and second-order Taylor (Molchanov et al. 2019), L1 magnitude and DRIVE's
dual-gradient metric (Saikumar and Varghese 2024).

An importance is a callable ``importance(model, batches, trace) -> dict[group, Tensor]`` returning
one score per channel of every prunable group (higher means more important).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.device import model_device
from pruning_core.graph import ModelTrace

__all__ = ["IMPORTANCES", "DriveImportance", "L1Importance", "Taylor2Importance", "TaylorImportance", "drive_score",
           "drive_terms", "taylor_term"]

IMPORTANCES = ("taylor", "taylor2", "l1", "drive")


def _to_group_scores(trace: ModelTrace, per_layer: dict[str, torch.Tensor], use: dict[str, list[str]]) -> dict:
    """Sum per-layer channel scores into group channel scores through each member's index map."""
    out = {}
    for g in trace.groups:
        total = torch.zeros(g.channels, dtype=torch.float64)
        members = {m.module: m for m in g.members if m.dim == "out"}  # a gate conv may also read the group
        for layer in use[g.name]:
            idx = torch.tensor(members[layer].index)  # (channels, 1) for out members
            total += per_layer[layer][idx].sum(dim=1).double().cpu()
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


class _PerBatchCriterion:
    """The loop both Taylor criteria share: on a copy in eval mode, :meth:`_terms` gives one squared term per
    channel of every scored layer per minibatch; these are averaged over ``num_batches`` minibatches and summed over
    the layers of a coupled group.
    """

    num_batches: int

    def __call__(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 trace: ModelTrace) -> dict[str, torch.Tensor]:
        net = copy.deepcopy(model).eval()
        modules = dict(net.named_modules())
        use = _score_layers(trace)
        layers = sorted({n for names in use.values() for n in names})
        acc = {n: torch.zeros(trace.layers[n].out_channels, dtype=torch.float64) for n in layers}
        self._start()
        seen = 0
        dev = model_device(net)
        for x, y in batches:
            if seen >= self.num_batches:
                break
            for n, term in self._terms(net, modules, trace, layers, x.to(dev), y.to(dev)).items():
                acc[n] += term.cpu()
            seen += 1
        if seen == 0:
            raise ValueError(f"{type(self).__name__} needs at least one minibatch")
        return _to_group_scores(trace, {n: a / seen for n, a in acc.items()}, use)

    def _start(self) -> None:
        """Called once per scoring, before the first minibatch."""

    def _terms(self, net: nn.Module, modules: dict[str, nn.Module], trace: ModelTrace, layers: list[str],
               x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class TaylorImportance(_PerBatchCriterion):
    """First-order Taylor importance of Molchanov et al., CVPR 2019 (https://arxiv.org/abs/1906.10771).

    Per minibatch and channel, on the BN gate: ``(sum_c gamma*dL/dgamma + beta*dL/dbeta)^2``; on the
    weights where a group has no BN: ``(sum over the filter of w*dL/dw)^2``. Averaged over minibatches and
    summed over the layers of a coupled group. Runs on a copy in eval mode, so the model is untouched.

    :param num_batches: minibatches to average over (the paper accumulates over many; see
        :class:`pruning_core.SessionConfig` for the measured default).
    """

    def __init__(self, num_batches: int = 32):
        self.num_batches = num_batches

    def _terms(self, net, modules, trace, layers, x, y):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        with torch.no_grad():
            return {n: taylor_term(modules[n], trace.layers[n].kind == "bn") ** 2 for n in layers}


class Taylor2Importance(_PerBatchCriterion):
    """Second-order Taylor importance of Molchanov et al., CVPR 2019: per minibatch and channel, the squared
    second-order estimate of the loss change when the channel is removed, ``(-g + h/2)^2``.

    Removing a channel scales its parameters ``v`` (a BN's gamma and beta, or the filter and bias where the group
    has no BN) by a gate from 1 to 0. ``g = v . dL/dv`` is the first-order term :class:`TaylorImportance` squares,
    and ``h = v^T H v`` the curvature along that direction, the diagonal of the Hessian over the gates. ``h`` is
    estimated by Hutchinson's method: ``probes`` Hessian-vector products per minibatch with random signs per
    channel, which cancel the cross-channel terms in expectation. The paper applies the expansion to single
    parameters and to a gate per filter; this applies it to that per-channel gate over the layer's own parameters.
    Averaged over minibatches and summed over the layers of a coupled group, like :class:`TaylorImportance`, at
    about ``1 + 2 * probes`` times its cost.
    """

    def __init__(self, num_batches: int = 32, probes: int = 4, seed: int = 0):
        self.num_batches, self.probes, self.seed = num_batches, probes, seed

    def _start(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)  # the same signs in every scoring

    def _terms(self, net, modules, trace, layers, x, y):
        params = {n: [p for p in (modules[n].weight, modules[n].bias) if p is not None] for n in layers}
        flat = [p for n in layers for p in params[n]]
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), flat, create_graph=True)
        grad = dict(zip(map(id, flat), grads))
        first = {n: sum(_per_channel(p.detach() * grad[id(p)].detach()) for p in params[n]) for n in layers}
        curvature = {n: torch.zeros_like(first[n]) for n in layers}
        for _ in range(self.probes):
            signs = {n: (torch.randint(0, 2, (trace.layers[n].out_channels,), generator=self._gen).float() * 2 - 1)
                     .to(x.device) for n in layers}
            directions = [_along(p.detach(), signs[n]) for n in layers for p in params[n]]
            hv = torch.autograd.grad(grads, flat, grad_outputs=directions, retain_graph=True)
            hv = dict(zip(map(id, flat), hv))
            for n in layers:  # z_c v_c . (H u)_c, whose mean over the signs is v_c^T H v_c
                curvature[n] += signs[n] * sum(_per_channel(p.detach() * hv[id(p)]) for p in params[n])
        with torch.no_grad():
            return {n: (-first[n] + curvature[n] / self.probes / 2).double() ** 2 for n in layers}


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """Sum a parameter-shaped tensor over everything but its output-channel dimension."""
    return t.flatten(1).sum(1) if t.dim() > 1 else t


def _along(p: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``p`` with each output channel's slice multiplied by that channel's sign."""
    return p * signs.view(-1, *([1] * (p.dim() - 1)))


class L1Importance:
    """L1 norm of the producing filters (Li et al. 2017), summed over a group's conv/linear outputs."""

    def __call__(self, model: nn.Module, batches: object, trace: ModelTrace) -> dict[str, torch.Tensor]:
        modules = dict(model.named_modules())
        use = {g.name: [m.module for m in g.members if m.dim == "out" and trace.layers[m.module].weighted]
               for g in trace.groups}
        with torch.no_grad():
            per_layer = {n: modules[n].weight.abs().flatten(1).sum(1) for names in use.values() for n in names}
        return _to_group_scores(trace, per_layer, use)


def drive_terms(model: nn.Module, trace: ModelTrace, groups: list[str]) -> dict[str, torch.Tensor]:
    """Per group channel, DRIVE's three terms from the current weights and their ``.grad`` (after a backward pass),
    summed over the channel's producing filters: (L1 norm ``sum |w|``, connection sensitivity ``sum |w * dL/dw|``,
    convergence sensitivity ``sum |dL/dw|``), stacked as a (3, channels) tensor.
    """
    modules = dict(model.named_modules())
    out = {}
    for name in groups:
        g = trace.group(name)
        total = torch.zeros(3, g.channels, dtype=torch.float64)
        for m in g.members:
            if m.dim == "out" and trace.layers[m.module].weighted:
                w = modules[m.module].weight
                grad = w.grad if w.grad is not None else torch.zeros_like(w)
                terms = torch.stack([w.detach().abs().flatten(1).sum(1), (w.detach() * grad).abs().flatten(1).sum(1),
                                     grad.abs().flatten(1).sum(1)]).double().cpu()
                total += terms[:, torch.tensor([idx[0] for idx in m.index])]
        out[name] = total
    return out


def drive_score(terms: torch.Tensor) -> torch.Tensor:
    """DRIVE's ranking from :func:`drive_terms`: each term divided by its mean over the group's channels, summed."""
    return (terms / terms.mean(1, keepdim=True).clamp_min(1e-30)).sum(0)


class DriveImportance:
    """DRIVE's dual-gradient metric (:func:`drive_score` of :func:`drive_terms`), its gradient terms averaged over
    ``num_batches`` minibatches, on a copy of the model in eval mode.
    """

    def __init__(self, num_batches: int = 32):
        self.num_batches = num_batches

    def __call__(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 trace: ModelTrace) -> dict[str, torch.Tensor]:
        net = copy.deepcopy(model).eval()
        dev = model_device(net)
        names = [g.name for g in trace.groups]
        acc = {n: torch.zeros(3, trace.group(n).channels, dtype=torch.float64) for n in names}
        seen = 0
        for x, y in batches:
            if seen >= self.num_batches:
                break
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x.to(dev)), y.to(dev)).backward()
            for n, t in drive_terms(net, trace, names).items():
                acc[n] += t
            seen += 1
        if seen == 0:
            raise ValueError("DriveImportance needs at least one minibatch")
        return {n: drive_score(a) for n, a in acc.items()}
