"""The cached evaluator every search shares: an allocation (kept channels per group) is pruned, refitted,
recalibrated and scored once, in this process or on a pool of workers, and its reward kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pruning_core.errors import UserError
from pruning_core.latency_table import LatencyBudget
from pruning_core.parallel import EvaluationPool
from pruning_core.session import PruningSession

__all__ = ["EVALUATION_TIMINGS", "Evaluator"]

EVALUATION_TIMINGS = ("prune_s", "reconstruct_s", "adapt_s", "eval_s")  # what scoring a pruned model costs

Key = tuple[int, ...]


class Evaluator:
    """Reward and info of allocations of ``session``'s model, each evaluated once.

    :param round_to: the channel block widths are rounded to (as the allocations were made).
    :param reward: ``acc``, ``acc_flops`` or ``latency`` (:meth:`reward_of`).
    :param latency_batch: batch size the ``latency`` reward times.
    :param latency_budget: if given, every info also holds the predicted ``latency_ratio``.
    """

    def __init__(self, session: PruningSession, round_to: int | None = None, reward: str = "acc",
                 latency_batch: int = 1, latency_budget: LatencyBudget | None = None):
        self.session, self.trace, self.groups = session, session.trace, session.trace.groups
        self.round_to, self.reward_kind = round_to, reward
        self.latency_batch, self.latency_budget = latency_batch, latency_budget
        self.dense_flops = session.flops_dense
        self.cache: dict[Key, tuple[float, dict]] = {}
        self.pool: EvaluationPool | None = None  # where prefetch() evaluates; None: in this process
        self.timings = dict.fromkeys(EVALUATION_TIMINGS, 0.0)
        self._pending: set[Key] = set()  # held for a later prefetch (deferred episodes)
        self._fresh: set[Key] = set()  # prefetched, not yet returned by evaluate(): not a cache hit

    def key(self, kept: dict[str, int]) -> Key:
        """The allocation ``kept`` as a key of :attr:`cache`: kept channels in group order."""
        return tuple(kept[g.name] for g in self.groups)

    def allocation(self, key: Key) -> dict[str, int]:
        """The allocation a key of :attr:`cache` stands for (the inverse of :meth:`key`)."""
        return {g.name: k for g, k in zip(self.groups, key)}

    @property
    def evaluations(self) -> int:
        """Distinct allocations evaluated so far, those held for a later evaluation included."""
        return len(self.cache) + len(self._pending)

    @property
    def evaluation_s(self) -> float:
        """Seconds spent building (pruning, reconstructing), recalibrating and evaluating pruned models so far."""
        return sum(self.timings[k] for k in EVALUATION_TIMINGS)

    def hold(self, kept: dict[str, int]) -> bool:
        """Count ``kept`` as evaluated before it is (a deferred episode); returns whether it was already counted."""
        key = self.key(kept)
        seen = key in self.cache or key in self._pending
        if key not in self.cache:
            self._pending.add(key)
        return seen

    def release(self) -> None:
        """Forget the allocations :meth:`hold` counted and nobody evaluated (a search stopped mid-rollout)."""
        self._pending.clear()

    def evaluate(self, kept: dict[str, int]) -> tuple[float, dict]:
        """Reward and info of the allocation keeping ``kept[group]`` channels in each group: pruned for real,
        BN recalibrated and scored on the reward split, or the cached result of an earlier evaluation of the
        same channel counts (``info["cached"]``). An allocation that :meth:`prefetch` evaluated counts as new the
        first time it is asked for, as it would have been evaluated then.
        """
        key = self.key(kept)
        if key not in self.cache:
            self.prefetch([kept])
        reward, info = self.cache[key]
        fresh = key in self._fresh
        self._fresh.discard(key)
        return reward, {**info, "cached": not fresh}

    def prefetch(self, allocations: Iterable[dict[str, int]]) -> None:
        """Evaluate every allocation not yet in :attr:`cache`, in parallel on :attr:`pool` if there is one."""
        todo: dict[Key, dict[str, int]] = {}
        for kept in allocations:
            if (key := self.key(kept)) not in self.cache:
                todo.setdefault(key, dict(kept))
        if not todo:
            return
        jobs = [({g.name: 1.0 - kept[g.name] / g.channels for g in self.groups}, self.round_to)
                for kept in todo.values()]
        if self.pool is not None:
            results = self.pool.accuracies(jobs)
        else:  # the latency reward times each model here
            latency = self.latency_batch if self.reward_kind == "latency" else None
            results = [(*self.session.score_allocation(*job, latency_batch=latency), None) for job in jobs]
        s = self.session
        for (key, kept), (ratios, _), (acc, timings, worker) in zip(todo.items(), jobs, results):
            info = {"acc": acc, "flops_ratio": self.trace.flops(kept) / self.dense_flops,
                    "params_ratio": self.trace.params(kept) / s.params_dense, "ratios": ratios, **timings}
            if worker is not None:
                info["worker"] = worker
            if self.latency_budget is not None:
                info["latency_ratio"] = self.latency_budget.table.ratio(self.trace, kept)
            self.add_timings(info)
            self.cache[key] = (self.reward_of(acc, info), info)
            self._pending.discard(key)
            self._fresh.add(key)

    def check_parallel(self) -> None:
        """:raises UserError: the latency reward, which times each model on this machine, one at a time."""
        if self.reward_kind == "latency":
            raise UserError("the latency reward times every model on this machine; it needs --workers 1")

    def use_pool(self, pool: EvaluationPool | None) -> None:
        """Evaluate on ``pool``'s workers from now on (None: in this process); see :meth:`check_parallel`."""
        if pool is not None:
            self.check_parallel()
        self.pool = pool

    def add_timings(self, timings: dict[str, float]) -> None:
        """Count evaluation seconds (``prune_s``, ``reconstruct_s``, ``adapt_s``, ``eval_s``) in
        :attr:`evaluation_s`, those of re-scoring outside :meth:`evaluate` too.
        """
        for k in EVALUATION_TIMINGS:
            self.timings[k] += timings.get(k, 0.0)

    def reward_of(self, acc: float, info: dict) -> float:
        """The final reward for accuracy ``acc`` (%) of the pruned model that ``info`` describes."""
        err = 1.0 - acc / 100.0
        if self.reward_kind == "acc":
            return acc / 100.0
        if self.reward_kind == "acc_flops":
            return -err * math.log(info["flops_ratio"] * self.dense_flops)
        return -err * math.log(max(1000 * info["latency_ms"], 1.0))  # microseconds, so the log stays positive
