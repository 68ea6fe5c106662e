"""The reward model (envs.reward_model) and PPO's screened search (agent.search.Search with ``screen`` > 1)."""

from functools import partial

import numpy as np
import pytest
from helpers import tiny_config
from scipy.stats import spearmanr

from agent import Search, TrainConfig
from agent.screen import Screen
from envs import PruneEnv
from envs.reward_model import RewardModel

screened_config = partial(tiny_config, episodes=8, warmup_episodes=4, rollout_episodes=2, screen=4, clone_warmup=True)


def random_allocations(env: PruneEnv, n: int, seed: int) -> list[dict[str, int]]:
    rng = np.random.default_rng(seed)
    return [env.allocation(rng.uniform(0, env.max_ratio, env.num_steps)) for _ in range(n)]


def test_reward_model_learns_a_smooth_reward_and_picks_a_spread_batch_near_its_top(digits_session):
    env = PruneEnv(session=digits_session, flops=0.6)
    model = RewardModel(env)

    def reward(allocs):  # a smooth reward of the decisions' ratios, best where every ratio is 0.3
        return -((model.features(allocs) - 0.3) ** 2).sum(axis=1)

    seen, unseen = random_allocations(env, 30, 0), random_allocations(env, 40, 1)
    model.fit(seen, reward(seen))
    mean, std = model.predict(unseen)
    assert spearmanr(mean, reward(unseen))[0] > 0.9 and (std > 0).all()
    picks, predicted = model.pick(unseen, 3)
    assert np.allclose(predicted, mean)  # the predictions before the first pick
    assert len(set(picks)) == 3  # the kriging believer spreads the batch
    assert picks[0] in np.argsort(-reward(unseen))[:5]
    with pytest.raises(RuntimeError, match="fit"):
        RewardModel(env).predict(unseen)


def test_the_table_prior_reads_the_sensitivity_table_and_fits_its_additive_prediction(digits_session):
    env = PruneEnv(session=digits_session, flops=0.6)
    weights = np.linspace(1.0, 3.0, env.num_steps)

    def reward(allocs):  # additive and linear in the decisions' ratios, as the interpolated table is
        return 0.9 - 0.3 * (weights * RewardModel(env).features(allocs)).sum(axis=1)

    table = [env.allocation([r if i == t else 0.0 for i in range(env.num_steps)])
             for t in range(env.num_steps) for r in (0.1, 0.3, 0.5, env.max_ratio)]
    seen, unseen = table + random_allocations(env, 4, 0), random_allocations(env, 40, 1)
    model = RewardModel(env, table_prior=True).fit(seen, reward(seen))
    assert len(model._curves) == env.num_steps and abs(model._line[1] - 1.0) < 0.1
    mean, _ = model.predict(unseen)
    assert np.abs(mean - reward(unseen)).mean() < 0.01
    assert np.allclose(model.pick(unseen, 2)[1], mean)  # pick reports the same predictions, prior included
    plain = RewardModel(env).fit(seen, reward(seen))
    assert not plain._curves and np.allclose(plain._prior(plain.features(unseen)), 0.0)


def test_table_prior_makes_the_screen_fit_the_floors_sensitivity_table(digits_session, monkeypatch):
    from envs import sensitivity_table

    fits = []
    fit = RewardModel.fit

    def recording_fit(self, allocations, rewards):
        out = fit(self, allocations, rewards)
        fits.append((self.table_prior, len(self._curves)))
        return out

    monkeypatch.setattr(RewardModel, "fit", recording_fit)
    cfg = screened_config(table_prior=True)
    env = PruneEnv(session=digits_session, flops=0.6)
    sensitivity_table(env, 2)  # as train's floor measures it before the search
    Search(cfg, env).run(cfg.episodes)
    assert fits and all(prior and curves == env.num_steps for prior, curves in fits)


def test_screened_ppo_evaluates_one_allocation_per_screen_proposals(digits_session):
    """Each PPO rollout proposes rollout_episodes * screen episodes and records rollout_episodes of them: the
    reward model's picks among the agent's proposals and the random and local candidates, with their predictions.
    """
    cfg = screened_config()
    search = Search(cfg, PruneEnv(session=digits_session, flops=0.6))
    search.run(cfg.episodes)
    assert search.episodes_done == cfg.episodes == len(search.history)
    assert search.evaluations_done == len(search.env.cache) <= cfg.episodes
    assert search.proposals == (cfg.episodes - cfg.warmup_episodes) * cfg.screen
    assert search.algo.num_timesteps == search.proposals * search.env.num_steps
    screened = search.history[cfg.warmup_episodes:]
    assert all(h.get("proposer") in ("agent", "random", "local") for h in screened)
    assert all("predicted" in h for h in screened if not h["cached"])
    assert not any("proposer" in h for h in search.history[:cfg.warmup_episodes])
    again = Search(cfg, PruneEnv(session=digits_session, flops=0.6))
    again.run(cfg.episodes)  # the same seed screens the same way
    assert [(h["acc"], h.get("proposer")) for h in again.history] == [(h["acc"], h.get("proposer"))
                                                                      for h in search.history]


def test_screen_one_evaluates_every_episode_of_the_agent(digits_session):
    cfg = screened_config(screen=1)
    search = Search(cfg, PruneEnv(session=digits_session, flops=0.6))
    search.run(cfg.episodes)
    assert search.episodes_done == cfg.episodes and search.proposals == 0 and not search.screening
    assert search.algo.num_timesteps == (cfg.episodes - cfg.warmup_episodes) * search.env.num_steps
    assert not any("proposer" in h for h in search.history)


def test_the_evaluation_budget_holds_while_screening(digits_session):
    cfg = screened_config(episodes=40, evaluations=9)
    search = Search(cfg, PruneEnv(session=digits_session, flops=0.6))
    search.run(cfg.episodes, cfg.evaluations)
    assert search.evaluations_done == len(search.env.cache) == 9


def test_the_screen_never_picks_more_new_allocations_than_the_budget_has_left(digits_session):
    """A rollout's picks (one per ``factor`` proposals) are cut to the evaluations left, so a budget is a cap."""
    env = PruneEnv(session=digits_session, flops=0.6)
    for kept in random_allocations(env, 3, 0):
        env.evaluate(kept)
    proposals = Screen(env, factor=4, seed=0).candidates(12, None)  # 12 proposals: 3 picks

    def new_picks(limit):
        deferred = list(proposals)
        chosen, _ = Screen(env, factor=4, seed=0).choose(deferred, None, limit)
        return {env.evaluator.key(deferred[i][1]["kept"]) for i in chosen} - env.cache.keys()

    assert [len(new_picks(limit)) for limit in (None, 5, 1, 0)] == [3, 3, 1, 0]


def test_a_run_recorded_before_screening_resumes_without_it():
    assert TrainConfig().screen > 1
    assert TrainConfig.from_dict({"model": "digits_cnn"}).screen == 1
    assert TrainConfig.from_dict({"model": "digits_cnn", "screen": 4}).screen == 4
