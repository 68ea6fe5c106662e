"""Physical pruning computes what masking computes: the pruned model's logits are the dense model's with the pruned
channels' gates zeroed (``helpers.masked``), and its FLOPs and parameters are what the trace counts. Models with
concats, gating and channel-mixing ops, the zoo's CNNs and the real ResNets."""

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_assets
from helpers import cbr, check_equivalence, randomise
from torch import nn

from pruning_core import build_model, prune, trace_model, uniform_ratios


@needs_assets
@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_equivalence_real_resnets(name, request):
    check_equivalence(request.getfixturevalue(name), (3, 32, 32))


@pytest.mark.parametrize("name", ["vgg16_bn", "vgg11_bn", "mobilenetv2", "digits_cnn"])
def test_equivalence_random_weights(name):
    shape = (1, 8, 8) if name.startswith("digits") else (3, 32, 32)
    check_equivalence(randomise(build_model(name)), shape)


class DenseConcat(nn.Module):
    """DenseNet-style: each layer reads the concat of all earlier outputs, so one conv's input spans 3 groups."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b, self.t = cbr(3, 16), cbr(16, 12), cbr(28, 12), cbr(40, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.a(x)], 1)
        x = torch.cat([x, self.b(x)], 1)
        return self.fc(self.t(x).mean((2, 3)))


class Inception(nn.Module):
    """Parallel paths of unequal width (one behind a max-pool) concatenated."""

    def __init__(self):
        super().__init__()
        self.stem, self.p1, self.p3, self.head = cbr(3, 16), cbr(16, 8, 1), cbr(16, 4, 1), cbr(24, 16)
        self.p2 = nn.Sequential(cbr(16, 8, 1), cbr(8, 12))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.p1(x), self.p2(x), self.p3(F.max_pool2d(x, 3, 1, 1))], 1)
        return self.fc(self.head(x).mean((2, 3)))


class SelfGated(nn.Module):
    """``y * sigmoid(conv(y))``: the gate conv reads the channels it gates, one group on both of its sides."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.gate = cbr(3, 16), cbr(3, 16), cbr(16, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return self.fc((y * torch.sigmoid(self.gate(y))).mean((2, 3)))


@pytest.mark.parametrize("cls", [DenseConcat, Inception, SelfGated])
def test_equivalence_concat_and_gating(cls):
    """Pruned models compute what masking computes, with FLOPs and params as the trace counts them (a layer after a
    concat loses channels of several groups at once, all indexed in its dense input)."""
    model = randomise(cls())
    check_equivalence(model, (3, 16, 16))
    trace = trace_model(model, (3, 16, 16))
    if cls is DenseConcat:
        assert trace.in_groups["t.0"] == ["stem.0", "a.0", "b.0"] and not trace.excluded
    if cls is SelfGated:
        (group,) = trace.groups
        assert {("gate.0", "in"), ("gate.0", "out")} <= {(m.module, m.dim) for m in group.members}


class ChannelOp(nn.Module):
    """conv ``a`` -> ``op`` -> conv ``b``: whether ``a``'s channels may be pruned depends on what ``op`` does to
    the channel dimension (``b`` reads 16 channels, or 4 after a pixel shuffle)."""

    OPS = {
        "pixel_shuffle": (lambda x: F.pixel_shuffle(x, 2), False),
        "channel_shuffle": (lambda x: x.view(x.shape[0], 2, 8, *x.shape[2:]).transpose(1, 2).reshape(x.shape), False),
        "flip_channels": (lambda x: x.flip(1), False),
        "softmax_channels": (lambda x: x * x.softmax(1), False),
        "normalize_channels": (lambda x: F.normalize(x, dim=1), False),
        "permute_channels_last": (lambda x: x.permute(0, 2, 3, 1).permute(0, 3, 1, 2), False),
        # the same ops over the spatial dimensions keep channel j at j
        "flip_width": (lambda x: x.flip(3), True),
        "transpose_spatial": (lambda x: x.transpose(2, 3), True),
        "softmax_spatial": (lambda x: x * x.flatten(2).softmax(-1).view(x.shape), True),
        "pad_upsample": (lambda x: F.interpolate(F.pad(x, (1, 1, 1, 1)), scale_factor=2), True),
        "centre_over_batch": (lambda x: x - x.mean(0, keepdim=True), True),
        "sum_over_batch": (lambda x: x.sum(0).expand(x.shape), False),  # the channels move to dimension 0
    }

    def __init__(self, op: str):
        super().__init__()
        self.op = self.OPS[op][0]
        self.a = cbr(3, 16)
        self.b = cbr(4 if op == "pixel_shuffle" else 16, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.b(self.op(self.a(x))).mean((2, 3)))


@pytest.mark.parametrize("op", list(ChannelOp.OPS))
def test_ops_that_reorder_or_mix_channels_exclude_the_group(op):
    """Torch-Pruning passes channel j through an op it does not know as channel j. After a pixel or channel
    shuffle, a flip, a softmax or a norm over the channels that is wrong: pruning ``a`` crashed or silently gave
    other logits. Such a group is excluded, with the op named; the same ops over space keep it prunable."""
    model = randomise(ChannelOp(op))
    trace = trace_model(model, (3, 8, 8))
    prunable = ChannelOp.OPS[op][1]
    assert ("a.0" in trace.group_index) == prunable, trace.excluded
    if not prunable:
        assert "channel" in trace.excluded["a.0"], trace.excluded
    check_equivalence(model, (3, 8, 8))


def test_prune_leaves_input_model_untouched():
    model = randomise(build_model("resnet56"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace = trace_model(model, (3, 32, 32))
    scores = {g.name: torch.rand(g.channels) for g in trace.groups}
    prune(model, uniform_ratios(trace, 0.5), scores, trace)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
