"""Fine-tuning: the recipe's pieces, resume, training-time pruning schedules, activation-gradient pruning and the
``prunepilot finetune`` command."""

import copy
import json

import pytest
import torch
from torch import nn

from agent.cli import main
from agent.finetune import CHECKPOINT
from pruning_core import (
    FinetuneConfig,
    PruningSession,
    SessionConfig,
    UserError,
    accuracy,
    finetune,
    kept_counts,
    measure_flops,
    prune,
    uniform_ratios,
)
from pruning_core.actgrad import ActGradPruner
from pruning_core.augment import crop_flip
from pruning_core.importance import L1Importance
from pruning_core.recipe import plan_epochs
from pruning_core.schedules import ChannelMasks, SPPSchedule, make_schedule
from pruning_core.splits import holdout_split


@pytest.fixture(scope="module")
def session(digits, digits_weights):
    return PruningSession("digits_cnn", str(digits_weights), digits, SessionConfig(reward_images=200, calib_batches=2))


def test_holdout_is_disjoint_from_training_images(digits):
    train, held = holdout_split(digits.train, 100, seed=3)
    assert len(train) + len(held) == len(digits.train) and len(held) == 100
    rows = {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(train.x, train.y)}
    # digits holds a few duplicate images; otherwise no held-out image is trained on
    assert sum(tuple(x.flatten().tolist()) + (int(y),) in rows for x, y in zip(held.x, held.y)) < 5
    assert len(holdout_split(digits.train, len(digits.train))[1]) == len(digits.train) // 5  # a fifth at most


def test_crop_flip_moves_each_image_on_its_own():
    x = torch.arange(4 * 8 * 8, dtype=torch.float32).view(4, 1, 8, 8).repeat(1, 3, 1, 1)
    out = crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert len({tuple(o[0, 3].tolist()) for o in (out - x[:1])}) > 1  # not one shift for the whole batch


def test_minutes_budget_plans_whole_epochs():
    cfg = FinetuneConfig(epochs=10, minutes=1.0)
    assert plan_epochs(cfg, steps=20, seconds=2.0, steps_per_epoch=100) == 5  # 10.3 s per epoch: 60 // 10.3
    assert plan_epochs(cfg, steps=20, seconds=200.0, steps_per_epoch=100) == 1  # never 0
    assert plan_epochs(FinetuneConfig(epochs=3, minutes=60.0), 20, 1.0, 10) == 3  # never more than asked


@pytest.mark.parametrize(("schedule", "killed_in"), [("oneshot", 2), ("spp", 2), ("drive", 3)])
def test_resume_after_a_kill_ends_where_an_unbroken_run_does(session, tmp_path, schedule, killed_in):
    """Killed in epoch 2 (an SPP run still masked) or 3 (a DRIVE run already pruned for real), then resumed."""
    ratios = uniform_ratios(session.trace, 0.5)
    cfg = FinetuneConfig(epochs=3, holdout_images=100, batch_size=64)
    train, held = holdout_split(session.data.train, 100)

    def start():
        sched = make_schedule(schedule, session, ratios)
        return session.finetune_start(ratios, schedule=sched), sched

    model, sched = start()
    unbroken = finetune(model, train, cfg, teacher=session.model, holdout=held, schedule=sched)

    class Killed(Exception):
        pass

    class Dies:  # the training images, lost at the start of an epoch
        def __init__(self, split):
            self.split, self.calls = split, 0

        def __len__(self):
            return len(self.split)

        def batches(self, *a, **k):
            self.calls += 1
            if self.calls == killed_in:
                raise Killed
            return self.split.batches(*a, **k)

    ckpt = tmp_path / "ck.pt"
    model, sched = start()
    with pytest.raises(Killed):
        finetune(model, Dies(train), cfg, teacher=session.model, holdout=held, checkpoint=ckpt, schedule=sched)
    assert ckpt.is_file()
    report = {}
    model, sched = start()
    resumed = finetune(model, train, cfg, teacher=session.model, holdout=held, checkpoint=ckpt, report=report,
                       schedule=sched)
    assert not ckpt.exists() and len(report["history"]) == 3
    assert [p.shape for p in resumed.parameters()] == [p.shape for p in unbroken.parameters()]
    for a, b in zip(unbroken.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_foreign_checkpoint_is_refused_in_one_line(session, tmp_path):
    ckpt = tmp_path / "ck.pt"
    torch.save({"config": {}, "state": {}}, ckpt)
    with pytest.raises(UserError, match="other fine-tuning settings"):
        finetune(session.build({}), session.data.train, FinetuneConfig(epochs=1), checkpoint=ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a fine-tuning checkpoint"):
        finetune(session.build({}), session.data.train, FinetuneConfig(epochs=1), checkpoint=ckpt)


def test_masked_channels_compute_exactly_what_removing_them_does(session, digits):
    trace = session.trace
    ratios = uniform_ratios(trace, 0.5)
    kept = kept_counts(trace, ratios)
    model = copy.deepcopy(session.model)
    masks = ChannelMasks(model, trace, [g.name for g in trace.groups])
    keep = {}
    for g in trace.groups:
        m = torch.zeros(g.channels)
        m[torch.randperm(g.channels)[:kept[g.name]]] = 1
        masks.masks[g.name].copy_(m)
        keep[g.name] = m.double()
    x, _ = next(digits.test.batches(64))
    with torch.no_grad():
        masked = model(x)
    masks.remove()
    pruned = prune(model, ratios, keep, trace)
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked, atol=1e-5)


def test_spp_probabilities_follow_the_papers_increment(session):
    trace = session.trace
    g = trace.groups[0]
    sched = SPPSchedule(trace, {g.name: 0.5}, updates=1)
    model = sched.start(copy.deepcopy(session.model))
    sched.update(model, 0, 10)
    order = L1Importance()(model, None, trace)[g.name].argsort()
    p = sched.p[g.name][order]
    n = g.channels // 2
    assert p[0] == pytest.approx(sched.A)  # the smallest filter gains A
    assert p[n] == pytest.approx(0.0, abs=1e-9)  # the R-th gains nothing, those above are held at 0
    assert (p[:n].diff() <= 1e-12).all()


@pytest.mark.parametrize("name", ["spp", "drive"])
def test_schedules_end_at_the_allocation_physically_pruned(session, name):
    ratios = uniform_ratios(session.trace, 0.5)
    sched = make_schedule(name, session, ratios)
    report = {}
    model = session.finetune(session.build({}, adapt=False), FinetuneConfig(epochs=3, holdout_images=100),
                             schedule=sched, report=report)
    assert sched.done and report["best_epoch"] >= 2  # removed halfway through epoch 2: epoch 1 is never kept
    assert measure_flops(model, session.data.input_shape) == session.trace.flops(kept_counts(session.trace, ratios))
    assert accuracy(model, session.splits.test) > 80.0


def test_act_grad_pruning_is_unbiased_and_reports_its_sparsity():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3)
    x = torch.randn(8, 2, 6, 6, requires_grad=True)
    g = torch.randn(8, 4, 4, 4)
    conv(x).backward(g)
    dense = conv.weight.grad.clone()
    pruner = ActGradPruner(conv, 0.9)
    total = torch.zeros_like(dense)
    for _ in range(400):
        conv.weight.grad = None
        conv(x).backward(g)
        total += conv.weight.grad
    assert torch.allclose(total / 400, dense, atol=0.1 * dense.abs().max())
    s = pruner.summary()
    assert 0.5 < s["zero_fraction"] < 0.9 and s["backward_conv_macs_saved"] > 0.4
    pruner.remove()
    conv.weight.grad = None
    conv(x).backward(g)
    assert torch.equal(conv.weight.grad, dense)


def test_drive_importance_scores_every_channel(digits, digits_weights):
    s = PruningSession("digits_cnn", str(digits_weights), digits,
                       SessionConfig(reward_images=64, calib_batches=1, taylor_batches=2, importance="drive"))
    assert all(len(s.scores[g.name]) == g.channels and (s.scores[g.name] > 0).all() for g in s.trace.groups)


def run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_finetune_command_writes_the_model_and_resumes(tmp_path, capsys, digits_weights):
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, ["prune", "--model", "digits_cnn", "--weights", str(digits_weights), "--data", "digits",
                                "--reward-images", "100", "--calib-batches", "2", "--out", str(run_dir)])
    assert code == 0, err
    code, out, err = run(capsys, ["finetune", str(run_dir), "--epochs", "2", "--holdout-images", "100"])
    assert code == 0, err
    assert "fine-tuned 2 epochs (oneshot" in out and "finetuned/report.json" in out
    report = json.loads((run_dir / "finetuned" / "report.json").read_text())
    ft = report["finetune"]
    assert ft["schedule"] == "oneshot" and ft["epochs_run"] == 2 and len(ft["history"]) == 2
    assert report["acc"] > 85.0 and report["acc_before_finetune"] is not None
    assert report["flops_ratio"] == json.loads((run_dir / "report.json").read_text())["flops_ratio"]
    for name in ("model.onnx", "model.pt2", "report.json"):
        assert (run_dir / "finetuned" / name).is_file()
    assert not (run_dir / "finetuned" / CHECKPOINT).exists()
    # a second run refuses to replace it; an interrupted one is resumed only when asked
    code, _, err = run(capsys, ["finetune", str(run_dir), "--epochs", "2"])
    assert code == 2 and "not empty" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, ["finetune", str(run_dir), "--resume"])
    assert code == 2 and "no interrupted fine-tune" in err
    (run_dir / "finetuned" / CHECKPOINT).write_bytes(b"")
    code, _, err = run(capsys, ["finetune", str(run_dir), "--epochs", "2"])
    assert code == 2 and "--resume" in err


def test_finetune_command_refuses_a_folder_without_a_report(tmp_path, capsys):
    code, _, err = run(capsys, ["finetune", str(tmp_path)])
    assert code == 2 and "no report.json" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "report.json").write_text(json.dumps({"ratios": {}, "seed": 0, "method": "uniform"}))
    code, _, err = run(capsys, ["finetune", str(tmp_path)])
    assert code == 2 and "how to rebuild" in err
