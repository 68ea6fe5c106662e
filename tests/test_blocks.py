"""Dropped residual branches (pruning_core.blocks): which groups can be dropped, what a dropped branch computes,
the blocks removed with it, and what each drop costs."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import cbr, check_equivalence, masked, random_drops, randomise, tiny_session
from torch import nn

from pruning_core import UserError, build_model, export_model, prune, trace_model
from pruning_core.blocks import DroppedBranch


class InPlaceAddResNet(nn.Module):
    """torchvision's BasicBlock form: ``out += identity`` adds into the branch's output in place, with a 1x1-conv
    shortcut where the shape changes."""

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
            self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None if stride == 1 and c_in == c_out else nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            out += identity
            return self.relu(out)

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.blocks = nn.Sequential(self.Block(16, 16, 1), self.Block(16, 16, 1), self.Block(16, 32, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_dropped_branch_under_an_in_place_add():
    """``out += identity`` cannot add into broadcast zeros: the dropped branch then yields full-size ones, the
    pruned model computes what masking does, and the blocks that became the identity are removed."""
    model = randomise(InPlaceAddResNet())
    check_equivalence(model, (3, 16, 16), ratios_of=random_drops)
    trace = trace_model(model, (3, 16, 16))
    assert trace.droppable == {"blocks.0.conv1", "blocks.1.conv1", "blocks.2.conv1"}
    scores = {g.name: torch.rand(g.channels) for g in trace.groups}
    pruned = prune(model, {"blocks.1.conv1": 1.0, "blocks.2.conv1": 1.0}, scores, trace)
    assert isinstance(pruned.blocks[1], nn.Identity)  # relu(0 + x) on a ReLU output
    assert isinstance(pruned.blocks[2].conv2, DroppedBranch) and not pruned.blocks[2].conv2.broadcast
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked(model, trace, {"blocks.1.conv1": 1.0, "blocks.2.conv1": 1.0},
                                                   scores)(x), atol=1e-5)


def test_droppable_groups_are_the_residual_branches():
    assert trace_model(build_model("resnet20"), (3, 32, 32)).droppable == {
        f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)}
    assert not trace_model(build_model("vgg11_bn"), (3, 32, 32)).droppable  # a plain chain: nothing to fall back on
    mobilenet = trace_model(build_model("mobilenetv2"), (3, 32, 32))
    # the 10 inverted residual blocks with a skip (stride 1, same width in and out), by their expansion conv
    assert len(mobilenet.droppable) == 10 and all(g.endswith(".conv.0") for g in mobilenet.droppable)


@pytest.mark.parametrize("name", ["resnet56", "mobilenetv2"])
def test_dropped_branches_compute_what_masking_them_does(name, tmp_path):
    """A dropped branch gives the logits of the dense model with its output gated off; its block is removed (the
    identity, or the downsampling shortcut alone); FLOPs and parameters match the trace's count; the model
    trains (adaptive BN, fine-tuning) and exports."""
    model = randomise(build_model(name))
    check_equivalence(model, (3, 32, 32), ratios_of=random_drops)
    trace = trace_model(model, (3, 32, 32))
    ratios = random_drops(trace, random.Random(3))
    if name == "resnet56":
        ratios["layer2.0.conv1"] = 1.0  # a downsampling block: it becomes its shortcut
    drops = list(ratios.values()).count(1.0)
    pruned = prune(model, ratios, {g.name: torch.rand(g.channels) for g in trace.groups}, trace)
    assert not any(isinstance(m, DroppedBranch) for m in pruned.modules())

    def blocks(net):
        return sum(type(m).__name__ in ("BasicBlock", "InvertedResidual") for m in net.modules())
    assert blocks(pruned) == blocks(model) - drops
    pruned.train()
    pruned(torch.randn(4, 3, 32, 32)).sum().backward()
    pruned.eval()
    files = export_model(pruned, tmp_path, (3, 32, 32))  # checks pt2 and ONNX logits against eager
    assert set(files) == {"pt2", "onnx"}


class TwoBranches(nn.Module):
    """An add whose two inputs are both residual-branch-like: dropping both leaves no full-size input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2, self.bn_a = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b1, self.b2, self.bn_b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.bn_a(self.a2(F.relu(self.a1(x)))) + self.bn_b(self.b2(F.relu(self.b1(x))))
        return self.head(F.relu(y).flatten(1))


def test_dropped_branch_broadcasts_only_beside_a_full_input():
    model = randomise(TwoBranches())
    trace = trace_model(model, (3, 8, 8))
    assert trace.droppable == {"a1", "b1"}
    scores = {g.name: torch.rand(g.channels) for g in trace.groups}
    x = torch.randn(4, 3, 8, 8)
    for ratios in ({"a1": 1.0}, {"a1": 1.0, "b1": 1.0}):
        pruned = prune(model, ratios, scores, trace)
        with torch.no_grad():
            assert torch.allclose(pruned(x), masked(model, trace, ratios, scores)(x), atol=1e-5)
        assert pruned.a2.broadcast == (len(ratios) == 1)
        with torch.no_grad():
            assert pruned.a2(x).shape == ((1, 8, 1, 1) if len(ratios) == 1 else (4, 8, 8, 8))


def test_drop_costs_measure_each_branch_removed_alone():
    """A branch's drop cost is the calibration loss with it alone removed and BN recalibrated: for a branch that
    outputs zeros, exactly the dense model's (recalibrated) loss; computed once; ``taylor`` sums the scores."""
    from pruning_core import adapt_bn, drop_order
    from pruning_core.evaluate import mean_loss
    model = build_model("resnet20").eval()
    with torch.no_grad():
        model.layer2[1].bn2.weight.zero_()
        model.layer2[1].bn2.bias.zero_()
    session = tiny_session(model, calib_batches=2)
    costs = session.drop_costs()
    assert set(costs) == session.trace.droppable and len(costs) == 9
    dense = mean_loss(adapt_bn(copy.deepcopy(session.model), session.splits.calib, 2, 8), session.splits.calib)
    assert costs["layer2.1.conv1"] == pytest.approx(dense, rel=1e-5)
    assert len({round(c, 6) for c in costs.values()}) == 9  # every other removal changes the function
    removed = session.build({"layer1.2.conv1": 1.0})
    assert costs["layer1.2.conv1"] == pytest.approx(mean_loss(removed, session.splits.calib), rel=1e-6)
    session.build = None  # cached: a second call evaluates nothing
    assert session.drop_costs() == costs
    order = drop_order(session.trace, costs)
    assert [costs[n] for n in order] == sorted(costs.values())
    taylor = tiny_session(model, calib_batches=2, drop_criterion="taylor")
    assert taylor.drop_costs() == {n: pytest.approx(float(taylor.scores[n].sum())) for n in costs}
    with pytest.raises(UserError, match="unknown drop criterion 'l2'"):
        tiny_session(model, calib_batches=2, drop_criterion="l2")
