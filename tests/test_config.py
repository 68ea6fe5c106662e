"""Presets: a named budget resolves to plain settings, flags beside it win, and the run and policy record both."""

import json
import sys

import pytest

import agent.train  # noqa: F401 - the module whose train the CLI calls
from agent import cli
from agent.config import PRESETS, TrainConfig
from pruning_core import UserError


def test_a_preset_sets_its_fields_and_given_settings_win():
    fast = TrainConfig.from_preset("fast", episodes=50)
    assert fast.preset == "fast" and fast.episodes == 50
    assert fast.sensitivity_points == PRESETS["fast"]["sensitivity_points"] != TrainConfig().sensitivity_points
    assert TrainConfig.from_preset() == TrainConfig()
    thorough = TrainConfig.from_preset("thorough")
    assert thorough.episodes == PRESETS["thorough"]["episodes"] > TrainConfig().episodes
    with pytest.raises(UserError, match="unknown preset 'quick'; use one of fast, default, thorough"):
        TrainConfig.from_preset("quick")
    with pytest.raises(UserError, match="unknown preset"):
        TrainConfig(preset="quick").validate()


def test_a_negative_uniform_z_is_refused_and_old_runs_keep_the_best_score():
    with pytest.raises(UserError, match="--uniform-z must be >= 0"):
        TrainConfig(uniform_z=-1.0).validate()
    assert TrainConfig.from_dict({"model": "resnet20"}).uniform_z == 0.0  # recorded before the field existed
    assert TrainConfig().uniform_z > 0


def test_train_records_the_resolved_preset(tmp_path, monkeypatch):
    """``prunepilot train --preset fast --episodes 7`` hands train the preset and the flag; the config it writes
    holds the resolved values, so --resume and the policy file need no preset table."""
    seen = {}

    def fake_train(**overrides):
        seen["config"] = TrainConfig.from_preset(**{k: v for k, v in overrides.items() if k != "progress"})
        return {}

    monkeypatch.setattr(sys.modules["agent.train"], "train", fake_train)
    monkeypatch.setattr(sys.modules["agent.commands"], "print_report", lambda *a: None)
    assert cli.main(["train", "--model", "digits_cnn", "--preset", "fast", "--episodes", "7",
                     "--out", str(tmp_path / "run")]) == 0
    config = seen["config"]
    assert (config.preset, config.episodes, config.sensitivity_points) == ("fast", 7, 5)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_an_unknown_preset_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", "digits_cnn", "--preset", "quick"])
    assert e.value.code == 2 and "invalid choice: 'quick'" in capsys.readouterr().err


def test_resume_refuses_a_preset(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path), "--preset", "fast"]) == 2
    assert "drop --preset" in capsys.readouterr().err
