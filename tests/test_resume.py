"""A resumed run is the run: checkpoints that load without unpickling, exact continuation after a kill or Ctrl-C,
and run folders that mean the same from any working directory."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_SEARCH

import agent.search
from agent import export_policy, resume, train
from agent.cli import main
from pruning_core import UserError, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="digits_cnn", data="digits", episodes=14, warmup_episodes=3, gradient_steps=2, batch_size=16,
            checkpoint_every=2, sensitivity_points=3, **TINY_SEARCH)
CLI = [sys.executable, "-m", "agent.cli", "train", "--model", "digits_cnn", "--data", "digits", "--reward-images",
       "64", "--calib-batches", "1", "--warmup-episodes", "3", "--hidden", "16", "--gradient-steps", "2",
       "--sensitivity-points", "3", "--checkpoint-every", "4", "--no-progress"]


def _episodes(run: Path) -> list[dict]:
    """The run's history without wall-clock times."""
    return [{k: v for k, v in h.items() if k != "wall_s"} for h in json.loads((run / "history.json").read_text())]


class _Killed(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("algo, kill_at", [("ppo", 2), ("td3", 4)])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_result(algo, kill_at, tmp_path, monkeypatch):
    """The process dies right after its ``kill_at``-th checkpoint; resumed from the files alone, the run repeats
    the uninterrupted one episode for episode (rewards, FLOPs, exploration noise) and keeps the same model."""
    whole = train(algo=algo, out=str(tmp_path / "whole"), **TINY)
    written = []
    save = agent.search.save_checkpoint

    def save_then_die(search, run_dir):
        save(search, run_dir)
        written.append(search.episodes_done)
        if len(written) == kill_at:
            raise _Killed

    monkeypatch.setattr(agent.search, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(algo=algo, out=str(tmp_path / "killed"), **TINY)
    monkeypatch.setattr(agent.search, "save_checkpoint", save)
    assert 0 < written[-1] < TINY["episodes"]
    resumed = resume(tmp_path / "killed")
    assert _episodes(tmp_path / "killed") == _episodes(tmp_path / "whole")
    assert resumed["ratios"] == whole["ratios"] and resumed["acc"] == whole["acc"]
    # TensorBoard drops the charts of the episodes the resumed run redid: each episode is drawn once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    charts = EventAccumulator(str(tmp_path / "killed" / "tb" / "episodes"))
    charts.Reload()
    assert [e.step for e in charts.Scalars("charts/episode_reward")] == list(range(1, TINY["episodes"] + 1))


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_history(tmp_path):
    run, whole = tmp_path / "run", tmp_path / "whole"
    proc = subprocess.Popen([*CLI, "--episodes", "1000", "--out", str(run)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    state = run / "ckpt" / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text())["episodes_done"] >= 8:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    episodes = json.loads(state.read_text())["episodes_done"] + 6
    done = subprocess.run([*CLI[:4], "--resume", str(run), "--episodes", str(episodes), "--no-progress", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    subprocess.run([*CLI, "--episodes", str(episodes), "--out", str(whole)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    assert len(_episodes(run)) == episodes
    assert _episodes(run) == _episodes(whole)
    assert json.loads(done.stdout)["ratios"] == json.loads((whole / "report.json").read_text())["ratios"]


@pytest.mark.slow
def test_ctrl_c_stops_at_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([*CLI, "--episodes", "1000", "--out", str(run)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "history.json").exists() and not (run / "best.json").exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last == f"prunepilot train: interrupted after episode {json.loads((run / 'ckpt' / 'state.json').read_text())['episodes_done']}, at a checkpoint; continue with: prunepilot train --resume {run}"  # noqa: E501


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    """``ckpt/agent.pt`` is read by torch's weights-only loader, which refuses a pickled callable; an old-style
    ``agent.zip`` (cloudpickle) is never opened."""
    run = tmp_path / "run"
    train(out=str(run), **{**TINY, "episodes": 4, "checkpoint_every": 100})
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (run / "ckpt" / "agent.pt").write_bytes(pickle.dumps({"parameters": Payload()}))
    with pytest.raises(UserError, match="agent.pt is not a prunepilot checkpoint"):
        export_policy(run, tmp_path / "p")
    with pytest.raises(UserError, match="agent.pt is not a prunepilot checkpoint"):
        resume(run, episodes=6)
    assert not marker.exists()
    (run / "ckpt" / "agent.pt").unlink()
    (run / "ckpt" / "agent.zip").write_bytes(b"PK")
    with pytest.raises(UserError, match=r"older prunepilot \(agent.zip, which loads by unpickling"):
        export_policy(run, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_a_finished_run_is_left_as_it_is(tmp_path, caplog):
    run = tmp_path / "run"
    report = train(out=str(run), **{**TINY, "episodes": 4})
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert resume(run) == json.loads((run / "report.json").read_text()) == json.loads(json.dumps(report))
    assert "is finished: nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    assert resume(run, redo_finish=True)["ratios"] == report["ratios"]


def test_a_run_records_absolute_paths_and_checks_them_on_resume(tmp_path, monkeypatch, capsys):
    weights = tmp_path / "w.pt"
    torch.save(build_model("digits_cnn").state_dict(), weights)
    monkeypatch.chdir(tmp_path)
    train(weights="w.pt", out="run", **{**TINY, "episodes": 4})
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["weights"] == str(weights) and recorded["out"] == str(tmp_path / "run")
    monkeypatch.chdir(ROOT)
    weights.unlink()
    assert main(["train", "--resume", str(tmp_path / "run"), "--episodes", "6"]) == 2
    assert capsys.readouterr().err.strip() == (f"prunepilot train: error: the run's --weights {weights} no longer "
                                               f"exists; put it back to resume {tmp_path / 'run'}")


def test_train_refuses_a_non_empty_folder_and_leaves_nothing_on_bad_input(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--out", str(tmp_path / "mine")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert main(["train", "--model", "digits_cnn", "--data", f"imagefolder:{tmp_path / 'none'}",
                 "--out", str(tmp_path / "new")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
