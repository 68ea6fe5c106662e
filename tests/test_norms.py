"""Norms and activations with per-channel parameters, traced and cut like BN: BatchNorm1d and BN without affine
parameters, PReLU (per channel and shared), instance norm, group norm (whole norm groups), and units of channels
that do not nest."""

import pytest
import torch
import torch.nn.functional as F
from helpers import cbr, check_equivalence, random_drops, randomise
from torch import nn

from graph_encoder import LayerGraph
from pruning_core import adapt_bn, kept_counts, prune, trace_model
from pruning_core.data import Split
from pruning_core.importance import TaylorImportance
from pruning_core.prune import kept_indices


class BNVariants(nn.Module):
    """A BN without affine parameters (no gate: Taylor scores the conv's filters) and a BatchNorm1d head."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16, affine=False)
        self.c2 = cbr(16, 16)
        self.fc1, self.bn1, self.fc2 = nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 10)

    def forward(self, x):
        x = self.c2(F.relu(self.bn(self.c1(x)))).mean((2, 3))
        return self.fc2(F.relu(self.bn1(self.fc1(x))))


def test_bn1d_and_non_affine_bn():
    model = randomise(BNVariants())
    check_equivalence(model, (3, 8, 8))
    trace = trace_model(model, (3, 8, 8))
    assert [g.name for g in trace.groups] == ["c1", "c2.0", "fc1"]
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))] * 2
    scores = TaylorImportance(2)(model, batches, trace)
    assert all(bool(torch.isfinite(s).all()) and float(s.sum()) > 0 for s in scores.values())


class SlopeBlock(nn.Module):
    """A residual block with shared-slope PReLUs: one inside the branch, one after the add."""

    def __init__(self, c: int):
        super().__init__()
        self.c1, self.n1, self.a1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.PReLU()
        self.c2, self.n2, self.a2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.PReLU()

    def forward(self, x):
        return self.a2(x + self.n2(self.c2(self.a1(self.n1(self.c1(x))))))


class SlopesAndNorms(nn.Module):
    """PReLU with a slope per channel (after a conv and after a linear layer) and with one shared slope (residual
    branches in a block of their own and in the top module), and instance norm with affine parameters, with and
    without running statistics."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.InstanceNorm2d(16, affine=True), nn.PReLU(16))
        self.block = SlopeBlock(16)
        self.c1, self.n1, self.a1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.PReLU()
        self.c2, self.n2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1),
                                  nn.InstanceNorm2d(32, affine=True, track_running_stats=True), nn.PReLU(32))
        self.fc1, self.act, self.fc2 = nn.Linear(32, 20), nn.PReLU(20), nn.Linear(20, 10)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = x + self.n2(self.c2(self.a1(self.n1(self.c1(x)))))
        return self.fc2(self.act(self.fc1(self.down(x).mean((2, 3)))))


def test_prelu_and_instance_norm_are_cut_like_bn():
    model = randomise(SlopesAndNorms())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # slopes of both signs; instance-norm gates, biases and statistics away from 1 and 0
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.num_parameters, generator=g) - 0.5)
            elif isinstance(m, nn.InstanceNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        # the stem's output is never negative, so once its branch is dropped the block computes block.a2(x) = x;
        # it becomes block.a2 (whose slope the trace counts), not the identity
        model.stem[2].weight.copy_(-torch.rand(16, generator=g))
    check_equivalence(model, (3, 8, 8), n_dicts=4)
    check_equivalence(model, (3, 8, 8), n_dicts=6, ratios_of=random_drops)  # a branch's shared slope goes with it
    trace = trace_model(model, (3, 8, 8))
    assert [g.name for g in trace.groups] == ["stem.0", "block.c1", "c1", "down.0", "fc1"] and not trace.excluded
    assert trace.droppable == {"block.c1", "c1"}
    assert trace.shared_slopes == {"block.a1": "block.c1", "block.a2": "stem.0", "a1": "c1"}
    assert [trace.layers[n].kind for n in ("stem.1", "stem.2", "act")] == ["bn", "act", "act"]
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))] * 2
    scores = TaylorImportance(2)(model, batches, trace)  # on the instance norms' gates, as on BN's
    assert all(bool(torch.isfinite(s).all()) and float(s.sum()) > 0 for s in scores.values())
    graph = LayerGraph.from_trace(trace, scores)  # a norm node for instance norm; a PReLU is no node, as a ReLU
    assert [graph.names[i] for i in graph.group_nodes[0]] == ["stem.0", "stem.1", "block.c2", "block.n2", "c2", "n2"]
    before = model.down[1].running_mean.clone()  # adaptive BN re-estimates instance norm's running statistics
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    adapt_bn(model, Split(images, torch.zeros(64, dtype=torch.long), (0.2,) * 3, (0.3,) * 3), num_batches=1)
    assert not torch.allclose(model.down[1].running_mean, before)


class GroupNormNet(nn.Module):
    """Group norm with norm groups of 4 channels (the stem), of 2 inside a residual branch (so the stream goes in
    runs of 4), of 1 (per channel), and of all 32 channels (which cannot lose any)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.c1, self.n1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.GroupNorm(16, 16)
        self.c2, self.n2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.GroupNorm(8, 16)
        self.down, self.nd = nn.Conv2d(16, 32, 3, 2, 1), nn.GroupNorm(1, 32)
        self.c3, self.n3 = nn.Conv2d(32, 24, 1), nn.GroupNorm(6, 24, affine=False)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.n2(self.c2(F.relu(self.n1(self.c1(x))))))
        x = F.relu(self.n3(self.c3(F.relu(self.nd(self.down(x))))))
        return self.fc(x.mean((2, 3)))


def test_group_norm_loses_whole_norm_groups():
    model = randomise(GroupNormNet())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm) and m.affine:
                m.weight.copy_(torch.rand(m.num_channels, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_channels, generator=g) * 0.2)
    check_equivalence(model, (3, 8, 8), n_dicts=5)
    check_equivalence(model, (3, 8, 8), n_dicts=4, ratios_of=random_drops)
    trace = trace_model(model, (3, 8, 8))
    assert {g.name: g.unit for g in trace.groups} == {"stem.0": 4, "c1": 1, "c3": 4}
    assert trace.excluded == {"down": "group norm nd (num_groups=1) normalises all these channels together"}
    assert trace.droppable == {"c1"} and trace.layers["n2"].kind == "bn"
    assert [kept_counts(trace, {"stem.0": r, "c3": r})["stem.0"] for r in (0.1, 0.3, 0.55, 0.9)] == [16, 12, 8, 4]
    assert [kept_counts(trace, {"c3": r}, round_to=8)["c3"] for r in (0.3, 0.55, 0.9)] == [24, 16, 8]
    scores = {"stem.0": torch.arange(16.0), "c1": torch.rand(16), "c3": torch.rand(24)}
    pruned = prune(model, {"stem.0": 0.5}, scores, trace)  # the two norm groups of 4 with the highest sums
    assert (pruned.stem[1].num_groups, pruned.stem[1].num_channels, pruned.n2.num_groups) == (2, 8, 4)
    assert kept_indices(trace.group("stem.0"), scores["stem.0"], 8) == list(range(8, 16))
    with pytest.raises(ValueError, match="not a multiple of its group norm's 4-channel unit"):
        kept_indices(trace.group("stem.0"), scores["stem.0"], 6)
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))] * 2
    taylor = TaylorImportance(2)(model, batches, trace)  # on the group norms' gates, as on BN's
    assert all(bool(torch.isfinite(s).all()) and float(s.sum()) > 0 for s in taylor.values())
    graph = LayerGraph.from_trace(trace, taylor)
    assert [graph.names[i] for i in graph.group_nodes[0]] == ["stem.0", "stem.1", "c2", "n2"]


class UnevenUnits(nn.Module):
    """Two group norms on one residual stream of 12 channels in norm groups of 4 and of 6, and two grouped convs
    reading the same 6 channels with 2 and with 3 conv groups: each alone could lose channels, together they
    cannot (whole units of both make one unit of every channel)."""

    def __init__(self):
        super().__init__()
        self.stem, self.n0 = nn.Conv2d(3, 12, 3, padding=1), nn.GroupNorm(3, 12)
        self.c, self.n1 = nn.Conv2d(12, 12, 3, padding=1), nn.GroupNorm(2, 12)
        self.p = nn.Conv2d(12, 6, 1)
        self.g2, self.g3 = nn.Conv2d(6, 6, 3, padding=1, groups=2), nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        x = self.n0(self.stem(x))
        x = F.relu(x + self.n1(self.c(x)))
        x = F.relu(self.p(x))
        return self.fc((self.g2(x) + self.g3(x)).mean((2, 3)))


def test_units_that_only_together_cover_a_group_are_named_as_such():
    trace = trace_model(randomise(UnevenUnits()), (3, 8, 8))
    assert set(trace.excluded) == {"c", "p", "g2"} and [g.name for g in trace.groups] == []
    assert "norm groups that do not nest" in trace.excluded["c"], trace.excluded
    assert "normalises all these channels together" not in trace.excluded["c"]
    for name in ("p", "g2"):
        assert "least common multiple is 6" in trace.excluded[name], trace.excluded
        assert "channel multiplier" not in trace.excluded[name]
