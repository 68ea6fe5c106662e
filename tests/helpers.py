"""Helpers shared by the test files: the masking reference that physical pruning must reproduce, small models
several files prune, and tiny set-ups of sessions and searches.

A plain module (not a conftest): import what a test file needs, as in ``from helpers import randomise``.
"""

import copy
import random

import torch
import torch.nn.functional as F
from torch import nn

from envs import PruneEnv
from pruning_core import PruningSession, SessionConfig, build_model, kept_counts, measure_flops, prune, trace_model
from pruning_core.data import CIFAR_MEAN, CIFAR_STD, ImageData, Split
from pruning_core.prune import kept_indices


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BN layers non-trivial statistics so that masking mistakes show in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)  # BN, instance norm, group norm


def masked(model: nn.Module, trace, ratios, scores) -> nn.Module:
    """The dense model with the pruned channels' BN gates (or, without BN, filters) zeroed, and a dropped branch's
    output (its reader's bias, the BN after it) zeroed too."""
    net = copy.deepcopy(model)
    mods = dict(net.named_modules())
    kept = kept_counts(trace, ratios)
    with torch.no_grad():
        for g in trace.groups:
            keep = set(kept_indices(g, scores[g.name], kept[g.name]))
            drop = [c for c in range(g.channels) if c not in keep]
            outs = [m for m in g.members if m.dim == "out"]
            bns = [m for m in outs if isinstance(mods[m.module], NORMS)]
            for m in bns or outs:
                idx = torch.tensor([i for c in drop for i in m.index[c]], dtype=torch.long)
                mod = mods[m.module]
                if m in bns and not mod.affine:  # no gate to zero: zero its output
                    mod.register_forward_hook(lambda _m, _i, out, idx=idx: out.index_fill(1, idx, 0.0))
                    continue
                mod.weight[idx] = 0
                if getattr(mod, "bias", None) is not None:  # a PReLU has slopes only
                    mod.bias[idx] = 0
            for m in g.members:  # a norm reading a concat (DenseNet): its slice of these channels outputs zeros
                if m.dim == "in" and isinstance(mods[m.module], NORMS) and mods[m.module].affine:
                    idx = torch.tensor([i for c in drop for i in m.index[c]], dtype=torch.long)
                    mods[m.module].weight[idx] = 0
                    mods[m.module].bias[idx] = 0
            if kept[g.name] == 0:
                for m in g.members:
                    if m.dim == "in":
                        for name in (m.module, *trace.branch_bns(m.module)):
                            if mods[name].bias is not None:
                                mods[name].bias.zero_()
                            if isinstance(mods[name], NORMS) and mods[name].affine:
                                mods[name].weight.zero_()
    return net


def random_ratios(trace, rng: random.Random) -> dict[str, float]:
    return {g.name: rng.uniform(0.0, 0.9) for g in trace.groups if rng.random() < 0.85}


def random_drops(trace, rng: random.Random) -> dict[str, float]:
    """Random ratios with about half the residual branches dropped (ratio 1)."""
    return {**random_ratios(trace, rng), **{g: 1.0 for g in sorted(trace.droppable) if rng.random() < 0.5}}


def check_equivalence(model, input_shape, n_dicts=3, ratios_of=random_ratios):
    trace = trace_model(model, input_shape)
    rng = random.Random(0)
    x = torch.randn(8, *input_shape)
    for i in range(n_dicts):
        scores = {g.name: torch.rand(g.channels, generator=torch.Generator().manual_seed(i)) for g in trace.groups}
        ratios = ratios_of(trace, rng)
        pruned = prune(model, ratios, scores, trace)
        with torch.no_grad():
            ref, out = masked(model, trace, ratios, scores)(x), pruned(x)
        assert measure_flops(pruned, input_shape) == trace.flops(kept_counts(trace, ratios))
        assert sum(p.numel() for p in pruned.parameters()) == trace.params(kept_counts(trace, ratios))
        assert torch.allclose(out, ref, atol=1e-4), float((out - ref).abs().max())


def cbr(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Grouped(nn.Module):
    """A ResNeXt block (1x1, 3x3 with 4 conv groups, 1x1, skip), a plain grouped conv with 2 groups, and a
    depthwise conv with a channel multiplier of 2 (each input channel its own conv group, two outputs each)."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32)
        self.a, self.b = cbr(32, 24, 1), nn.Sequential(nn.Conv2d(24, 48, 3, padding=1, groups=4), nn.BatchNorm2d(48),
                                                          nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(48, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.g = nn.Sequential(nn.Conv2d(32, 24, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(24, 48, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.c(self.b(self.a(x))))
        return self.fc(self.dw(self.g(x)).mean((2, 3)))


def tiny_cifar() -> ImageData:
    """32 random CIFAR-shaped images (the same as training and test split), from a generator of their own."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    return ImageData("random", Split(x, y, CIFAR_MEAN, CIFAR_STD), Split(x, y, CIFAR_MEAN, CIFAR_STD), 10)


TINY_SESSION = dict(reward_images=8, calib_batches=1, taylor_batches=1, batch_size=8)


def tiny_session(model: str | nn.Module, **config) -> PruningSession:
    """A session of ``model`` (a zoo name, built here with random weights, or a module) on :func:`tiny_cifar`,
    with splits of a few images (``TINY_SESSION``, which ``config`` overrides): fast to build, for tests of the
    trace, the budgets and the env rather than of accuracy."""
    if isinstance(model, str):
        model = build_model(model)
    return PruningSession(model, None, tiny_cifar(), SessionConfig(**{**TINY_SESSION, **config}))


class BudgetOnlyEnv(PruneEnv):
    """Skips the (slow) model evaluation so the clamp can be exercised over many episodes."""

    def evaluate(self, kept):
        return 0.0, {"flops_ratio": self.trace.flops(kept) / self.dense_flops, "ratios": dict(self.ratios)}


TINY_SEARCH = dict(hidden=16, gnn_layers=1, net_arch=(32, 32), progress=False, reward_images=64, calib_batches=1)
"""TrainConfig fields that make a search a smoke test: a one-layer, 16-wide encoder, small heads, 64 reward images
and one calibration batch, no progress bar."""


def tiny_config(**kw):
    """A :class:`agent.TrainConfig` with ``TINY_SEARCH``, which ``kw`` overrides (a file binds its own run length
    with :func:`functools.partial`; keywords given at the call still win)."""
    from agent import TrainConfig
    return TrainConfig(**{**TINY_SEARCH, **kw})
