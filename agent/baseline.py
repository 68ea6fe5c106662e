"""AMC's reward baseline for the search: final rewards minus a moving average of past ones."""

from __future__ import annotations

import gymnasium as gym

__all__ = ["MovingAverageBaseline"]


class MovingAverageBaseline(gym.Wrapper):
    """Subtract a moving average of past final rewards from each final reward (AMC's variance reduction), and
    ``repeat_penalty`` from the final reward of an episode that repeated an allocation already evaluated
    (``info["cached"]``).

    The unshifted reward is always kept in ``info["reward_raw"]`` (the search keeps its best by it), and the
    average is over raw rewards; with ``enabled=False`` nothing is shifted.
    """

    def __init__(self, env: gym.Env, alpha: float = 0.1, enabled: bool = True, repeat_penalty: float = 0.0):
        super().__init__(env)
        self.alpha = alpha
        self.enabled = enabled
        self.repeat_penalty = repeat_penalty
        self.average: float | None = None

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if (terminated or truncated) and not info.get("pending"):  # a deferred episode is shifted when resolved
            info = {**info, "reward_raw": reward}
            reward = self.shift(reward, bool(info.get("cached")))
        return obs, reward, terminated, truncated, info

    def shift(self, reward: float, cached: bool) -> float:
        """The reward the agent learns from for a final reward ``reward`` (updating the average)."""
        if self.average is None:
            self.average = reward
        shifted = reward - self.average
        self.average += self.alpha * (reward - self.average)
        reward = shifted if self.enabled else reward
        return reward - self.repeat_penalty if cached else reward

    def relative(self, reward: float) -> float:
        """What :meth:`shift` would give for an allocation not evaluated now, leaving the average as it is."""
        return reward - self.average if self.enabled and self.average is not None else reward
