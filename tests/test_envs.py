import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from helpers import BudgetOnlyEnv, tiny_session
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from envs import ENV_ID, PruneEnv, select_best
from graph_encoder import DYNAMIC_FEATURES, STATIC_FEATURES
from pruning_core import UserError, kept_channels


def column(feature: str) -> int:
    """The column of a dynamic feature in an observation's node features (static features first)."""
    return len(STATIC_FEATURES) + DYNAMIC_FEATURES.index(feature)


def reached_allocations(env, rng, episodes: int) -> set[tuple[int, ...]]:
    """Channels kept per group at the end of ``episodes`` episodes of uniform random actions."""
    reached = set()
    for episode in range(episodes):
        env.reset(seed=episode)
        done = False
        while not done:
            _, _, done, _, info = env.step(np.array([rng.uniform(-1, 1)], np.float32))
        reached.add(tuple(round((1 - info["ratios"][g.name]) * g.channels) for g in env.groups))
    return reached


def test_check_env_passes_without_warnings(digits_session):
    env = PruneEnv(session=digits_session, flops=0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env, skip_render_check=True)
        sb3_check_env(env, warn=True)


def test_registered_make_with_cli_keywords(digits_session):
    env = gymnasium.make(ENV_ID, model=digits_session.model, data=digits_session.data, flops=0.5,
                         reward_images=32, calib_batches=1)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    done = False
    while not done:
        obs, reward, done, truncated, info = env.step(env.action_space.sample())
    assert set(info) >= {"acc", "flops_ratio", "params_ratio", "ratios", "eval_s"}
    assert info["flops_ratio"] <= 0.5 and 0 <= reward <= 1


@pytest.mark.parametrize("granularity", ["group", "stage", "substage"])
@pytest.mark.parametrize("model", ["resnet56", "mobilenetv2", "vgg16_bn"])
@pytest.mark.slow
def test_budget_holds_over_hundreds_of_random_episodes(model, granularity):
    session = tiny_session(model)
    rng = np.random.default_rng(0)
    for target in (0.3, 0.5, 0.8):
        env = BudgetOnlyEnv(session=session, flops=target, round_to=8 if model == "vgg16_bn" else None,
                            granularity=granularity)
        for episode in range(100):
            env.reset(seed=episode)
            style = episode % 4  # random, never prune, always max, bimodal
            done = False
            while not done:
                a = {0: rng.uniform(-1, 1), 1: -1.0, 2: 1.0, 3: float(rng.random() < 0.5) * 2 - 1}[style]
                _, _, done, _, info = env.step(np.array([a], np.float32))
            assert info["flops_ratio"] <= target + 1e-12
            for g in env.groups:  # never below the channels that max_ratio keeps (ratios are exact channel counts)
                kept = kept_channels(g.channels, info["ratios"][g.name], env.round_to)
                assert env.min_kept[g.name] <= kept <= g.channels


def test_stage_granularity_shares_one_ratio_per_stage():
    from pruning_core import uniform_ratios
    session = tiny_session("resnet56")
    env = BudgetOnlyEnv(session=session, flops=0.5, granularity="stage")
    assert [len(d) for d in env.decisions] == [9, 9, 9]  # the block-internal convs of the three stages
    assert [env.groups[d[0]].name for d in env.decisions] == ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]
    stage_of = {env.groups[i].name: k for k, d in enumerate(env.decisions) for i in d}
    for actions in ([0.0] * 3, [0.6, 0.2, -0.9], [-1.0, -1.0, -1.0]):
        obs, _ = env.reset()
        for a in actions:
            current = obs["x"].reshape(env.max_nodes, -1)[:, column("is_current")]
            assert current.sum() > 9  # every group of the stage is current
            obs, _, done, _, info = env.step(np.array([a], np.float32))
        assert done and info["flops_ratio"] <= 0.5
        for k in range(3):
            assert len({round(r, 9) for g, r in info["ratios"].items() if stage_of[g] == k}) == 1
    obs, _ = env.reset()  # action 0 everywhere is the uniform allocation
    for _ in range(3):
        *_, info = env.step(np.zeros(1, np.float32))
    assert info["ratios"] == pytest.approx(uniform_ratios(session.trace, 0.5, 0.8), abs=1 / 16)
    # substage: each downsampling block's strided conv is a step of its own
    sub = BudgetOnlyEnv(session=session, flops=0.5, granularity="substage")
    assert [[env.groups[i].name for i in d][:2] for d in sub.decisions] == [
        ["layer1.0.conv1", "layer1.1.conv1"], ["layer2.0.conv1"], ["layer2.1.conv1", "layer2.2.conv1"],
        ["layer3.0.conv1"], ["layer3.1.conv1", "layer3.2.conv1"]]
    assert [len(d) for d in sub.decisions] == [9, 1, 8, 1, 8]
    with pytest.raises(UserError, match="granularity"):
        PruneEnv(session=session, granularity="layer")


@pytest.mark.parametrize("granularity", ["group", "stage"])
def test_remaining_center_spends_the_budget(granularity):
    """With action_center="remaining", action 0 fills the budget, and an early deviation is paid back later."""
    session = tiny_session("resnet56")
    rng = np.random.default_rng(0)
    for target in (0.3, 0.5, 0.7):
        env = BudgetOnlyEnv(session=session, flops=target, granularity=granularity, action_center="remaining")
        for first in (0.0, 0.8, -0.8, None):
            env.reset()
            actions = [first if first is not None else rng.uniform(-1, 1)] + [0.0] * (env.num_steps - 1)
            for a in actions:
                *_, info = env.step(np.array([a], np.float32))
            assert target - 0.03 <= info["flops_ratio"] <= target + 1e-12, (target, first, info["flops_ratio"])
        for _ in range(20):  # any actions: still never over budget
            env.reset()
            for _ in range(env.num_steps):
                *_, info = env.step(np.array([rng.uniform(-1, 1)], np.float32))
            assert info["flops_ratio"] <= target + 1e-12


def test_feasible_allocations_are_exactly_what_episodes_can_reach():
    """The space an exhaustive search enumerates: every allocation meets the budget, and every allocation a
    clamped episode reaches is among them (ResNet-56, substage, widths in multiples of 8)."""
    session = tiny_session("resnet56")
    env = BudgetOnlyEnv(session=session, flops=0.5, round_to=8, granularity="substage")
    feasible = env.feasible_allocations()
    keys = {tuple(k[g.name] for g in env.groups) for k in feasible}
    assert len(keys) == len(feasible) == 186  # of 2 x 4 x 4 x 7 x 7 = 1,568 (stage 1's 16 channels: 8 or 16)
    assert all(env.trace.flops(k) <= env.budget for k in feasible)
    reached = reached_allocations(env, np.random.default_rng(0), 150)
    assert reached <= keys and len(reached) > 20
    with pytest.raises(UserError, match="1568 allocations"):
        env.feasible_allocations(limit=1000)


def test_drop_blocks_removes_residual_branches_within_the_budget():
    """With drop, ResNet-56's residual branches keep whole 16-channel blocks or none; every episode meets the
    budget, and those that drop a branch are evaluated on a model without it."""
    session = tiny_session("resnet56")
    with pytest.raises(UserError, match="needs round_to"):
        PruneEnv(session=session, flops=0.5, drop=True)
    env = BudgetOnlyEnv(session=session, flops=0.5, round_to=16, granularity="group", drop=True)
    assert env.ratio_grid[0] == [0.0, 1.0]  # stage 1: 16 channels or none
    assert env.ratio_grid[-1] == [0.0, 0.25, 0.5, 0.75]  # stage 3: max_ratio 0.8 keeps at least 12.8 -> 16
    rng = np.random.default_rng(0)
    dropped = 0
    for episode in range(60):
        env.reset(seed=episode)
        done = False
        while not done:
            _, _, done, _, info = env.step(np.array([rng.uniform(-1, 1)], np.float32))
        assert info["flops_ratio"] <= 0.5 + 1e-12
        kept = {g.name: round((1 - info["ratios"][g.name]) * g.channels) for g in env.groups}
        assert all(k % 16 == 0 for k in kept.values())
        dropped += sum(k == 0 for k in kept.values())
    assert dropped > 0
    reward, info = PruneEnv.evaluate(env, kept)
    assert 0 <= reward <= 1 and info["flops_ratio"] == env.trace.flops(kept) / env.dense_flops
    no_drop = BudgetOnlyEnv(session=session, flops=0.5, round_to=16, granularity="group")
    assert min(min(no_drop.min_kept.values()), *(kept_channels(g.channels, r, 16) for g, grid in
                                                 zip(no_drop.groups, no_drop.ratio_grid) for r in grid)) > 0


def test_staged_drop_steps_remove_the_cheapest_branches_of_each_run():
    """With drop and a stage-wise granularity, each run's width step (whole 16-channel blocks, never none) is
    followed by a drop step that removes its cheapest branches (``session.drop_costs``); the observation flags
    drop steps, every episode meets the budget, and the enumerated space is exactly what episodes reach."""
    from pruning_core import drop_order
    session = tiny_session("resnet56")
    env = BudgetOnlyEnv(session=session, flops=0.5, round_to=16, granularity="substage", drop=True)
    names = [[env.groups[i].name for i in d] for d in env.decisions]
    # stage 1 (16 channels: one block) has no width step; the other four runs have both
    assert env.drop_steps == [True, False, True, False, True, False, True, False, True]
    assert [len(n) for n in names] == [9, 1, 1, 8, 8, 1, 1, 8, 8]
    order = drop_order(session.trace, session.drop_costs())
    assert all(n == [g for g in order if g in n] for n, drop in zip(names, env.drop_steps) if drop)
    assert env.ratio_grid[0] == [k / 9 for k in range(8)]  # up to max_ratio 0.8 of 9 branches: 7
    assert env.ratio_grid[-2] == [0.0, 0.25, 0.5, 0.75]  # stage 3's width: at least one 16-block
    rng = np.random.default_rng(0)
    dropped = 0
    for episode in range(60):
        obs, _ = env.reset(seed=episode)
        done, t = False, 0
        while not done:
            flag = obs["x"].reshape(env.max_nodes, -1)[:env.graph.num_nodes, column("drop_step")]
            assert set(flag.tolist()) == {float(env.drop_steps[t])}
            obs, _, done, _, info = env.step(np.array([rng.uniform(-1, 1)], np.float32))
            t += 1
        assert info["flops_ratio"] <= 0.5 + 1e-12
        kept = {g.name: round((1 - info["ratios"][g.name]) * g.channels) for g in env.groups}
        assert all(k % 16 == 0 for k in kept.values())
        for n in (n for n, drop in zip(names, env.drop_steps) if drop):
            gone = [kept[g] == 0 for g in n]
            assert gone == sorted(gone, reverse=True)  # the least important ones first
        dropped += sum(k == 0 for k in kept.values())
    assert dropped > 0
    env.reset()  # action 0 everywhere: one ratio for every width and drop step, spending the budget
    for _ in range(env.num_steps):
        *_, info = env.step(np.zeros(1, np.float32))
    assert 0.45 <= info["flops_ratio"] <= 0.5
    stage = BudgetOnlyEnv(session=session, flops=0.5, round_to=16, granularity="stage", drop=True)
    assert stage.drop_steps == [True, False, True, False, True]
    feasible = stage.feasible_allocations()
    keys = {tuple(k[g.name] for g in stage.groups) for k in feasible}
    assert len(keys) == len(feasible) and all(stage.trace.flops(k) <= stage.budget for k in feasible)
    reached = reached_allocations(stage, rng, 100)
    assert reached <= keys and len(reached) > 20


@pytest.mark.parametrize("granularity", ["stage", "substage"])
def test_staged_drop_steps_keep_the_budget_on_mobilenetv2(granularity):
    """MobileNetV2's runs mix residual branches with groups that cannot be dropped: only the branches get a drop
    step, and every episode, whatever its actions, meets the budget with widths in whole blocks."""
    session = tiny_session("mobilenetv2")
    rng = np.random.default_rng(0)
    for target in (0.3, 0.6):
        env = BudgetOnlyEnv(session=session, flops=target, round_to=16, granularity=granularity, drop=True)
        assert any(env.drop_steps)
        for t, d in enumerate(env.decisions):
            assert all(env.groups[i].name in env.trace.droppable for i in d) or not env.drop_steps[t]
        for episode in range(40):
            env.reset(seed=episode)
            done = False
            while not done:
                a = rng.uniform(-1, 1) if episode % 2 else float(rng.random() < 0.5) * 2 - 1
                _, _, done, _, info = env.step(np.array([a], np.float32))
            assert info["flops_ratio"] <= target + 1e-12
            for g in env.groups:
                kept = round((1 - info["ratios"][g.name]) * g.channels)
                assert kept >= env.min_kept[g.name] and (kept > 0 or g.name in env.trace.droppable)
                assert kept % 16 == 0 or kept == g.channels or g.channels <= 16  # no wider than a block: not rounded


def test_cache_and_seeding(digits_session):
    env = PruneEnv(session=digits_session, flops=0.6)

    def episode(seed):
        env.reset(seed=seed)
        done, actions = False, []
        while not done:
            a = env.np_random.uniform(-1, 1, 1).astype(np.float32)
            actions.append(float(a[0]))
            _, reward, done, _, info = env.step(a)
        return actions, reward, info

    a1, r1, i1 = episode(7)
    a2, r2, i2 = episode(7)
    assert a1 == a2 and r1 == r2
    assert not i1["cached"] and i2["cached"]
    assert env.timings["eval_s"] > 0
    again, info = env.evaluate(env.kept)  # the last episode's allocation, evaluated directly: from the cache
    assert again == r2 and info["cached"] and info["ratios"] == i2["ratios"]


def test_bad_arguments(digits_session):
    with pytest.raises(UserError, match="unknown reward"):
        PruneEnv(session=digits_session, reward="speed")
    with pytest.raises(UserError, match="unreachable"):
        PruneEnv(session=digits_session, flops=0.01)
    env = PruneEnv(session=digits_session, flops=0.6)
    env.reset()
    for _ in env.groups:
        env.step(np.array([0.0], np.float32))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([0.5], np.float32))


@pytest.mark.parametrize("reward", ["acc_flops", "latency"])
def test_other_rewards(digits_session, reward):
    env = PruneEnv(session=digits_session, flops=0.6, reward=reward)
    env.reset(seed=0)
    done = False
    while not done:
        _, r, done, _, info = env.step(np.array([0.5], np.float32))
    assert r < 0
    assert (reward == "latency") == ("latency_ms" in info)


def test_reconstruction_is_charged_as_evaluation_time(digits_session):
    """With a reconstructing session, the refit is part of what an evaluation costs (the agent's share of the
    search's wall time is what is left), in the episodes and in the re-scoring."""
    import copy
    import dataclasses
    session = copy.copy(digits_session)
    session.config = dataclasses.replace(digits_session.config, reconstruct=True)
    session._reconstruction = None
    env = PruneEnv(session=session, flops=0.6)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, info = env.step(np.array([0.3], np.float32))
    assert info["reconstruct_s"] > 0 and env.timings["reconstruct_s"] == info["reconstruct_s"]
    assert env.evaluation_s == pytest.approx(sum(env.timings[k] for k in ("prune_s", "reconstruct_s", "adapt_s",
                                                                          "eval_s")))
    select_best(env, 1)
    assert env.timings["reconstruct_s"] > info["reconstruct_s"]
