"""Reconstruction (pruning_core.reconstruct): the refit's patches, exact fits, what it repairs, and when a
session refits."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import R20, needs_assets
from helpers import tiny_session
from torch import nn

from pruning_core import UserError, accuracy, kept_counts, prune, trace_model, uniform_ratios
from pruning_core.prune import removed_channels
from pruning_core.reconstruct import Reconstruction, _patches


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=(3, 1), padding=(1, 0), dilation=2),
                                  dict(kernel_size=3, padding="same", dilation=2),
                                  dict(kernel_size=3, padding=1, padding_mode="reflect"), dict(kernel_size=1)])
def test_reconstruction_patches_are_what_the_conv_reads(conv):
    c = nn.Conv2d(5, 7, bias=False, **conv)
    x = torch.randn(3, 5, 11, 9)
    y = c(x)
    n, o, _, w = y.shape
    idx = torch.randint(0, y.shape[2] * w, (n, 6))
    expected = y.flatten(2).gather(2, idx[:, None, :].expand(n, o, 6)).permute(0, 2, 1).reshape(-1, o)
    got = _patches(c, x, idx, w) @ c.weight.reshape(o, -1).T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reconstruction_keeps_an_exact_fit_and_repairs_a_pruned_model():
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, bias=False),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4)).eval()
    x = torch.randn(64, 3, 8, 8)
    rec = Reconstruction(net, x)
    same = copy.deepcopy(net)
    assert rec(same, {}) == 3  # every layer refitted, to the weights it already has: they fit exactly
    for a, b in zip(net.parameters(), same.parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    trace = trace_model(net, (3, 8, 8))
    scores = {g.name: torch.rand(g.channels) for g in trace.groups}
    kept = kept_counts(trace, {g.name: 0.5 for g in trace.groups})
    pruned = prune(net, {g.name: 0.5 for g in trace.groups}, scores, trace)
    with torch.no_grad():
        before = F.mse_loss(pruned(x), net(x))
        assert rec(pruned, removed_channels(trace, kept, scores)) == 3
        after = F.mse_loss(pruned(x), net(x))
    assert after < 0.5 * before, (before, after)


@needs_assets
def test_reconstruction_lifts_a_pruned_resnet(cifar):
    """ResNet-20 at 50% FLOPs: the refitted model is more accurate on held-out training images, with dropped
    branches (whose layers are gone) too."""
    from pruning_core import PruningSession, SessionConfig
    session = PruningSession("resnet20", str(R20), cifar, SessionConfig(taylor_batches=4))
    select = session.splits.select
    ratios = uniform_ratios(session.trace, 0.5)
    timings = {}
    gain = (accuracy(session.build(ratios, timings=timings, reconstruct=True), select)
            - accuracy(session.build(ratios), select))
    assert gain >= 3.0, gain
    assert set(timings) == {"prune_s", "reconstruct_s", "adapt_s"}
    dropped = {**ratios, sorted(session.trace.droppable)[0]: 1.0}
    assert accuracy(session.build(dropped, reconstruct=True), select) > accuracy(session.build(dropped), select)


def test_drop_costs_are_never_reconstructed():
    """Drop costs are measured on calibration images, which the refit is fitted to (on ResNet-56 their order
    then ranked a downsampling branch 5th cheapest of 27, against 25th): a reconstructing session measures them
    on plain rebuilds."""
    import dataclasses
    plain = tiny_session("resnet20", select_images=8)
    refit = copy.copy(plain)
    refit.config = dataclasses.replace(plain.config, reconstruct=True)
    calls = []
    build = refit.build
    refit.build = lambda *a, **kw: calls.append(kw.get("reconstruct")) or build(*a, **kw)
    assert refit.drop_costs() == plain.drop_costs()
    assert calls == [False] * len(plain.trace.droppable)


def test_reconstruction_needs_images():
    from pruning_core import PruningSession, SessionConfig
    with pytest.raises(UserError, match="reconstruct_images must be at least 1"):
        PruningSession("digits_cnn", None, "digits", SessionConfig(reconstruct=True, reconstruct_images=0))


def test_build_final_refits_only_with_adaptive_bn():
    """The kept model's refit fits layers to the inputs adaptive BN gives them: asked for without it, it is refused;
    by default it is simply off there."""
    from pruning_core import PruningSession, SessionConfig, uniform_ratios
    session = PruningSession("digits_cnn", None, "digits", SessionConfig(reward_images=64, calib_batches=1,
                                                                         select_images=0))
    ratios = uniform_ratios(session.trace, 0.5, 0.8)
    with pytest.raises(UserError, match="needs adaptive BN"):
        session.build_final(ratios, reconstruct=True, adapt=False)
    _, fields = session.build_final(ratios, adapt=False)
    assert fields == {"reconstruct": False}
