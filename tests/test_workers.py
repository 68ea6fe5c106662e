"""Parallel evaluation: worker processes score as the driver does, a dead worker is replaced, and a search with
several workers finds what it finds with one."""

import json
import os
import signal

import pytest
from helpers import TINY_SEARCH

from agent import train
from envs import PruneEnv, evaluation_workers, random_search
from pruning_core import PruningSession, SessionConfig, UserError, uniform_ratios
from pruning_core.parallel import HANG_FIRST_S, HANG_MIN_S, EvaluationPool

TINY = dict(model="digits_cnn", data="digits", episodes=20, warmup_episodes=4, checkpoint_every=4, sensitivity_points=3,
            **TINY_SEARCH)


@pytest.fixture(scope="module")
def spec_session():
    """A digits session built from specs (what workers rebuild), with the refit that searches score with."""
    return PruningSession("digits_cnn", None, "digits", SessionConfig(reward_images=128, calib_batches=1,
                                                                      taylor_batches=2, reconstruct=True))


def test_workers_score_as_the_driver_and_a_killed_one_is_replaced(spec_session):
    jobs = [(uniform_ratios(spec_session.trace, f, 0.8), None) for f in (0.3, 0.5, 0.7)]
    here = [spec_session.score_allocation(*job)[0] for job in jobs]
    with EvaluationPool(spec_session, 2) as pool:
        assert [acc for acc, _, _ in pool.accuracies(jobs)] == here
        os.kill(pool.pids[0], signal.SIGKILL)
        again = pool.accuracies(jobs)
        assert [acc for acc, _, _ in again] == here and pool.restarts == 1
        assert {worker for _, _, worker in again} == {0, 1}



def test_a_hung_worker_is_replaced_after_the_hang_limit_and_its_evaluation_retried(spec_session):
    jobs = [(uniform_ratios(spec_session.trace, f, 0.8), None) for f in (0.3, 0.5, 0.7)]
    here = [spec_session.score_allocation(*job)[0] for job in jobs]
    with EvaluationPool(spec_session, 2, hang_s=10.0) as pool:
        stopped = pool.pids[0]
        os.kill(stopped, signal.SIGSTOP)  # alive, but never answers
        assert [acc for acc, _, _ in pool.accuracies(jobs)] == here
        assert pool.restarts >= 1 and pool.pids[0] != stopped  # more only if a loaded machine stalls a healthy one
    with EvaluationPool(spec_session, 1) as pool:  # the default limit follows the evaluations' own speed
        assert pool.hang_limit == HANG_FIRST_S
        pool.accuracies(jobs[:1])
        assert pool.hang_limit == HANG_MIN_S


def test_random_search_with_two_workers_evaluates_what_one_does(spec_session):
    one, two = (PruneEnv(session=spec_session, flops=0.5) for _ in range(2))
    a = random_search(one, 200, seed=3, evaluations=7)
    with evaluation_workers(two, 2):
        b = random_search(two, 200, seed=3, evaluations=7)
    assert len(one.cache) == len(two.cache) == 7 and a["episodes"] == b["episodes"]
    assert a["kept"] == b["kept"] and a["reward"] == b["reward"]
    assert {k: r for k, (r, _) in one.cache.items()} == {k: r for k, (r, _) in two.cache.items()}


def test_train_with_two_workers_repeats_the_one_worker_run(tmp_path):
    """PPO's actions within a rollout never depend on its rewards, so its episodes are evaluated together at the
    rollout's end; with the same seed the run is the same episode for episode, and history names the worker."""
    one = train(out=str(tmp_path / "one"), **TINY)
    two = train(out=str(tmp_path / "two"), workers=2, **TINY)
    h1, h2 = (json.loads((tmp_path / run / "history.json").read_text()) for run in ("one", "two"))
    strip = ("wall_s", "worker")
    assert [{k: v for k, v in h.items() if k not in strip} for h in h1] == \
        [{k: v for k, v in h.items() if k not in strip} for h in h2]
    assert {h["worker"] for h in h2 if not h["cached"]} == {0, 1} and all("worker" not in h for h in h1)
    assert two["ratios"] == one["ratios"] and two["acc"] == one["acc"]
    assert two["search"]["evaluations"] == one["search"]["evaluations"] and two["search"]["workers"] == 2


def test_train_stops_at_its_evaluation_budget_with_workers(tmp_path):
    """The budget counts the allocations of episodes still waiting for their evaluation, so the search stops at
    the episode where one worker would: 8 evaluations (the uniform floor's among them), one left for the policy's."""
    config = {**TINY, "floor": ("uniform",), "evaluations": 9}
    one = train(out=str(tmp_path / "one"), **config)
    two = train(out=str(tmp_path / "two"), workers=2, **config)
    h1, h2 = (json.loads((tmp_path / run / "history.json").read_text()) for run in ("one", "two"))
    assert 1 + sum(not h["cached"] for h in h2) == 8 and len(h2) == len(h1) < TINY["episodes"]
    assert two["search"]["evaluations"] == one["search"]["evaluations"] <= 9  # the policy's episode included


def test_a_budget_the_floor_uses_up_stops_with_a_one_line_error_and_a_resumable_run(tmp_path):
    with pytest.raises(UserError, match=r"--evaluations 2 leaves the search nothing after the floor's [12]: continue"):
        train(out=str(tmp_path / "run"), **{**TINY, "floor": ("uniform", "centre"), "evaluations": 2})
    assert (tmp_path / "run" / "config.json").is_file() and not (tmp_path / "run" / "report.json").exists()


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_a_run_with_workers_killed_after_a_checkpoint_resumes_to_the_same_result(tmp_path, monkeypatch):
    import agent.search
    from agent import resume
    whole = train(out=str(tmp_path / "whole"), workers=2, **TINY)
    save, written = agent.search.save_checkpoint, []

    def save_then_die(search, run_dir):
        save(search, run_dir)
        written.append(search.episodes_done)
        if len(written) == 3:
            raise _Killed

    monkeypatch.setattr(agent.search, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(out=str(tmp_path / "killed"), workers=2, **TINY)
    monkeypatch.setattr(agent.search, "save_checkpoint", save)
    assert 0 < written[-1] < TINY["episodes"]
    resumed = resume(tmp_path / "killed", workers=2)
    h1, h2 = (json.loads((tmp_path / run / "history.json").read_text()) for run in ("whole", "killed"))
    strip = ("wall_s", "worker")  # which worker ran an evaluation is scheduling, not a result
    assert [{k: v for k, v in h.items() if k not in strip} for h in h1] == \
        [{k: v for k, v in h.items() if k not in strip} for h in h2]
    assert resumed["ratios"] == whole["ratios"] and resumed["acc"] == whole["acc"]


def test_workers_need_a_session_built_from_specs(digits_session):
    with pytest.raises(UserError, match="a session built from Python objects .* needs workers=1"):
        EvaluationPool(digits_session, 2)


def test_the_latency_reward_needs_one_worker(spec_session):
    env = PruneEnv(session=spec_session, flops=0.5, reward="latency")
    with pytest.raises(UserError, match="latency reward .* needs --workers 1"):
        with evaluation_workers(env, 2):
            pass


def test_ray_without_a_cluster_is_one_line_that_says_how_to_start_one(tmp_path, capsys):
    pytest.importorskip("ray")
    from agent.cli import main
    assert main(["prune", "--model", "digits_cnn", "--data", "digits", "--method", "random", "--evaluations", "2",
                 "--workers", "2", "--ray", "auto", "--out", str(tmp_path / "run")]) == 2
    assert "cannot join the Ray cluster at 'auto'" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_a_search_on_ray_survives_a_killed_actor(spec_session, local_ray, monkeypatch):
    """One actor is killed mid-search: it is replaced, its evaluation retried, and the search evaluates and keeps
    exactly what a run without the kill does."""
    from pruning_core.ray_pool import RayPool
    plain = PruneEnv(session=spec_session, flops=0.5)
    expected = random_search(plain, 200, seed=5, evaluations=8)
    env = PruneEnv(session=spec_session, flops=0.5)
    calls = []
    accuracies = RayPool.accuracies

    def kill_on_second_batch(pool, jobs):
        calls.append(len(jobs))
        if len(calls) == 2:
            os.kill(pool.pids[0], signal.SIGKILL)
        return accuracies(pool, jobs)

    monkeypatch.setattr(RayPool, "accuracies", kill_on_second_batch)
    with evaluation_workers(env, 2, ray="auto") as pool:
        found = random_search(env, 200, seed=5, evaluations=8)
        assert pool.restarts == 1 and len(calls) > 2
    assert len(env.cache) == len(plain.cache) == 8
    assert found["kept"] == expected["kept"] and found["reward"] == expected["reward"]
    assert {k: r for k, (r, _) in env.cache.items()} == {k: r for k, (r, _) in plain.cache.items()}


@pytest.mark.slow
def test_train_on_ray_repeats_the_one_worker_run(tmp_path, local_ray):
    one = train(out=str(tmp_path / "one"), **TINY)
    on_ray = train(out=str(tmp_path / "ray"), workers=2, ray="auto", **TINY)
    h1, h2 = (json.loads((tmp_path / run / "history.json").read_text()) for run in ("one", "ray"))
    assert [h["reward"] for h in h1] == [h["reward"] for h in h2] and on_ray["ratios"] == one["ratios"]
    assert on_ray["search"]["ray"] == "auto" and {h["worker"] for h in h2 if not h["cached"]} == {0, 1}


@pytest.mark.slow
def test_more_ray_actors_than_cpus_share_them(spec_session, local_ray):
    env = PruneEnv(session=spec_session, flops=0.5)
    with evaluation_workers(env, 3, ray="auto") as pool:  # the local cluster has 2 CPUs
        random_search(env, 50, seed=1, evaluations=4)
        assert len(set(pool.pids)) == 3
    assert len(env.cache) == 4


def test_rollout_episodes_sets_how_many_episodes_a_ppo_update_takes(digits_session):
    from agent import TrainConfig
    from agent.algos import build_algo
    env = PruneEnv(session=digits_session, flops=0.5)
    for screen in (1, 3):  # a rollout holds the proposals of rollout_episodes evaluations
        algo = build_algo(TrainConfig(rollout_episodes=6, screen=screen, hidden=16, gnn_layers=1, net_arch=(32, 32)),
                          env, env.num_steps)
        assert algo.n_steps == 6 * screen * env.num_steps
    with pytest.raises(UserError, match="--rollout-episodes must be at least 1"):
        TrainConfig(model="digits_cnn", rollout_episodes=0).validate()
    with pytest.raises(UserError, match="--screen must be at least 1"):
        TrainConfig(model="digits_cnn", screen=0).validate()
