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

    With ``table_prior``, the process models what a linear fit to the sensitivity table's additive prediction
    leaves: the table is read from the data (allocations that prune one decision alone), each allocation's
    prediction is the sum of its decisions' drops, interpolated, and the fit uses the allocations that prune more.
    Use it when a sensitivity table was measured before the search (``train``'s floor does).

    :param env: the environment whose decisions give the features.
    :param beta: weight of the predicted std in the upper confidence bound :meth:`pick` ranks by.
    :param table_prior: add the table's additive prediction as a linear prior mean.
    """

    def __init__(self, env: PruneEnv, beta: float = 1.0, table_prior: bool = False):
        self.env = env
        self.beta = beta
        self.table_prior = table_prior
        self._gp = None
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None  # the rewards less the prior mean
        self._curves: list[tuple[np.ndarray, np.ndarray]] = []  # per decision: the table's ratios, drops
        self._line = (0.0, 0.0)  # the prior mean: intercept, slope on the additive drop

    def features(self, allocations: Sequence[Kept]) -> np.ndarray:
        """Per allocation, each decision's mean pruning ratio (a dropped branch counts as pruned whole)."""
        env = self.env
        return np.array([[np.mean([1.0 - kept[env.groups[i].name] / env.groups[i].channels for i in decision])
                          for decision in env.decisions] for kept in allocations], dtype=np.float64)

    def fit(self, allocations: Sequence[Kept], rewards: Sequence[float]) -> RewardModel:
        """Fit the kernel's hyperparameters and the process to ``rewards`` of ``allocations`` (deterministic)."""
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        x, y = self.features(allocations), np.asarray(rewards, dtype=np.float64)
        single = (x > 0).sum(axis=1) == 1  # a sensitivity table's rows: one decision pruned alone
        if self._fit_prior(x, y, single):  # the table enters through the prior; the process fits the rest
            x, y = x[~single], y[~single]
        self._x, self._y = x, y - self._prior(x)
        dims = self._x.shape[1]
        kernel = (ConstantKernel(1.0, (1e-3, 1e3)) * Matern(np.full(dims, 0.3), (1e-2, 1e3), nu=2.5)
                  + WhiteKernel(1e-3, (1e-6, 1e-1)))
        with warnings.catch_warnings():  # hyperparameters at a bound are expected with few points
            warnings.simplefilter("ignore")
            self._gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0).fit(self._x, self._y)
        return self

    def _fit_prior(self, x: np.ndarray, y: np.ndarray, single: np.ndarray) -> bool:
        """Read the sensitivity table from the ``single`` rows of ``x``, which prune one decision alone (the reward at
        ratio 0 extrapolated from each decision's first two), and fit the prior mean's line to the other rows (slope
        1 through the best while fewer than 3 of them). Whether there is a prior: with ``table_prior``, a table and
        at least 2 other rows.
        """
        self._curves, self._line = [], (0.0, 0.0)
        if not self.table_prior or not single.any() or (~single).sum() < 2:
            return False
        top = float(y[single].max())
        for t in range(x.shape[1]):
            rows = single & (x[:, t] > 0)
            order = np.argsort(x[rows, t])
            ratios, accs = x[rows, t][order], y[rows][order]
            dense = top if len(ratios) < 2 else max(  # ratio 0, extrapolated from the first two ratios
                accs[0], accs[0] + (accs[0] - accs[1]) * ratios[0] / max(ratios[1] - ratios[0], 1e-9))
            self._curves.append((np.concatenate([[0.0], ratios]), np.concatenate([[0.0], accs - dense])))
        drop, rest = self._drop(x), ~single
        if rest.sum() >= 3 and np.ptp(drop[rest]) > 0:
            slope, intercept = np.polyfit(drop[rest], y[rest], 1)
            self._line = (float(intercept), float(max(slope, 0.0)))
        else:
            self._line = (top, 1.0)
        return True

    def _drop(self, x: np.ndarray) -> np.ndarray:
        """The table's additive prediction: per row, the sum of its decisions' interpolated drops."""
        return sum((np.interp(x[:, t], ratios, drops) for t, (ratios, drops) in enumerate(self._curves)),
                   np.zeros(len(x)))

    def _prior(self, x: np.ndarray) -> np.ndarray:
        """The prior mean at feature rows ``x``: 0 without a table."""
        if not self._curves:
            return np.zeros(len(x))
        return self._line[0] + self._line[1] * self._drop(x)

    def predict(self, allocations: Sequence[Kept]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted reward and its std for each allocation."""
        if self._gp is None:
            raise RuntimeError("fit the reward model before predicting")
        x = self.features(allocations)
        mean, std = self._gp.predict(x, return_std=True)
        return mean + self._prior(x), std

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
        prior = self._prior(x_cand)
        mean, std = gp.predict(x_cand, return_std=True)  # of the rewards less the prior
        predicted = mean + prior
        for k in range(min(count, len(candidates))):
            if k:
                mean, std = gp.predict(x_cand, return_std=True)
            score = mean + prior + self.beta * std
            score[chosen] = -np.inf
            best = int(np.argmax(score))
            chosen.append(best)
            x, y = np.vstack([x, x_cand[best]]), np.append(y, mean[best])
            gp = GaussianProcessRegressor(gp.kernel_, normalize_y=True, optimizer=None).fit(x, y)
        return chosen, predicted
