"""Stochastic pruning of activation gradients in the backward pass (Ye et al., "Accelerating CNN Training by Pruning
Activation Gradients", arXiv 1908.00173), to make back-propagation cheaper where sparse kernels exist.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import nn

__all__ = ["ActGradPruner"]


class _PruneGrad(torch.autograd.Function):
    """The identity forward; its backward passes the gradient through :meth:`ActGradPruner.prune`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pruner: ActGradPruner, key: int) -> torch.Tensor:
        ctx.pruner, ctx.key = pruner, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.pruner.prune(grad, ctx.key), None, None


class ActGradPruner:
    """Prune the gradient at every conv layer's output, the one both of its backward convolutions read.

    Per layer and step, ``tau = Phi^-1((1 + p) / 2) * sigma`` with ``sigma = sqrt(pi / 2) * mean |g|``, the threshold
    below which a fraction ``p`` (``sparsity``) of normally distributed gradients lies; each entry with ``|g| < tau``
    becomes ``sign(g) * tau`` with probability ``|g| / tau`` and 0 otherwise, which leaves its expectation unchanged.
    Dense kernels gain nothing from the zeros; :meth:`summary` reports the fraction reached and the backward
    multiply-accumulates a kernel that skipped them would save. The draws use torch's global generator. Remove with
    :meth:`remove`.

    :param stats: counters from an earlier pruner's :meth:`stats`, continued (a resumed or re-pruned model).
    """

    def __init__(self, model: nn.Module, sparsity: float, stats: dict | None = None):
        self.sparsity = sparsity
        self.z = NormalDist().inv_cdf((1 + sparsity) / 2)
        self.counts = dict(stats or {"entries": 0, "zeros": 0, "at_tau": 0, "macs_dense": 0, "macs_sparse": 0.0})
        self._macs: dict[int, int] = {}  # per hooked layer: backward MACs of its last forward, if dense
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(model.modules())
                         if isinstance(m, nn.Conv2d)]

    def _hook(self, key: int):
        def attach(mod: nn.Conv2d, inp: tuple, out: torch.Tensor):
            if not (torch.is_grad_enabled() and out.requires_grad):
                return None
            per_out = mod.weight[0].numel()  # MACs per output entry
            # the weight gradient, and the input gradient unless nothing upstream needs it (the first conv)
            self._macs[key] = out.numel() * per_out * (2 if inp[0].requires_grad else 1)
            return _PruneGrad.apply(out, self, key)
        return attach

    def prune(self, g: torch.Tensor, key: int) -> torch.Tensor:
        mag = g.abs()
        tau = self.z * math.sqrt(math.pi / 2) * float(mag.mean())
        if tau <= 0:
            return g
        small = mag < tau
        up = torch.rand_like(g) < mag / tau
        out = torch.where(small, torch.where(up, torch.sign(g) * tau, torch.zeros_like(g)), g)
        zeros = int((out == 0).sum())
        c = self.counts
        c["entries"] += g.numel()
        c["zeros"] += zeros
        c["at_tau"] += int((small & up).sum())
        macs = self._macs.get(key, 0)
        c["macs_dense"] += macs
        c["macs_sparse"] += macs * (1 - zeros / g.numel())
        return out

    def stats(self) -> dict:
        return dict(self.counts)

    def summary(self) -> dict:
        """The target, the fraction of gradient entries made 0 and set to ``±tau``, and the backward conv MACs a
        zero-skipping kernel would save.
        """
        c = self.counts
        n = max(1, c["entries"])
        return {"target": self.sparsity, "zero_fraction": round(c["zeros"] / n, 4),
                "tau_fraction": round(c["at_tau"] / n, 4), "backward_conv_macs": c["macs_dense"],
                "backward_conv_macs_saved": round(1 - c["macs_sparse"] / max(1, c["macs_dense"]), 4)}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
