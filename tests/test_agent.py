import json
import tempfile
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config, tiny_session

from agent import Search, apply_policy, load_policy, save_policy
from agent.cli import main
from agent.cloning import clone_actor
from agent.search import MovingAverageBaseline
from envs import PruneEnv
from pruning_core import UserError

ROOT = Path(__file__).resolve().parents[1]


short_config = partial(tiny_config, episodes=6, warmup_episodes=2, gradient_steps=2, batch_size=16)


@pytest.mark.parametrize("algo", ["ddpg", "td3", "sac", "ppo"])
def test_short_runs_respect_budget_and_round_trip(algo, digits_session, tmp_path, monkeypatch):
    cfg = short_config(algo=algo, flops=0.6, episodes=12 if algo == "ppo" else 8)
    env = PruneEnv(session=digits_session, flops=0.6)
    search = Search(cfg, env)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    best = search.run(cfg.episodes)
    assert not list((tmp_path / "tmp").iterdir())  # no run folder, so nothing logged, not even SB3's SB3-<time>/
    assert search.episodes_done == cfg.episodes == len(search.history)
    assert all(h["flops_ratio"] <= 0.6 for h in search.history)
    assert best["reward"] == max(h["reward"] for h in search.history)
    # export -> load gives the same deterministic actions as the SB3 model
    path = save_policy(search.algo, cfg, best, tmp_path / "policy")
    policy = load_policy(path)
    obs, _ = env.reset(seed=0)
    for _ in range(env.num_steps):
        sb3_action, _ = search.algo.predict(obs, deterministic=True)
        assert np.allclose(policy.act(obs), sb3_action, atol=1e-5)
        obs, *_ = env.step(sb3_action)


@pytest.mark.parametrize("sde", [True, False])
def test_ppo_exploration_std_and_per_episode_noise(sde, digits_session):
    """gSDE's noise is scaled to init_std and drawn once per episode: within an episode the same observation
    gets the same action; across episodes the actions spread with std near init_std (as without gSDE)."""
    cfg = short_config(algo="ppo", sde=sde, init_std=0.3)
    env = PruneEnv(session=digits_session, flops=0.6)
    algo = Search(cfg, env).algo
    obs, _ = env.reset()
    first = algo.predict(obs, deterministic=False)[0]
    again = algo.predict(obs, deterministic=False)[0]
    assert np.allclose(first, again) == sde
    samples = []
    for _ in range(300):
        if sde:
            algo.policy.reset_noise()  # what SB3 does at every episode start with sde_sample_freq = episode length
        samples.append(float(algo.predict(obs, deterministic=False)[0][0]))
    mean = float(algo.predict(obs, deterministic=True)[0][0])
    assert abs(np.mean(samples) - mean) < 0.06
    assert 0.24 < np.std(samples) < 0.36


def test_evaluation_budget_counts_distinct_allocations_only(digits_session):
    """With ``evaluations``, a search stops at that many distinct evaluated allocations: episodes that repeat
    one (cache hits) are free, and ``episodes`` still caps the search when repeats are all it finds."""
    varied = Search(short_config(algo="ppo", init_std=0.5, episodes=50, evaluations=3),
                    PruneEnv(session=digits_session, flops=0.6))
    varied.run(50, 3)
    assert varied.evaluations_done == 3 == len(varied.env.cache) and not varied.history[-1]["cached"]
    assert varied.episodes_done == len(varied.history) < 50
    # a near-deterministic policy repeats one allocation: the cap on episodes ends the search
    stuck = Search(short_config(algo="ppo", init_std=1e-4, episodes=8, evaluations=5, reexplore=False),
                   PruneEnv(session=digits_session, flops=0.6))
    stuck.run(8, 5)
    assert stuck.episodes_done == 8 and stuck.evaluations_done < 5
    assert sum(h["cached"] for h in stuck.history) == 8 - stuck.evaluations_done > 0
    with pytest.raises(UserError, match="--evaluations"):
        short_config(evaluations=0).validate()


def test_repeat_penalty_lowers_only_the_reward_of_repeated_allocations(digits_session):
    """``repeat_penalty`` comes off the final reward of an episode whose allocation was evaluated before; the raw
    reward (which the search keeps its best by) and the moving-average baseline see the unpenalised reward."""
    env = MovingAverageBaseline(PruneEnv(session=digits_session, flops=0.6), enabled=True, repeat_penalty=0.25)

    def episode(action: float) -> tuple[float, dict]:
        env.reset()
        done = False
        while not done:
            _, reward, done, _, info = env.step(np.array([action], dtype=np.float32))
        return reward, info

    raw, average = [], None
    for action, cached in ((0.0, False), (0.0, True), (-0.5, False)):
        reward, info = episode(action)
        assert info["cached"] == cached
        raw.append(info["reward_raw"])
        average = raw[0] if average is None else average
        assert reward == pytest.approx(raw[-1] - average - (0.25 if cached else 0.0))
        average += 0.1 * (raw[-1] - average)
        assert env.average == pytest.approx(average)
    assert raw[0] == raw[1] != raw[2]
    with pytest.raises(UserError, match="--repeat-penalty"):
        short_config(repeat_penalty=-0.1).validate()


def test_train_refuses_a_model_its_run_cannot_record(digits_session, tmp_path, caplog):
    """A run records its model spec for --resume, so train() takes a spec, and a session built from that spec;
    either mistake is a clear error before anything is written. A session that does not refit, given to a config
    that does, is used as it is, with a warning."""
    from agent import train
    from pruning_core import build_model
    with pytest.raises(UserError, match="not a SmallCNN object"):
        train(model=build_model("digits_cnn"), out=str(tmp_path / "a"))
    with pytest.raises(UserError, match="session's model is digits_cnn, not config.model digits_cnn_wide"):
        train(session=digits_session, model="digits_cnn_wide", out=str(tmp_path / "b"))
    assert not any(tmp_path.iterdir())
    held = tmp_path / "held"
    held.mkdir()
    (held / "config.json").write_text("{}")
    with caplog.at_level("WARNING", logger="agent.train"), pytest.raises(UserError, match="already holds a run"):
        train(session=digits_session, model="digits_cnn", out=str(held))
    assert "session does not refit candidates while searching, unlike config.reconstruct" in caplog.text


@pytest.mark.parametrize("sde", [True, False])
def test_ppo_reexplores_after_rollouts_of_repeats(sde, digits_session):
    """A PPO policy collapsed onto one allocation repeats it: the first rollout (4 episodes) evaluates it once,
    the second only repeats it. With ``reexplore`` the third starts from a policy widened to twice init_std, so
    it evaluates new allocations; without, the search stays on the one allocation. (A learning rate of 0 keeps
    the policy's mean where it is, so only the widening can move the search.)"""
    counts = {}
    for reexplore in (True, False):
        search = Search(short_config(algo="ppo", sde=sde, init_std=0.3, episodes=12, reexplore=reexplore,
                                    learning_rate=0.0),
                        PruneEnv(session=digits_session, flops=0.6))
        with torch.no_grad():
            search.algo.policy.log_std.fill_(-12.0)  # collapsed: every sample is the mean
        search.run(12)
        assert [h["cached"] for h in search.history[:8]] == [False] + [True] * 7
        counts[reexplore] = (search.reexplorations, search.evaluations_done,
                             float(search.algo.policy.log_std.detach().max()))
    assert counts[False][:2] == (0, 1) and counts[False][2] == -12
    assert counts[True][0] == 1 and counts[True][1] > 1 and counts[True][2] > -6


@pytest.mark.parametrize("sde", [True, False])
def test_reexploring_recentres_on_the_best_episode_and_widens(sde, digits_session):
    """After k stalled rollouts in a row, the deterministic policy replays the best episode's applied actions
    and its action std is init_std * 2**k, at most 1."""
    env = PruneEnv(session=digits_session, flops=0.6)
    search = Search(short_config(algo="ppo", sde=sde, init_std=0.3, episodes=8), env)
    search.run(8)
    for stalls, std in ((1, 0.6), (3, 1.0)):
        search._stalls = stalls
        search.on_rollout_start()
        obs, _ = env.reset()
        with torch.no_grad():
            dist = search.algo.policy.get_distribution(search.algo.policy.obs_to_tensor(obs)[0])
        assert float(dist.distribution.stddev.reshape(-1)[0]) == pytest.approx(std, rel=1e-3)
        for t, target in enumerate(search.best["actions"]):
            action, _ = search.algo.predict(obs, deterministic=True)
            assert abs(float(action[0]) - target) < 0.05, (t, float(action[0]), target)
            obs, _, done, _, info = env.step(np.array([target], dtype=np.float32))
        assert done and info["ratios"] == search.best["ratios"]
    assert search.reexplorations == 2
    # the actor is still on the best episode: no Adam step
    assert clone_actor(search.algo, env, search.best["actions"], search.config.learning_rate) == 0


def test_ppo_warmup_is_random_then_the_actor_starts_from_its_best_episode(digits_session):
    """With clone_warmup, PPO's warm-up episodes are uniformly random, seeded by episode index; then the actor is
    fitted to the best of them, so that before any PPO update its deterministic episode replays that allocation.
    Without it, PPO starts learning at once (the default)."""
    cfg = short_config(algo="ppo", episodes=5, warmup_episodes=5, flops=0.6, clone_warmup=True)
    env = PruneEnv(session=digits_session, flops=0.6)
    search = Search(cfg, env)
    best = search.run(5)
    assert search.cloned and search.episodes_done == 5 and not search.algo.num_timesteps  # no PPO step yet
    assert len({(h["acc"], h["flops_ratio"]) for h in search.history}) > 1  # not one allocation five times
    again = Search(cfg, PruneEnv(session=digits_session, flops=0.6))
    again.run(5)
    assert [h["acc"] for h in again.history] == [h["acc"] for h in search.history]  # same seed, same draws
    obs, _ = env.reset()
    for t, target in enumerate(search.best["actions"]):  # the best episode is the best warm-up episode
        action, _ = search.algo.predict(obs, deterministic=True)
        assert abs(float(action[0]) - target) < 0.05, (t, float(action[0]), target)
        obs, _, done, _, info = env.step(np.array([target], dtype=np.float32))
    assert done and info["ratios"] == best["ratios"]
    plain = Search(short_config(algo="ppo", episodes=4, warmup_episodes=5, flops=0.6), env)
    plain.run(4)
    assert not plain.cloned and plain.episodes_done == 4  # no warm-up: every step was PPO's
    assert plain.algo.num_timesteps == plain.proposals * env.num_steps


@pytest.mark.parametrize("start_wins", [True, False])
def test_ppo_starts_from_the_better_of_its_warmup_and_a_given_allocation(digits_session, start_wins):
    """With ``start`` (the sensitivity allocation in train), PPO runs its random warm-up episodes, then fits the
    actor to whichever scored higher: the start allocation or the best warm-up episode."""
    from envs import applied_actions, sensitivity_search
    env = PruneEnv(session=digits_session, flops=0.6)
    found = sensitivity_search(env, points=2)
    actions = applied_actions(env, found["step_ratios"])
    search = Search(short_config(algo="ppo", episodes=3, warmup_episodes=3, flops=0.6), env)
    search.start = actions, (2.0 if start_wins else -1.0)  # a reward above (below) any warm-up episode's
    search.run(3)
    assert search.cloned and search.episodes_done == 3 and not search.algo.num_timesteps
    target = actions if start_wins else search.best["actions"]
    obs, _ = env.reset()
    for a in target:
        action, _ = search.algo.predict(obs, deterministic=True)
        assert abs(float(action[0]) - a) < 0.05
        obs, *_ = env.step(np.array([a], dtype=np.float32))


def test_policy_file_errors(digits_session, tmp_path):
    cfg = short_config(episodes=3)
    search = Search(cfg, PruneEnv(session=digits_session, flops=0.6))
    search.run(3)
    good = save_policy(search.algo, cfg, search.best, tmp_path / "p")
    zipped = save_policy(search.algo, cfg, search.best, tmp_path / "p.zip")
    assert load_policy(zipped).config == load_policy(good).config
    recorded = load_policy(good).train_config  # every resolved setting but this machine's
    assert recorded["preset"] == "default" and recorded["settings"]["episodes"] == 3
    assert "out" not in recorded["settings"]

    weights = good / "policy.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(UserError, match="truncated, corrupted or was edited"):
        load_policy(good)
    weights.write_bytes(blob)
    meta = json.loads((good / "policy.json").read_text())
    (good / "policy.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(UserError, match="format version 99"):
        load_policy(good)
    (good / "policy.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupted"):
        load_policy(good)
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as z:
        z.writestr("other.txt", "x")
    with pytest.raises(UserError, match="policy.json"):
        load_policy(tmp_path / "bad.zip")
    # an edited setting fails like an edited weight: the checksum covers the config too
    edited = {**meta, "training": {**meta["training"], "max_ratio": 0.95}}
    (good / "policy.json").write_text(json.dumps(edited))
    with pytest.raises(UserError, match="policy.json does not match its checksum"):
        load_policy(good)
    (good / "policy.json").write_text(json.dumps(meta))  # the same config, reformatted, still loads
    assert load_policy(good).train_config["max_ratio"] == meta["training"]["max_ratio"]
    # a pickle disguised as a policy is never unpickled: its bytes fail the checksum first
    weights.write_bytes(b"\x80\x04\x95" + blob[3:])
    with pytest.raises(UserError, match="truncated, corrupted or was edited"):
        load_policy(good)


def test_apply_keeps_the_policys_channel_rounding(digits_session, tmp_path):
    """A policy searched with round_to=8 is replayed with it (the ratios alone do not fix the widths);
    round_to=1 asks for no rounding."""
    from pruning_core import kept_counts
    cfg = short_config(episodes=2, flops=0.6, round_to=8)
    search = Search(cfg, PruneEnv(session=digits_session, flops=0.6, round_to=8))
    search.run(2)
    path = save_policy(search.algo, cfg, search.best, tmp_path / "p")
    trace = digits_session.trace
    kept = apply_policy(path, "digits_cnn", session=digits_session, floor=())
    assert kept["round_to"] == 8 and kept["flops_ratio"] <= 0.6
    widths = kept_counts(trace, kept["ratios"], 8)
    assert all(n % 8 == 0 or n == g.channels for g, n in ((g, widths[g.name]) for g in trace.groups))
    assert kept["flops"] == trace.flops(widths)
    plain = apply_policy(path, "digits_cnn", session=digits_session, floor=(), round_to=1,
                         latency="torch", latency_batch=4)
    assert plain["round_to"] == 1 and plain["flops"] == trace.flops(kept_counts(trace, plain["ratios"]))
    lat = plain["latency"]  # the applied model timed against dense
    assert lat["backend"] == "torch" and lat["batch_size"] == 4 and lat["dense_ms"] > 0 and lat["pruned_ms"] > 0
    assert lat["flops_speedup"] == pytest.approx(1 / plain["flops_ratio"]) and "latency" not in kept


def test_apply_scores_candidates_as_the_policy_was_trained(digits_session, digits_weights, tmp_path):
    """A policy searched with reconstruction records it, and apply scores its candidates the same way unless
    told otherwise. The kept model is refitted either way unless it is fine-tuned or told not to be, and the
    report says what the refit bought."""
    cfg = short_config(episodes=2, flops=0.6, reconstruct=True)
    search = Search(cfg, PruneEnv(session=digits_session, flops=0.6))
    search.run(2)
    path = save_policy(search.algo, cfg, search.best, tmp_path / "p")
    assert load_policy(path).train_config["reconstruct"] is True
    common = dict(weights=str(digits_weights), data="digits", reward_images=64, calib_batches=1, select_images=64,
                  floor=())
    refit = apply_policy(path, "digits_cnn", **common)
    plain = apply_policy(path, "digits_cnn", reconstruct=False, **common)
    assert refit["transfer"]["reconstruct"] is True and plain["transfer"]["reconstruct"] is False
    assert refit["ratios"] == plain["ratios"]
    assert refit["transfer"]["zero_shot_acc_reward"] != plain["transfer"]["zero_shot_acc_reward"]
    assert refit["reconstruct"] is plain["reconstruct"] is True  # the final model: refitted by default
    assert (refit["acc"], refit["acc_before_reconstruct"]) == (plain["acc"], plain["acc_before_reconstruct"])
    unrefitted = apply_policy(path, "digits_cnn", reconstruct_final=False, **common)
    assert unrefitted["reconstruct"] is False and "acc_before_reconstruct" not in unrefitted
    assert unrefitted["acc"] == refit["acc_before_reconstruct"] != refit["acc"]
    tuned = apply_policy(path, "digits_cnn", finetune_epochs=1, **common)
    assert tuned["reconstruct"] is False and tuned["acc_before_finetune"] == unrefitted["acc"]


@pytest.mark.slow
def test_cli_train_export_apply_to_other_architecture(digits_weights, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--reward-images", "64", "--calib-batches", "1"]
    assert main(["train", "--model", "digits_cnn", "--weights", str(digits_weights), "--data", "digits",
                 "--episodes", "6", "--warmup-episodes", "2", "--gradient-steps", "2", "--hidden", "16",
                 "--out", str(run), "--json", "--no-progress", *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "rl" and report["flops_ratio"] <= 0.5 and report["search"]["episodes"] == 6
    assert report["reconstruct"] is True and report["search"]["reconstruct"] is True  # searched as kept: refitted
    assert "acc_before_reconstruct" in report
    # the kept model is the best of the top candidates and the floor over both splits, scored refitted as it is kept
    from pruning_core import PruningSession, SessionConfig, accuracy
    session = PruningSession("digits_cnn", str(digits_weights), "digits", SessionConfig(reward_images=64,
                                                                                        calib_batches=1))
    rescored = report["search"]["rescored"]
    assert report["search"]["floor"] == ["centre", "global", "sensitivity", "uniform"]
    assert {"centre", "global", "sensitivity", "uniform"} <= {c["source"] for c in rescored}
    assert report["search"]["vs_uniform"]["kept"] == "best" and report["search"]["vs_uniform"]["z"] == 2.0
    assert report["search"]["chosen"] == rescored[0]["source"] and report["search"]["rescore_refit"] is True
    refitted = session.build(report["ratios"], reconstruct=True)
    assert accuracy(refitted, session.splits.reward) == pytest.approx(rescored[0]["acc_reward"])
    assert report["acc_reward"] == pytest.approx(rescored[0]["acc_reward"])
    for f in ("config.json", "best.json", "history.json", "report.json", "reward.png", "ratios.png", "pareto.png",
              "final/model.pt2", "ckpt/agent.pt", "ckpt/state.json"):
        assert (run / f).is_file(), f
    assert list((run / "tb").rglob("events.out.tfevents.*"))
    assert main(["export", str(run), "--out", str(tmp_path / "policy")]) == 0
    capsys.readouterr()
    # on the model it was trained on, the exported policy replays train's own deterministic episode: same action
    # space (granularity, action centre), same ratios
    replay = apply_policy(tmp_path / "policy", "digits_cnn", session=session, floor=())
    assert load_policy(tmp_path / "policy").train_config["granularity"] == "substage"
    assert replay["ratios"] == pytest.approx(report["search"]["policy_episode"]["ratios"])
    assert main(["apply", str(tmp_path / "policy"), "--model", "digits_cnn_wide", "--data", "digits",
                 "--flops", "0.4", "--out", str(tmp_path / "applied"), "--json", *common]) == 0
    applied = json.loads(capsys.readouterr().out)
    assert applied["method"] == "rl-transfer" and applied["model"] == "digits_cnn_wide"
    assert applied["flops_ratio"] <= 0.4 and applied["reconstruct"] is True
    assert (tmp_path / "applied" / "model.pt2").is_file()
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--out", str(run)]) == 2  # run exists
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_apply_to_other_models_meets_budget(digits_session, tmp_path):
    cfg = short_config(episodes=3, flops=0.6)
    search = Search(cfg, PruneEnv(session=digits_session, flops=0.6))
    search.run(3)
    path = save_policy(search.algo, cfg, search.best, tmp_path / "p")
    for name, flops in (("resnet20", 0.5), ("mobilenetv2", 0.45)):
        session = tiny_session(name)
        report = apply_policy(path, name, flops=flops, session=session, search_episodes=2 if name == "resnet20" else 0,
                              reconstruct_final=False)  # the candidates score unrefitted, and so is the kept one here
        assert report["flops_ratio"] <= flops
        assert set(report["ratios"]) == {g.name for g in session.trace.groups}
        t, vs = report["transfer"], report["transfer"]["vs_uniform"]
        # the kept allocation is the best of the policy's candidates and the floor, whatever produced it, unless it
        # leads uniform by no more than 2 standard errors
        assert max(c["reward"] for c in t["rescored"]) == t["rescored"][0]["reward"]
        top = t["rescored"][0]["source"]  # "search" is an episode of the policy: its own, or a warm-start one
        if vs is not None and vs["kept"] == "uniform":
            assert t["chosen"] == "uniform" and vs["lead"] <= vs["z"] * vs["se"] and vs["best"] == top
            kept = next(c for c in t["rescored"] if c["source"] == "uniform")
        else:
            assert t["chosen"] in ({"policy", "search"} if t["search_episodes"] else {"policy"}) if top == "search" \
                else t["chosen"] == top
            kept = t["rescored"][0]
        assert report["acc_reward"] == pytest.approx(kept["acc_reward"])


def test_drop_policy_transfers_from_resnet20_to_resnet56(tmp_path):
    """A policy learned with dropped blocks (substage, 16-channel blocks) records its action space, and applied
    to a deeper ResNet replays it: whole blocks or none, within the budget."""
    from pruning_core import kept_counts

    def session(name):
        return tiny_session(name)

    cfg = short_config(algo="ppo", episodes=3, warmup_episodes=1, flops=0.5, round_to=16, granularity="substage",
                      drop_blocks=True)
    env = PruneEnv(session=session("resnet20"), flops=0.5, round_to=16, granularity="substage", drop=True)
    search = Search(cfg, env)
    search.run(3)
    path = save_policy(search.algo, cfg, search.best, tmp_path / "p")
    assert load_policy(path).train_config["drop_blocks"] is True
    r56 = session("resnet56")
    report = apply_policy(path, "resnet56", session=r56, floor=(), rescore_top=0)
    assert report["flops_ratio"] <= 0.5
    kept = kept_counts(r56.trace, report["ratios"], 16)
    assert all(k % 16 == 0 for k in kept.values()) and min(kept.values()) == 0
