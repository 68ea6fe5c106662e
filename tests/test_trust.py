"""What a user owns stays theirs, their own model and normalisation are honoured, and a worse refit is never kept."""

import json

import pytest
import torch

from agent.cli import main
from pruning_core import PruningSession, SessionConfig, build_model
from pruning_core.data import load_data

DIGITS = ["--model", "digits_cnn", "--data", "digits", "--flops", "0.5", "--reward-images", "64",
          "--calib-batches", "1"]


def test_out_that_holds_other_files_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["prune", *DIGITS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty; pick another folder or pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(["prune", *DIGITS, "--out", str(out), "--overwrite"]) == 0
    assert {p.name for p in out.iterdir()} >= {"notes.txt", "report.json", "model.pt2"}
    assert (out / "notes.txt").read_text() == "mine"
    (out / "report.json").unlink()
    (out / "report.json").mkdir()  # a folder where a file goes is never deleted, even with --overwrite
    assert main(["prune", *DIGITS, "--out", str(out), "--overwrite"]) == 2
    assert "holds a folder report.json" in capsys.readouterr().err and (out / "report.json").is_dir()


def test_export_to_an_existing_zip_needs_overwrite(tmp_path, capsys):
    target = tmp_path / "policy.zip"
    target.write_bytes(b"mine")
    assert main(["export", str(tmp_path / "run"), "--out", str(target)]) == 2
    assert "exists; pick another name or pass --overwrite" in capsys.readouterr().err
    assert target.read_bytes() == b"mine"


def test_a_model_module_in_the_current_folder_imports(tmp_path, monkeypatch):
    (tmp_path / "my_pp_module.py").write_text("from pruning_core import build_model\n\n"
                                              "def net():\n    return build_model('digits_cnn')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert isinstance(build_model("my_pp_module:net"), torch.nn.Module)


def test_normalisation_is_an_option_recorded_in_report_and_onnx(tmp_path, capsys):
    data = load_data("digits").normalised(mean=(0.5,), std=(0.25,), scale=1 / 16)
    x = data.train.x[:4]
    assert torch.allclose(data.train.normalise(x), (x.float() / 16 - 0.5) / 0.25)
    assert main(["prune", *DIGITS, "--mean", "0.5", "--std", "0.25", "--scale", "0.0625", "--json",
                 "--out", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["normalisation"] == {"mean": [0.5], "std": [0.25], "scale": 0.0625}
    onnx = pytest.importorskip("onnx")
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "out" / "model.onnx")).metadata_props}
    assert json.loads(meta["normalisation"]) == report["normalisation"]
    assert main(["prune", *DIGITS, "--mean", "0.1,0.2"]) == 2
    assert "--mean has 2 values; give 1 or 1" in capsys.readouterr().err


def test_dense_accuracy_far_below_the_recorded_one_warns(tmp_path, caplog):
    path = tmp_path / "w.th"
    torch.save({"state_dict": build_model("digits_cnn").state_dict(), "best_prec1": 99.0}, path)
    session = PruningSession("digits_cnn", str(path), "digits", SessionConfig(reward_images=64, calib_batches=1))
    assert session.recorded_acc == 99.0
    with caplog.at_level("WARNING"):
        session.dense_accuracy("test")  # random weights: about 10%
    assert "far below the 99.00% the weights file records" in caplog.text


def test_a_refit_that_scores_lower_is_not_kept(digits_weights, monkeypatch):
    session = PruningSession("digits_cnn", str(digits_weights), "digits", SessionConfig(reward_images=64,
                                                                                        calib_batches=1))
    ratios = {g.name: 0.3 for g in session.trace.groups}
    build = session.build

    def broken_refit(ratios, round_to=None, adapt=True, timings=None, reconstruct=None):
        model = build(ratios, round_to, adapt=adapt, timings=timings, reconstruct=False)
        if reconstruct:
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()  # a refit gone wrong: constant logits
        return model

    monkeypatch.setattr(session, "build", broken_refit)
    model, fields = session.build_final(ratios, reconstruct=True)
    assert fields == {"reconstruct": False, "refit_rejected": True}
    assert any(float(p.detach().abs().sum()) > 0 for p in model.parameters())


def test_export_check_is_relative_to_the_logits_scale():
    from pruning_core import UserError
    from pruning_core.export import _check
    ref = torch.full((2, 10), 1000.0)
    _check(ref + 0.05, ref, 1e-4, "ONNX")  # 5e-5 of the logits' scale: float32 rounding, not a broken export
    with pytest.raises(UserError, match=r"ONNX export changed the logits \(max abs diff 1.00e\+00"):
        _check(ref + 1.0, ref, 1e-4, "ONNX")


def test_an_unexpected_failure_is_one_line_and_v_shows_the_traceback(monkeypatch, capsys):
    import agent.cli

    def boom(args):
        raise RuntimeError("integer division or modulo by zero\nsecond line")

    monkeypatch.setattr(agent.cli, "prune_command", boom)
    assert main(["prune", *DIGITS]) == 2
    err = capsys.readouterr().err
    assert err == ("prunepilot prune: error: RuntimeError: integer division or modulo by zero "
                   "(prunepilot -v prune ... shows the traceback)\n")
    with pytest.raises(RuntimeError, match="integer division"):
        main(["-v", "prune", *DIGITS])
