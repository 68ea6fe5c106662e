"""Latency measurement (pruning_core.latency): every backend times a pruned model against dense, and the
deployment form the torch-cl backend times (BN folded, channels-last) computes what the module does."""

import logging

import pytest
import torch
from helpers import randomise
from torch import nn

from pruning_core import UserError, build_model, compare_latency, measure_latency, prune, trace_model, uniform_ratios
from pruning_core.latency import deploy_form


@pytest.mark.parametrize("backend", ["torch", "torch-cl", "onnxruntime"])
def test_latency_backends_see_the_pruning(backend):
    """Every runtime times a pruned VGG-16 against dense in pairs. How much faster it runs is a benchmark's
    question (a shared 2-core VM makes any threshold flaky)."""
    model = build_model("vgg16_bn").eval()
    trace = trace_model(model, (3, 32, 32))
    scores = {g.name: torch.rand(g.channels) for g in trace.groups}
    pruned = prune(model, uniform_ratios(trace, 0.25), scores, trace)
    timed = compare_latency(model, pruned, (3, 32, 32), 8, backend=backend, repeats=3, min_run_time=0.2)
    assert timed["dense_ms"] > 0 and timed["pruned_ms"] > 0, timed
    with pytest.raises(UserError, match="unknown latency backend"):
        measure_latency(model, (3, 32, 32), backend="tensorrt")


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_deploy_form_folds_bn_and_computes_the_same(caplog):
    """The torch-cl backend times the same function: BN folded into the convs (also through the CIFAR ResNet's
    channel-padding shortcut), channels-last, outputs equal to the module's; the module itself is untouched."""
    model = randomise(build_model("resnet20")).eval()
    trace = trace_model(model, (3, 32, 32))
    pruned = prune(model, uniform_ratios(trace, 0.5), {g.name: torch.rand(g.channels) for g in trace.groups}, trace)
    deployed = deploy_form(pruned)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(deployed(x.contiguous(memory_format=torch.channels_last)), pruned(x), atol=1e-4)
    # not traceable: the BN stays, still channels-last, and the log says why
    branchy = _Branchy().eval()
    with caplog.at_level(logging.INFO, logger="pruning_core.latency"):
        kept = deploy_form(branchy)
    assert isinstance(kept.bn, nn.BatchNorm2d) and "folding skipped" in caplog.text
    assert kept.conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(kept(x), branchy(x), atol=1e-5)
