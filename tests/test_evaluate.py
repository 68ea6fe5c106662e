import copy

import torch
from torch import nn

from pruning_core import accuracy, adapt_bn, build_model, finetune, prune, trace_model, uniform_ratios


def test_adapt_bn_sets_exact_calibration_statistics(digits):
    model = build_model("digits_cnn").eval()
    calib = digits.train.subset(torch.arange(128))
    adapt_bn(model, calib, num_batches=2, batch_size=64)
    assert not model.training
    conv, bn = model.features[0], model.features[1]
    with torch.no_grad():
        feats = torch.cat([conv(x) for x, _ in calib.batches(64)])
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.1  # restored


def test_finetune_trains_and_distils(digits):
    torch.manual_seed(0)
    teacher = finetune(build_model("digits_cnn"), digits.train, epochs=3, lr=0.05, augment=False)
    acc_teacher = accuracy(teacher, digits.test)
    assert acc_teacher > 90.0
    trace = trace_model(teacher, digits.input_shape)
    scores = {g.name: torch.rand(g.channels) for g in trace.groups}
    pruned = prune(teacher, uniform_ratios(trace, 0.3), scores, trace)
    before = accuracy(pruned, digits.test)
    student = finetune(copy.deepcopy(pruned), digits.train, epochs=2, lr=0.02, teacher=teacher, augment=False)
    assert accuracy(student, digits.test) > max(before, 85.0)
    assert not student.training
    assert all(isinstance(m, nn.Module) for m in student.modules())
