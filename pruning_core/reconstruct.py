"""Least-squares reconstruction of a pruned model's layers against the dense model (He et al., "Channel Pruning for
Accelerating Very Deep Neural Networks", ICCV 2017; Luo et al., ThiNet, ICCV 2017; AMC uses it for its reward).

After channels are removed, every later layer sees inputs that differ from the dense model's: fewer channels, and
the errors of the layers before it. :class:`Reconstruction` refits each remaining conv (``groups == 1``) and
linear layer, in forward order and in one pass over a batch of training images, so that its outputs on that batch
match the dense layer's outputs (its kept output channels) as closely as a ridge-regularised least-squares fit
allows. Each fit starts from, and is pulled towards, the layer's pruned weights. It needs no labels and no
gradients.

Norm layers run on batch statistics during the pass, as adaptive BN would re-estimate them, so each fit sees the
inputs that the recalibrated model will; :meth:`PruningSession.build` recalibrates BN afterwards as usual.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Reconstruction"]

log = logging.getLogger(__name__)


def _fitted(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _patches(conv: nn.Conv2d, x: torch.Tensor, index: torch.Tensor, out_width: int) -> torch.Tensor:
    """The input patches that ``conv`` reads for the output positions ``index`` (``(N, P)``, flat over an output
    map ``out_width`` wide), as rows ``(N * P, C * kh * kw)`` in the weight's layout. Only those patches are
    gathered, not the whole unfolded input.
    """
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    else:
        if conv.padding == "same":  # as F.conv2d pads it: the odd one on the bottom and right
            ph, pw = dh * (kh - 1), dw * (kw - 1)
            pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        elif conv.padding == "valid":
            pad = (0, 0, 0, 0)
        else:
            pad = (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0])
        x = F.pad(x, pad)
    rows = (index // out_width)[:, :, None] * sh + torch.arange(kh, device=x.device)[None, None] * dh  # (N, P, kh)
    cols = (index % out_width)[:, :, None] * sw + torch.arange(kw, device=x.device)[None, None] * dw  # (N, P, kw)
    images = torch.arange(len(x), device=x.device)[:, None, None, None]
    patches = x[images, :, rows[:, :, :, None], cols[:, :, None, :]]  # (N, P, kh, kw, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, x.shape[1] * kh * kw)


class Reconstruction:
    """The dense model's layer outputs on ``images`` (computed once), and the fit of a pruned copy to them.

    :param dense: the dense model (not modified).
    :param images: the batch every fit uses; training images, never the test split. All of it goes through
        the model in one forward pass.
    :param positions: output positions sampled per image for each conv (a linear layer uses every image).
    :param ridge: the pull towards the pruned weights, relative to the mean diagonal of the inputs' Gram matrix.
        The default was chosen on held-out training images among 0.01, 0.1 and 1 (``docs/refit.md``).
    """

    def __init__(self, dense: nn.Module, images: torch.Tensor, positions: int = 16, ridge: float = 0.1,
                 seed: int = 0):
        if positions < 1 or ridge <= 0:
            raise ValueError(f"positions must be >= 1 and ridge > 0, got {positions} and {ridge}")
        self.images, self.ridge = images, ridge
        gen = torch.Generator().manual_seed(seed)
        self._index: dict[str, torch.Tensor] = {}
        self._width: dict[str, int] = {}
        self._target: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(module: nn.Module, inputs, out: torch.Tensor) -> None:
                if out.dim() == 4:  # conv: the same sampled positions of every image in the pruned model
                    n, c, h, w = out.shape
                    idx = torch.randint(0, h * w, (n, positions), generator=gen).to(out.device)
                    self._index[name], self._width[name] = idx, w
                    out = out.flatten(2).gather(2, idx[:, None, :].expand(n, c, positions))
                    out = out.permute(0, 2, 1).reshape(-1, c)
                self._target[name] = out.reshape(-1, out.shape[-1]).clone()
            return hook

        layers = [(name, m) for name, m in dense.named_modules() if _fitted(m)]
        hooks = [m.register_forward_hook(keep(name)) for name, m in layers]
        was_training = dense.training
        try:
            dense.eval()
            with torch.no_grad():
                dense(images)
        finally:
            for h in hooks:
                h.remove()
            dense.train(was_training)

    @torch.no_grad()
    def __call__(self, pruned: nn.Module, removed: dict[tuple[str, str], set[int]]) -> int:
        """Refit ``pruned``'s layers in place; return how many were refitted.

        :param removed: the dense output channels each layer lost (:func:`pruning_core.prune.removed_channels`),
            to pick the dense outputs a pruned layer should match. Layers of the dense model that are gone from
            ``pruned`` (a dropped residual branch) are skipped.
        """
        hooks = []
        for name, module in pruned.named_modules():
            if name not in self._target or not _fitted(module):
                continue
            gone = removed.get((name, "out"), set())
            target = self._target[name]
            if gone:
                target = target[:, [i for i in range(target.shape[1]) if i not in gone]]
            if target.shape[1] != (module.out_channels if isinstance(module, nn.Conv2d) else module.out_features):
                log.debug("reconstruction skips %s: output width does not match the dense layer's", name)
                continue
            hooks.append(module.register_forward_pre_hook(self._fit_hook(name, target)))
        norms = [m for m in pruned.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        momenta = [m.momentum for m in norms]
        was_training = pruned.training
        pruned.eval()
        for m in norms:  # batch statistics, as the recalibrated model will see them; running statistics unchanged
            m.train()
            m.momentum = 0.0
        try:
            pruned(self.images)
        finally:
            for h in hooks:
                h.remove()
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            pruned.train(was_training)
        return len(hooks)

    def _fit_hook(self, name: str, target: torch.Tensor):
        def fit(module: nn.Module, inputs) -> None:
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                a = _patches(module, x, self._index[name], self._width[name])
            else:
                a = x.reshape(-1, x.shape[-1])
            w0 = module.weight.reshape(module.weight.shape[0], -1)
            y = target
            if module.bias is not None:  # fit the bias too, unregularised: a column of ones
                a = torch.cat([a, a.new_ones(len(a), 1)], 1)
                w0 = torch.cat([w0, module.bias[:, None]], 1)
            gram = a.T @ a
            reg = torch.full((gram.shape[0],), self.ridge * float(gram.diagonal().mean()), dtype=gram.dtype,
                             device=gram.device)
            if module.bias is not None:
                reg[-1] = 1e-6 * reg[0]
            w = torch.linalg.solve(gram + torch.diag(reg), a.T @ y + reg[:, None] * w0.T).T
            if module.bias is not None:
                module.bias.copy_(w[:, -1])
                w = w[:, :-1]
            module.weight.copy_(w.reshape_as(module.weight))
        return fit
