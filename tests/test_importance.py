"""Importance criteria against what they estimate, computed exactly on a small model."""

import pytest
import torch
import torch.nn.functional as F

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
