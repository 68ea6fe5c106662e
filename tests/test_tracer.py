"""The trace's channel groups (pruning_core.tracer, groups, opcheck): grouped and depthwise convs, the classes'
channels, the exclusions it names (the ResNet padding shortcut, layers it cannot prune or count)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import Grouped, cbr, check_equivalence, random_drops, randomise
from torch import nn

from pruning_core import UserError, build_model, kept_counts, prune, trace_model, uniform_ratios
from pruning_core.prune import kept_indices


def test_grouped_convs_prune_evenly_per_conv_group():
    """A grouped conv's conv groups must stay equal: every group it reads or writes loses the same number of
    channels from each of its blocks (the highest-scoring ones within each block), and a grouped conv's filters
    keep their own group's inputs. A depthwise conv with a channel multiplier reads each channel in a group of its
    own, so the group feeding it stays whole. Grouped convs were refused before."""
    model = randomise(Grouped())
    check_equivalence(model, (3, 8, 8), n_dicts=4)
    trace = trace_model(model, (3, 8, 8))
    check_equivalence(model, (3, 8, 8), ratios_of=random_drops)
    blocks = {g.name: g.blocks for g in trace.groups}
    assert blocks == {"stem.0": 2, "a.0": 4, "b.0": 4, "dw.0": 24}, blocks  # stem: read by g (2 conv groups)
    assert "channel multiplier" in trace.excluded["g.0"] and "b.0" in trace.droppable
    for ratio in (0.3, 0.55, 0.8):
        kept = kept_counts(trace, {g.name: ratio for g in trace.groups}, round_to=8)
        assert all(kept[n] % b == 0 for n, b in blocks.items()), kept
        assert kept["b.0"] % 8 == 0 and kept["dw.0"] % 24 == 0
    scores = {g.name: torch.arange(g.channels, dtype=torch.float) for g in trace.groups}
    pruned = prune(model, {"b.0": 0.5}, scores, trace)
    # each of b's 4 conv groups keeps its top 6 of 12 outputs: the last six of each block by these scores
    assert pruned.b[0].groups == 4 and pruned.b[0].out_channels == 24 and pruned.c[0].in_channels == 24
    assert torch.equal(pruned.b[0].weight, model.b[0].weight[[12 * k + i for k in range(4) for i in range(6, 12)]])
    assert sum(p.numel() for p in pruned.parameters()) == trace.params(kept_counts(trace, {"b.0": 0.5}))
    with pytest.raises(ValueError, match="multiple of its 4 blocks"):
        kept_indices(trace.group("b.0"), scores["b.0"], 10)


class ConvClassifier(nn.Module):
    """An all-conv net (NIN, SqueezeNet): the classes are a 1x1 conv's channels, then BN, pooling and log-softmax."""

    def __init__(self):
        super().__init__()
        self.body, self.classes, self.bn = cbr(3, 16), nn.Conv2d(16, 10, 1), nn.BatchNorm2d(10)

    def forward(self, x):
        return F.log_softmax(F.adaptive_avg_pool2d(self.bn(self.classes(self.body(x))), 1).flatten(1), 1)


def test_class_channels_are_never_pruned():
    """The output layer is found backwards from the output through BN and functional ops, not only as the last
    node: pruning the classifier conv would silently score fewer classes."""
    model = randomise(ConvClassifier())
    trace = trace_model(model, (3, 8, 8))
    assert [g.name for g in trace.groups] == ["body.0"]
    pruned = prune(model, uniform_ratios(trace, 0.6), {"body.0": torch.rand(16)}, trace)
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    check_equivalence(model, (3, 8, 8))


def test_resnet_padding_shortcut_group_is_excluded():
    trace = trace_model(build_model("resnet20"), (3, 32, 32))
    assert [g.name for g in trace.groups] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert len(trace.excluded) == 1
    reason = next(iter(trace.excluded.values()))
    assert "ConstantPadNd from [1, 16, 16, 16] to [1, 32, 16, 16]" in reason, reason  # the zero-padding shortcut


def test_depthwise_conv_coupled_with_producer():
    trace = trace_model(build_model("mobilenetv2"), (3, 32, 32))
    for layer, info in trace.layers.items():
        if info.depthwise and layer != "features.3.conv.0":
            group = trace.group(trace.out_group[layer])
            producers = [m.module for m in group.members if m.dim == "out" and not trace.layers[m.module].depthwise
                         and trace.layers[m.module].kind == "conv"]
            assert producers, f"depthwise {layer} has no producing conv in its group"


def test_unsupported_layer_names_the_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm([8, 6, 6]), nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(UserError, match=r"'1' \(LayerNorm\)"):
        trace_model(model, (3, 8, 8))
    # a layer called twice: its channels and FLOPs would be counted once
    shared = nn.Conv2d(8, 8, 3, padding=1)
    twice = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), shared, nn.ReLU(), shared, nn.Flatten(), nn.Linear(512, 10))
    with pytest.raises(UserError, match="calls '1' more than once per forward pass"):
        trace_model(twice, (3, 8, 8))
    act = nn.PReLU()  # a shared slope is a weight too
    twice = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act, nn.Conv2d(8, 8, 3, padding=1), act, nn.Flatten(),
                          nn.Linear(512, 10))
    with pytest.raises(UserError, match="calls '1' more than once per forward pass"):
        trace_model(twice, (3, 8, 8))
