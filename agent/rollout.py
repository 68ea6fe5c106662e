"""How episodes reach a :class:`~agent.search.Search`: the SB3 callback that reports PPO's steps, the random warm-up
episodes, the evaluation of the episodes a rollout deferred, and the history record of each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from envs import resolve_episode

if TYPE_CHECKING:
    from agent.search import Search

__all__ = ["EpisodeCallback", "episode_record", "random_episodes", "resolve_deferred"]


class EpisodeCallback(BaseCallback):
    """Report SB3's steps, episode ends and rollout boundaries to a search; stop learning at its budget."""

    def __init__(self, search: Search):
        super().__init__()
        self.search = search

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"]):
            self.search.on_step(info)
            if done and info.get("pending"):  # this step's reward goes into the buffer at its position
                self.search.defer_episode(info, self.locals["rollout_buffer"].pos)
            elif done:
                self.search.on_episode_end(info)
        return not self.search.budget_spent()

    def _on_rollout_start(self) -> None:
        # after the previous rollout's update: widening the policy then leaves that update's ratios intact
        self.search.on_rollout_start()

    def _on_rollout_end(self) -> None:
        self.search.on_rollout_end()


def random_episodes(search: Search, batch: int) -> None:
    """Play up to ``batch`` episodes of uniformly random actions (PPO's warm-up), none past ``warmup_episodes`` or the
    budget; each is recorded, or deferred if it ended without evaluation. The actions of episode ``i`` come from
    ``seed`` and ``i`` alone.
    """
    for _ in range(batch):  # evaluated together, then recorded one by one
        episode = search.episodes_done + search.pending_episodes  # this episode's index, deferred ones counted
        if episode >= search.config.warmup_episodes or search.budget_spent():
            break
        rng = np.random.default_rng([search.config.seed, episode])
        search.wrapped.reset()
        done = False
        while not done:
            _, _, terminated, truncated, info = search.wrapped.step(rng.uniform(-1, 1, 1).astype(np.float32))
            search.on_step(info)
            done = terminated or truncated
        if info.get("pending"):
            search.defer_episode(info, None)
        else:
            search.on_episode_end(info)


def resolve_deferred(search: Search, deferred: list[tuple[int | None, dict, list[float]]], buffer=None) -> None:
    """Evaluate ``deferred`` episodes (buffer position, info, applied actions) together, record each in order
    through ``search.on_episode_end``, and write the reward the agent learns from into ``buffer`` (see
    :meth:`Search.resolve <agent.search.Search.resolve>`).
    """
    env = search.env
    limit = None if search.target_evaluations is None else search.target_evaluations - len(env.cache)
    evaluated, predicted = (search.screen.choose(deferred, (search.best or {}).get("actions"), limit)
                            if search.screening else (set(range(len(deferred))), {}))
    env.evaluator.prefetch(deferred[i][1]["kept"] for i in sorted(evaluated))
    learned, rewards = {}, []
    for i in sorted(evaluated):
        reward, result = resolve_episode(env, deferred[i][1])
        learned[i] = search.wrapped.shift(reward, result["cached"])
        rewards.append(reward)
        search.on_episode_end({**result, "reward_raw": reward, "predicted": predicted.get(i),
                               "proposer": deferred[i][1].get("proposer") or (
                                   "agent" if search.screening and deferred[i][0] is not None else None)},
                              deferred[i][2])
    fallback = float(np.mean(rewards)) if rewards else 0.0  # for a proposal the model did not predict
    for i, (position, info, _) in enumerate(deferred):
        if i not in evaluated and position is not None and position >= 0:
            # its reward if an episode evaluated it, else the prediction (else this batch's mean)
            key = env.evaluator.key(info["kept"])
            value = env.cache[key][0] if key in env.cache else predicted.get(i, fallback)
            learned[i] = search.wrapped.relative(value)
    if buffer is not None:
        for i, (position, _, _) in enumerate(deferred):
            if position is not None and position >= 0:
                buffer.rewards[position, 0] = learned[i]


def episode_record(info: dict, episode: int, noise_sigma: float | None, wall_s: float) -> dict:
    """The history record of a finished episode, from its last step's ``info``."""
    record = {"episode": episode, "reward": float(info["reward_raw"]), "acc": info["acc"],
              "flops_ratio": info["flops_ratio"], "params_ratio": info["params_ratio"],
              "cached": bool(info.get("cached")), "noise_sigma": noise_sigma, "wall_s": round(wall_s, 3)}
    if info.get("predicted") is not None:  # the reward model's prediction, when it picked this episode
        record["predicted"] = round(info["predicted"], 5)
    if info.get("proposer"):  # a screened candidate that was not the agent's own episode
        record["proposer"] = info["proposer"]
    if "worker" in info:  # the evaluation process that scored this allocation
        record["worker"] = info["worker"]
    return record
