"""Allocations (pruning_core.allocate, prune.kept_channels): rounding to channel blocks, FLOPs budgets that hold,
and targets and ratios that are refused."""

import random

import pytest
import torch
from torch import nn

from pruning_core import (
    UserError,
    build_model,
    global_ratios,
    kept_channels,
    kept_counts,
    prune,
    trace_model,
    uniform_ratios,
)


def test_kept_channels_in_whole_blocks_with_drop():
    assert kept_channels(16, 0.6, 16) == 6  # not rounded: no wider than the block
    assert [kept_channels(16, r, 16, drop=True) for r in (0.0, 0.4, 0.6, 0.8)] == [16, 16, 0, 0]
    assert [kept_channels(64, r, 16, drop=True) for r in (0.3, 0.8, 0.9)] == [48, 16, 0]
    assert kept_channels(32, 1.0) == 0


def test_round_to_and_min_one_channel():
    trace = trace_model(build_model("vgg11_bn"), (3, 32, 32))
    scores = {g.name: torch.rand(g.channels) for g in trace.groups}
    pruned = prune(build_model("vgg11_bn"), {g.name: 0.37 for g in trace.groups}, scores, trace, round_to=8)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    tiny = prune(build_model("vgg11_bn"), {g.name: 0.999 for g in trace.groups}, scores, trace)
    assert all(c.out_channels == 1 for c in tiny.modules() if isinstance(c, nn.Conv2d))


@pytest.mark.parametrize("name", ["resnet56", "mobilenetv2", "vgg16_bn"])
def test_budget_never_exceeded(name):
    trace = trace_model(build_model(name), (3, 32, 32))
    rng = random.Random(1)
    dense = trace.flops()
    for _ in range(15):
        target = rng.uniform(0.3, 0.9)
        scores = {g.name: torch.rand(g.channels) for g in trace.groups}
        for ratios in (uniform_ratios(trace, target), global_ratios(trace, scores, target)):
            achieved = trace.flops(kept_counts(trace, ratios)) / dense
            assert achieved <= target
            assert achieved >= target - 0.02


def test_unreachable_target_and_bad_ratios():
    trace = trace_model(build_model("resnet20"), (3, 32, 32))
    with pytest.raises(UserError, match="unreachable"):
        uniform_ratios(trace, 0.01)
    scores = {g.name: torch.rand(g.channels) for g in trace.groups}
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(UserError, match=r"\[0, 1\)"):
            prune(build_model("resnet20"), {"layer1.0.conv1": bad}, scores, trace)
    vgg = trace_model(build_model("vgg11_bn"), (3, 32, 32))
    with pytest.raises(UserError, match="not a residual branch"):
        prune(build_model("vgg11_bn"), {vgg.groups[0].name: 1.0}, {g.name: torch.rand(g.channels) for g in vgg.groups},
              vgg)
    with pytest.raises(UserError, match="unknown group 'nope'"):
        prune(build_model("resnet20"), {"nope": 0.5}, scores, trace)
