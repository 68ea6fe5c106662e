"""PPO's screened search: a reward model (:class:`~envs.reward_model.RewardModel`) picks which of the agent's
proposals, and of random and local candidates beside them, to evaluate; the agent learns from its predictions for
the rest. :class:`~agent.search.Search` uses it when ``TrainConfig.screen`` > 1.
"""

from __future__ import annotations

import math

import numpy as np

from envs import PruneEnv
from envs.reward_model import RewardModel

__all__ = ["LOCAL_STD", "Screen"]

LOCAL_STD = 0.15  # std of the action noise of a candidate drawn around the best episode

# a deferred episode: (rollout-buffer position, or None for a warm-up episode and -1 for a candidate outside the
# rollout; its final info; its applied actions)
Deferred = tuple[int | None, dict, list[float]]


class Screen:
    """Evaluate one allocation per ``factor`` proposals of the agent: the reward model's highest upper confidence
    bound among the new allocations the agent proposed and as many candidates beside them, half uniformly random,
    half around the best episode. Warm-up episodes are always evaluated.

    :param env: the environment the search runs on (its cache is the reward model's data).
    :param factor: the agent's proposals per evaluation (``TrainConfig.screen``).
    :param seed: draws the candidates, with the count of proposals so far, so that a resumed search draws the same.
    :param table_prior: the reward model's ``table_prior``.
    """

    def __init__(self, env: PruneEnv, factor: int, seed: int, table_prior: bool = False):
        self.env, self.factor, self.seed, self.table_prior = env, factor, seed, table_prior
        self.proposals = 0  # the agent's episodes screened so far

    def planned(self, deferred: list[Deferred], new: bool = False) -> int:
        """Episodes ``deferred`` will record: every warm-up episode, and one per ``factor`` proposals (so that a
        budget is spent once the last pick's proposals are in); with ``new``, only those that evaluate an
        allocation not in the cache.
        """
        cache, key = self.env.cache, self.env.evaluator.key
        warmup = [info["kept"] for position, info, _ in deferred if position is None]
        proposals = [info["kept"] for position, info, _ in deferred if position is not None]
        count = len(proposals) // self.factor
        if not new:
            return len(warmup) + count
        fresh = {key(kept) for kept in warmup} - cache.keys()
        return len(fresh) + min(count, len({key(kept) for kept in proposals} - cache.keys() - fresh))

    def choose(self, deferred: list[Deferred], best_actions: list[float] | None, limit: int | None = None
               ) -> tuple[set[int], dict[int, float]]:
        """Which of ``deferred`` to evaluate: every warm-up episode and one per ``factor`` proposals, picked by
        the reward model among new allocations of the proposals and of :meth:`candidates` (appended to
        ``deferred``), topped up with the best repeats when too few are new. At most ``limit`` new allocations
        are chosen in all (an evaluation budget's remainder). Returns (their indices, the predicted reward of each
        episode whose allocation is new).
        """
        env = self.env
        env.evaluator.release()  # nothing is evaluated until chosen here
        chosen = {i for i, (position, _, _) in enumerate(deferred) if position is None}
        proposals = [i for i in range(len(deferred)) if i not in chosen]
        count = math.ceil(len(proposals) / self.factor)
        slots = count  # new allocations the proposals may add
        if limit is not None:
            warmup = {env.evaluator.key(deferred[i][1]["kept"]) for i in chosen} - env.cache.keys()
            slots = max(0, min(count, limit - len(warmup)))
        self.proposals += len(proposals)
        if proposals and len(env.cache) >= 2:
            deferred.extend(self.candidates(len(proposals), best_actions))
        keys = [env.evaluator.key(info["kept"]) for _, info, _ in deferred]
        new: dict[tuple, int] = {}  # each new allocation's first episode; the agent's come first
        for i in range(len(deferred)):
            if i not in chosen and keys[i] not in env.cache:
                new.setdefault(keys[i], i)
        first, predicted = list(new.values()), {}
        if len(env.cache) < 2:  # nothing to fit yet: the first new allocations
            chosen.update(first[:slots])
        elif first and slots:
            model = RewardModel(env, table_prior=self.table_prior).fit(
                [env.evaluator.allocation(key) for key in env.cache], [reward for reward, _ in env.cache.values()])
            picks, means = model.pick([deferred[i][1]["kept"] for i in first], slots)
            by_key = {keys[i]: float(m) for i, m in zip(first, means)}
            predicted = {j: by_key[keys[j]] for j in range(len(deferred)) if keys[j] in by_key}
            chosen.update(first[j] for j in picks)
        short = count - len(chosen.intersection(proposals))
        if short > 0:  # too few new allocations: record the best repeats, as cached episodes
            picked, cache = {keys[i] for i in chosen}, env.cache  # repeats of a pick first
            repeats = sorted((i for i in proposals if i not in chosen and (keys[i] in picked or keys[i] in cache)),
                             key=lambda i: (keys[i] in picked, cache.get(keys[i], (0.0,))[0]), reverse=True)
            chosen.update(repeats[:short])
        return chosen, predicted

    def candidates(self, n: int, best_actions: list[float] | None) -> list[Deferred]:
        """``n`` episodes beside the agent's, never in its rollout: half of uniformly random actions, half of
        ``best_actions`` plus Gaussian noise (:data:`LOCAL_STD`). Run on the env without evaluation.
        """
        env, rng = self.env, np.random.default_rng([self.seed, self.proposals])
        episodes, defer, out = env.episodes, env.defer, []
        env.defer = True
        for j in range(n):
            local = bool(best_actions) and j % 2 == 1
            actions = (np.clip(np.asarray(best_actions) + rng.normal(0.0, LOCAL_STD, len(best_actions)), -1, 1)
                       if local else rng.uniform(-1, 1, env.num_steps))
            env.reset()
            applied = []
            for a in actions:
                *_, info = env.step(np.array([a], np.float32))
                applied.append(float(info["action_applied"][0]))
            out.append((-1, {**info, "proposer": "local" if local else "random"}, applied))
        env.evaluator.release()  # only the picks are evaluated
        env.episodes, env.defer = episodes, defer  # not episodes of the search
        env.reset()  # back at the first step, where the agent's next episode starts
        return out
