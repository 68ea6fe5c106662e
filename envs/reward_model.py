"""A reward model over an env's allocations: a Gaussian process fitted to the rewards evaluated so far, which
predicts the reward of allocations not yet evaluated, with its uncertainty, in milliseconds.

The agent uses it to screen its proposals (:meth:`RewardModel.pick`): of the episodes it samples, only those with
the highest upper confidence bound are evaluated, and the others learn from the predicted reward.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from envs.prune_env import PruneEnv

__all__ = ["RewardModel"]

Kept = dict[str, int]


class RewardModel:
    """A Gaussian process (Matern 5/2 with one length scale per decision, plus noise) from an allocation's
    features, the mean pruning ratio of each of ``env``'s decisions, to its reward.

    :param env: the environment whose decisions give the features.
    :param beta: weight of the predicted std in the upper confidence bound :meth:`pick` ranks by.
    """

    def __init__(self, env: PruneEnv, beta: float = 1.0):
        self.env = env
        self.beta = beta
        self._gp = None
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None

    def features(self, allocations: Sequence[Kept]) -> np.ndarray:
        """Per allocation, each decision's mean pruning ratio (a dropped branch counts as pruned whole)."""
        env = self.env
        return np.array([[np.mean([1.0 - kept[env.groups[i].name] / env.groups[i].channels for i in decision])
                          for decision in env.decisions] for kept in allocations], dtype=np.float64)

    def fit(self, allocations: Sequence[Kept], rewards: Sequence[float]) -> RewardModel:
        """Fit the kernel's hyperparameters and the process to ``rewards`` of ``allocations`` (deterministic)."""
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        self._x, self._y = self.features(allocations), np.asarray(rewards, dtype=np.float64)
        dims = self._x.shape[1]
        kernel = (ConstantKernel(1.0, (1e-3, 1e3)) * Matern(np.full(dims, 0.3), (1e-2, 1e3), nu=2.5)
                  + WhiteKernel(1e-3, (1e-6, 1e-1)))
        with warnings.catch_warnings():  # hyperparameters at a bound are expected with few points
            warnings.simplefilter("ignore")
            self._gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0).fit(self._x, self._y)
        return self

    def predict(self, allocations: Sequence[Kept]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted reward and its std for each allocation."""
        if self._gp is None:
            raise RuntimeError("fit the reward model before predicting")
        mean, std = self._gp.predict(self.features(allocations), return_std=True)
        return mean, std

    def pick(self, candidates: Sequence[Kept], count: int) -> tuple[list[int], np.ndarray]:
        """Indices of the ``count`` candidates to evaluate: the highest upper confidence bound (mean + beta * std)
        one at a time, each pick added to the data at its predicted mean before the next (the kriging believer),
        so that a batch spreads instead of taking near-copies of one allocation. Also returns every candidate's
        predicted reward before the first pick (:meth:`predict`'s mean).
        """
        from sklearn.gaussian_process import GaussianProcessRegressor

        if self._gp is None:
            raise RuntimeError("fit the reward model before picking")
        if not len(candidates):
            return [], np.zeros(0)
        x_cand = self.features(candidates)
        x, y, gp, chosen = self._x, self._y, self._gp, []
        predicted, std = gp.predict(x_cand, return_std=True)
        mean = predicted
        for k in range(min(count, len(candidates))):
            if k:
                mean, std = gp.predict(x_cand, return_std=True)
            score = mean + self.beta * std
            score[chosen] = -np.inf
            best = int(np.argmax(score))
            chosen.append(best)
            x, y = np.vstack([x, x_cand[best]]), np.append(y, mean[best])
            gp = GaussianProcessRegressor(gp.kernel_, normalize_y=True, optimizer=None).fit(x, y)
        return chosen, predicted
