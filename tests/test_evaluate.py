import copy

import torch

from pruning_core import FinetuneConfig, accuracy, adapt_bn, build_model, finetune, prune, trace_model, uniform_ratios


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
    teacher = finetune(build_model("digits_cnn"), digits.train, FinetuneConfig.plain(3))
    acc_teacher = accuracy(teacher, digits.test)
    assert acc_teacher > 90.0
    trace = trace_model(teacher, digits.input_shape)
    scores = {g.name: torch.rand(g.channels) for g in trace.groups}
    pruned = prune(teacher, uniform_ratios(trace, 0.3), scores, trace)
    before = accuracy(pruned, digits.test)
    student = finetune(copy.deepcopy(pruned), digits.train, FinetuneConfig.plain(2, lr=0.02), teacher=teacher)
    assert accuracy(student, digits.test) > max(before, 85.0)
    assert not student.training
    assert [p.shape for p in student.parameters()] == [p.shape for p in pruned.parameters()]  # fine-tuned in place


def test_splits_are_disjoint_and_the_select_split_moves_nothing():
    from pruning_core import ImageData, Split, make_splits

    def data(n):  # one label per image, so the splits' label sets show which images they hold
        return ImageData("ids", Split(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n), (0.0,), (1.0,)),
                         Split(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.long),
                               (0.0,), (1.0,)), n)

    plain, with_select = make_splits(data(200), 100, 64, seed=1), make_splits(data(200), 100, 64, 1, 500)
    assert plain.select is None
    assert torch.equal(plain.reward.y, with_select.reward.y) and torch.equal(plain.calib.y, with_select.calib.y)
    ids = [set(s.y.tolist()) for s in (with_select.reward, with_select.calib, with_select.select)]
    assert [len(i) for i in ids] == [100, 64, 36]  # the select split takes what is left
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert make_splits(data(150), 100, 64, 1, 500).select is None  # calibration already wrapped around
