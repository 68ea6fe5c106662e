"""The decisions of a pruning episode, as plain code: which channel groups each step sets, the ratios that give
distinct widths, how a ratio maps onto kept channels and actions, and the budget clamp. :class:`PruneEnv` steps
through them; searches enumerate and build allocations with them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np

from pruning_core.allocate import fits_budget, uniform_ratios
from pruning_core.errors import UserError
from pruning_core.latency_table import LatencyBudget
from pruning_core.prune import branch_width, drop_order, kept_channels
from pruning_core.session import PruningSession

__all__ = ["ACTION_CENTERS", "GRANULARITIES", "DecisionSpace"]

GRANULARITIES = ("group", "stage", "substage")
ACTION_CENTERS = ("uniform", "remaining", "zero")

Kept = dict[str, int]


class DecisionSpace:
    """The steps of an episode over ``session``'s channel groups and the budgets every allocation must meet (see
    :class:`~envs.prune_env.PruneEnv` for what granularity, drop steps and the action centre mean).

    :raises UserError: an unknown granularity or centre, drop steps without ``round_to``, or a budget that even
        every group at ``max_ratio`` cannot meet.
    """

    def __init__(self, session: PruningSession, flops: float, max_ratio: float = 0.8, round_to: int | None = None,
                 granularity: str = "substage", action_center: str = "remaining",
                 latency_budget: LatencyBudget | None = None, drop: bool = False):
        if not 0.0 < max_ratio < 1.0:
            raise UserError(f"max_ratio {max_ratio} must be in (0, 1)")
        if drop and not (round_to and round_to > 1):
            raise UserError("dropping residual branches needs round_to (--round-to), the channel block that a "
                            "width is rounded to, e.g. 16 on an AVX-512 CPU: a branch drops under half a block")
        if granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
        if action_center not in ACTION_CENTERS:
            raise UserError(f"unknown action_center {action_center!r}; use one of {', '.join(ACTION_CENTERS)}")
        self.session, self.trace, self.groups = session, session.trace, session.trace.groups
        self.target, self.max_ratio, self.round_to = flops, max_ratio, round_to
        self.granularity, self.action_center, self.latency_budget, self.drop = (granularity, action_center,
                                                                                latency_budget, drop)
        self._drops = self.trace.droppable if drop else frozenset()
        self._staged = drop and granularity != "group"  # each run of groups gets a drop step after its width step
        self.index = {g.name: i for i, g in enumerate(self.groups)}
        self.min_width = {g.name: self.kept_of(g, max_ratio) for g in self.groups}
        self.decisions, self.drop_steps = self._steps(granularity)
        self.ratio_grid = []  # per decision: the ratios that give distinct allocations, up to max_ratio
        for t, d in enumerate(self.decisions):
            self.ratio_grid.append([k / len(d) for k in range(self._drop_count(len(d), max_ratio) + 1)]
                                   if self.drop_steps[t] else self._width_grid(d))
        self.dense_flops = session.flops_dense
        self.budget = flops * self.dense_flops
        self.dense = {g.name: g.channels for g in self.groups}
        self.min_kept = dict(self.dense)  # every decision at max_ratio
        for t in range(len(self.decisions)):
            self.min_kept.update(self.apply(self.min_kept, t, max_ratio))
        name, floor = session.model_name, self.trace.flops(self.min_kept)
        if floor > self.budget:
            raise UserError(f"FLOPs target {flops:.3f} is unreachable for {name}: with every prunable group at "
                            f"max_ratio {max_ratio} it keeps {floor / self.dense_flops:.3f}; raise the target or "
                            "max_ratio")
        if latency_budget is not None and not latency_budget.fits(self.trace, self.min_kept):
            raise UserError(f"latency budget {latency_budget.fraction:.3f} is unreachable for {name}: with every "
                            f"prunable group at max_ratio {max_ratio} it keeps "
                            f"{latency_budget.table.ratio(self.trace, self.min_kept):.3f} of its predicted latency; "
                            "raise the budget or max_ratio")
        if action_center == "zero":
            self.center = [max_ratio / 2] * self.num_steps
        elif self._staged:  # the one ratio for every width and drop step that spends the budget
            self.center = [self.fill_ratio(self.dense, 0)] * self.num_steps
        else:  # "remaining" recomputes it at each step (PruneEnv)
            center = uniform_ratios(self.trace, flops, max_ratio, round_to, latency_budget)
            self.center = [float(np.mean([center[self.groups[i].name] for i in d])) for d in self.decisions]

    @property
    def num_steps(self) -> int:
        """Steps per episode: the number of decisions (groups, or stages)."""
        return len(self.decisions)

    def _steps(self, granularity: str) -> tuple[list[list[int]], list[bool]]:
        """Group indices decided by each step, and whether it is a drop step. Width steps decide the runs of
        :meth:`_runs`. When staged, each run's width step is followed by a drop step over its residual branches,
        cheapest first (:func:`drop_order`), and a width step with one choice is left out (ResNet-56's
        16-wide stage 1 on 16-channel blocks).
        """
        runs = self._runs(granularity)
        if not self._staged:
            return runs, [False] * len(runs)
        rank = {name: k for k, name in enumerate(drop_order(self.trace, self.session.drop_costs()))}
        decisions, drop_steps = [], []
        for run in runs:
            if len(self._width_grid(run)) > 1:
                decisions.append(run)
                drop_steps.append(False)
            branches = sorted((i for i in run if self.groups[i].name in rank), key=lambda i: rank[self.groups[i].name])
            if branches:
                decisions.append(branches)
                drop_steps.append(True)
        return decisions, drop_steps

    def _runs(self, granularity: str) -> list[list[int]]:
        """Group indices of each run: one group each, or runs of equal (width, resolution); with ``substage``, a
        group whose producing layer is strided is a run of its own.
        """
        if granularity == "group":
            return [[i] for i in range(len(self.groups))]
        out: list[list[int]] = []
        last, last_alone = None, False
        for i, g in enumerate(self.groups):
            layer = self.trace.layers[g.name]
            key = (g.channels, layer.out_hw)
            alone = granularity == "substage" and layer.stride > 1
            if out and key == last and not alone and not last_alone:
                out[-1].append(i)
            else:
                out.append([i])
            last, last_alone = key, alone
        return out

    def kept_of(self, group, ratio: float) -> int:
        """Channels ``group`` keeps at ``ratio`` on a width step (rounding, and dropping where allowed; when staged,
        a residual branch keeps at least one block, and only its drop step removes it).
        """
        if self._staged and group.name in self._drops:
            return branch_width(group.channels, ratio, self.round_to, group.step)
        return kept_channels(group.channels, ratio, self.round_to, group.name in self._drops, group.step)

    def _width_grid(self, decision: list[int]) -> list[float]:
        """The ratios that give distinct widths to the groups of width step ``decision``, up to max_ratio."""
        grid = {1 - k / g.channels for g in (self.groups[i] for i in decision)
                for k in {self.kept_of(g, 1 - j / g.channels) for j in range(1, g.channels + 1)}
                if k >= self.min_width[g.name]}
        return sorted(grid)

    @staticmethod
    def _drop_count(branches: int, ratio: float) -> int:
        """Branches a drop step over ``branches`` removes at ``ratio`` (the nearest whole number)."""
        return int(math.floor(ratio * branches + 0.5 + 1e-9))

    def apply(self, kept: Kept, t: int, ratio: float) -> Kept:
        """Channels kept by the groups of decision ``t`` at ``ratio``, from allocation ``kept``: a width step
        narrows them (never below max_ratio), a drop step removes the first ``ratio`` share of its branches.
        """
        mine = self.decisions[t]
        if self.drop_steps[t]:
            k = self._drop_count(len(mine), ratio)
            return {self.groups[i].name: 0 if j < k else kept[self.groups[i].name] for j, i in enumerate(mine)}
        if ratio >= self.max_ratio:
            return {self.groups[i].name: self.min_width[self.groups[i].name] for i in mine}
        return {g.name: max(self.min_width[g.name], self.kept_of(g, ratio)) for g in (self.groups[i] for i in mine)}

    def _rollout(self, kept: Kept, t: int, ratio: float, rest: float) -> Kept:
        """``kept`` with decision ``t`` at ``ratio`` and every later decision at ``rest``."""
        kept = dict(kept)
        for u in range(t, self.num_steps):
            kept.update(self.apply(kept, u, ratio if u == t else rest))
        return kept

    def fits(self, kept: Kept) -> bool:
        """Whether ``kept`` meets the FLOPs budget (and the predicted-latency budget, if there is one)."""
        return fits_budget(self.trace, kept, self.budget, self.latency_budget)

    def min_ratio(self, kept: Kept, t: int) -> float:
        """Smallest ratio for decision ``t`` after ``kept`` that keeps the budget reachable with every later group
        at max_ratio (AMC's resource-constrained clamp). FLOPs fall as the ratio grows: a binary search over the
        decision's distinct widths.
        """
        grid = self.ratio_grid[t]
        lo, hi = 0, len(grid) - 1  # grid[-1] fits: the constructor checked the all-max floor
        while lo < hi:
            mid = (lo + hi) // 2
            if self.fits(self._rollout(kept, t, grid[mid], self.max_ratio)):
                hi = mid
            else:
                lo = mid + 1
        return grid[lo]

    def fill_ratio(self, kept: Kept, t: int) -> float:
        """The one ratio that, applied to decision ``t`` and every later one after ``kept``, spends exactly the
        budget left.
        """
        def fits(r: float) -> bool:
            return self.fits(self._rollout(kept, t, r, r))

        if fits(0.0):
            return 0.0
        lo, hi = 0.0, self.max_ratio  # hi fits: every reachable state keeps the all-max floor within budget
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return hi

    def action_to_ratio(self, t: int, a: float) -> float:
        """Map an action in [-1, 1] to a pruning ratio in [0, max_ratio] through step ``t``'s centre."""
        c = self.center[t]
        return c * (1.0 + a) if a < 0 else c + a * (self.max_ratio - c)

    def ratio_to_action(self, t: int, ratio: float) -> float:
        """The inverse of :meth:`action_to_ratio` (clipped to the action box)."""
        c, r = self.center[t], min(ratio, self.max_ratio)
        if r < c:
            return float(np.clip(r / c - 1.0, -1.0, 0.0))
        return float(np.clip((r - c) / (self.max_ratio - c), 0.0, 1.0)) if self.max_ratio > c else 0.0

    def allocation(self, step_ratios: Iterable[float]) -> Kept:
        """Channels kept per group with decision ``t`` at ``step_ratios[t]``, as the steps apply them, without the
        budget clamp (check it with :meth:`fits`).
        """
        kept = dict(self.dense)
        for t, r in enumerate(step_ratios):
            kept.update(self.apply(kept, t, r))
        return kept

    def feasible_allocations(self, limit: int = 10_000) -> list[Kept]:
        """Every allocation of the space that meets the budgets: one of each decision's distinct widths
        (``ratio_grid``) per decision, as kept channels per group. A compact space (``substage`` with
        ``round_to`` 8) can be searched exhaustively; a :class:`UserError` if it holds more than ``limit``.
        """
        size = math.prod(len(grid) for grid in self.ratio_grid)
        if size > limit:
            raise UserError(f"the action space holds {size} allocations, more than {limit}; use a coarser "
                            "granularity or round_to")
        return [kept for kept in map(self.allocation, itertools.product(*self.ratio_grid)) if self.fits(kept)]
