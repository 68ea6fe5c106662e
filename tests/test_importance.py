"""Importance criteria against what they estimate, computed exactly on a small model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_assets

from pruning_core import build_model, trace_model
from pruning_core.importance import Taylor2Importance, TaylorImportance


def _exact_terms(model, layer, x, y, channels):
    """Per channel of ``layer``: the first and second derivatives of the loss along a gate that scales the
    channel's parameters, at gate 1, by autograd on the gate itself."""
    module = dict(model.named_modules())[layer]
    names = [n for n in ("weight", "bias") if getattr(module, n) is not None]
    out = []
    for c in channels:
        gate = torch.tensor(1.0, requires_grad=True)
        scale = torch.ones(module.weight.shape[0]).index_put((torch.tensor([c]),), gate.reshape(1))
        params = {f"{layer}.{n}": getattr(module, n).detach() * scale.view(-1, *([1] * (getattr(module, n).dim() - 1)))
                  for n in names}
        loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
        (d1,) = torch.autograd.grad(loss, gate, create_graph=True)
        (d2,) = torch.autograd.grad(d1, gate)
        out.append((float(d1), float(d2)))
    return out


def test_second_order_taylor_estimates_the_gate_expansion(digits_weights, digits):
    """On a trained model, where the loss sits near a minimum, the curvature term dominates: the second-order score
    tracks the exact ``(-g + h/2)^2`` where the first-order ``g^2`` is off by a factor of several."""
    from pruning_core import load_weights
    model = load_weights(build_model("digits_cnn"), digits_weights).eval()
    trace = trace_model(model, (1, 8, 8))
    x, y = next(digits.train.batches(64))
    group = trace.groups[0]
    (layer,) = [m.module for m in group.members if m.dim == "out" and trace.layers[m.module].kind == "bn"]
    exact = _exact_terms(model, layer, x, y, range(8))
    second = Taylor2Importance(num_batches=1, probes=300)(model, [(x, y)], trace)[group.name][:8].tolist()
    first = TaylorImportance(num_batches=1)(model, [(x, y)], trace)[group.name][:8].tolist()
    large = [i for i, (d1, d2) in enumerate(exact) if (-d1 + d2 / 2) ** 2 > 1e-3]
    assert len(large) >= 3
    for i in large:
        d1, d2 = exact[i]
        assert first[i] == pytest.approx(d1 ** 2, rel=1e-3)  # the first-order score is the gate gradient, squared
        assert second[i] == pytest.approx((-d1 + d2 / 2) ** 2, rel=0.5)  # Hutchinson's estimate of h, 300 probes
        assert first[i] < 0.25 * (-d1 + d2 / 2) ** 2  # ...which the first-order score misses


@needs_assets
@pytest.mark.slow
def test_taylor_quality_against_oracle(cifar, resnet20):
    """Spearman(Taylor, oracle loss increase of removing each channel alone) on layer1.0.conv1."""
    from scipy.stats import spearmanr
    trace = trace_model(resnet20, (3, 32, 32))
    x, y = cifar.train.normalise(cifar.train.x[:1024]), cifar.train.y[:1024]
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 1024, 128)]
    scores = TaylorImportance(8)(resnet20, batches, trace)["layer1.0.conv1"]
    net = copy.deepcopy(resnet20)
    bn = net.layer1[0].bn1
    with torch.no_grad():
        base = sum(F.cross_entropy(net(a), b).item() for a, b in batches)
        oracle = []
        for c in range(16):
            w, b_ = bn.weight[c].item(), bn.bias[c].item()
            bn.weight[c], bn.bias[c] = 0.0, 0.0
            oracle.append(sum(F.cross_entropy(net(a), b).item() for a, b in batches) - base)
            bn.weight[c], bn.bias[c] = w, b_
    rho = spearmanr(scores.numpy(), oracle).correlation
    assert rho >= 0.5, rho
