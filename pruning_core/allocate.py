"""Pruning ratios that meet a FLOPs budget (and optionally a predicted-latency one): one uniform ratio, Taylor global
ranking, or greedy per-unit sensitivity selection by a shared accuracy threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pruning_core.errors import UserError
from pruning_core.prune import kept_channels, kept_counts

if TYPE_CHECKING:
    import torch

    from pruning_core.graph import ModelTrace
    from pruning_core.latency_table import LatencyBudget

__all__ = ["fits_budget", "global_ratios", "monotone", "threshold_allocation", "uniform_ratios"]


def monotone(table: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """``(ratio, accuracy)`` pairs sorted by ratio, with accuracy made non-increasing (a running minimum), so that
    a larger ratio never looks cheaper than a smaller one.
    """
    out, low = [], float("inf")
    for ratio, acc in sorted(table):
        low = min(low, acc)
        out.append((ratio, low))
    return out


def threshold_allocation(tables: Sequence[Sequence[tuple[float, float]]],
                         fits: Callable[[list[float]], bool]) -> tuple[list[float], float]:
    """The per-unit ratios of the highest accuracy threshold whose allocation ``fits`` the budget.

    :param tables: per unit, ``(ratio, accuracy)`` measured with that unit alone pruned at that ratio; ratio 0 (the
        unpruned unit) is implied with the highest accuracy of any entry.
    :param fits: whether an allocation (one ratio per unit) meets the budget; it must hold for larger ratios once
        it holds for smaller ones, as FLOPs and latency budgets do.
    :returns: (ratios, threshold). Every unit takes the largest ratio whose (monotone) accuracy is at least
        the threshold.
    :raises ValueError: when not even every unit at its largest ratio fits.
    """
    curves = [monotone(t) for t in tables]

    def ratios_at(threshold: float) -> list[float]:
        return [max((r for r, acc in curve if acc >= threshold), default=0.0) for curve in curves]

    thresholds = sorted({acc for curve in curves for _, acc in curve}, reverse=True)  # loosest last
    if not thresholds or not fits(ratios_at(thresholds[-1])):
        raise ValueError("the budget is not met even with every unit at its largest measured ratio")
    lo, hi = 0, len(thresholds) - 1  # hi fits; find the first (highest) threshold that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(ratios_at(thresholds[mid])):
            hi = mid
        else:
            lo = mid + 1
    return ratios_at(thresholds[lo]), thresholds[lo]


def fits_budget(trace: ModelTrace, kept: dict[str, int], max_flops: float,
                latency: LatencyBudget | None = None) -> bool:
    """Whether ``kept`` channels stay within ``max_flops`` FLOPs and, given ``latency``, its predicted latency."""
    return trace.flops(kept) <= max_flops and (latency is None or latency.fits(trace, kept))


def _check_target(trace: ModelTrace, target: float, max_ratio: float, round_to: int | None,
                  latency: LatencyBudget | None = None) -> int:
    if not 0.0 < target <= 1.0:
        raise UserError(f"FLOPs target {target} must be in (0, 1]")
    dense = trace.flops()
    floor_kept = kept_counts(trace, {g.name: max_ratio for g in trace.groups}, round_to)
    floor = trace.flops(floor_kept) / dense
    if floor > target + 1e-12:
        raise UserError(f"FLOPs target {target:.3f} is unreachable: with every prunable group at max ratio "
                        f"{max_ratio} the model keeps {floor:.3f} of its FLOPs; raise the target or --max-ratio")
    if latency is not None and not latency.fits(trace, floor_kept):
        raise UserError(f"latency budget {latency.fraction:.3f} is unreachable: with every prunable group at max "
                        f"ratio {max_ratio} the model keeps {latency.table.ratio(trace, floor_kept):.3f} of its "
                        "predicted latency; raise --max-latency or --max-ratio")
    return dense


def uniform_ratios(trace: ModelTrace, target: float, max_ratio: float = 0.9,
                   round_to: int | None = None, latency: LatencyBudget | None = None) -> dict[str, float]:
    """The smallest single ratio for all groups whose pruned FLOPs are at most ``target`` of dense (and, given
    ``latency``, whose predicted latency fits it too).

    Groups then take back one channel each, in order, while the budget holds, so the result lands
    close below the target even when every group is narrow.
    """
    dense = _check_target(trace, target, max_ratio, round_to, latency)
    lo, hi = 0.0, max_ratio

    def fits(ratios: dict[str, float]) -> bool:
        return fits_budget(trace, kept_counts(trace, ratios, round_to), target * dense, latency)

    if fits({g.name: 0.0 for g in trace.groups}):
        return {g.name: 0.0 for g in trace.groups}
    for _ in range(40):
        mid = (lo + hi) / 2
        if fits({g.name: mid for g in trace.groups}):
            hi = mid
        else:
            lo = mid
    # One shared ratio moves every group at once, so the FLOPs step can be coarse; give back one channel
    # per group, in order, while the budget still holds (ratios stay within one channel of uniform).
    ratios = {g.name: hi for g in trace.groups}
    step = round_to if round_to and round_to > 1 else 1
    for g in trace.groups:
        kept = kept_channels(g.channels, ratios[g.name], round_to, multiple=g.step)
        if kept + step > g.channels:
            continue
        trial = {**ratios, g.name: 1.0 - (kept + step) / g.channels}
        if fits(trial):
            ratios = trial
    return ratios


def global_ratios(trace: ModelTrace, scores: dict[str, torch.Tensor], target: float, max_ratio: float = 0.9,
                  round_to: int | None = None, latency: LatencyBudget | None = None) -> dict[str, float]:
    """Molchanov's global ranking: remove the lowest-scoring channels network-wide until FLOPs meet ``target``
    (and, given ``latency``, the predicted latency its budget).

    No group loses more than ``max_ratio`` of its channels.
    """
    dense = _check_target(trace, target, max_ratio, round_to, latency)
    entries = sorted((float(s), g.name) for g in trace.groups for s in scores[g.name])
    cap = {g.name: g.channels - kept_channels(g.channels, max_ratio, multiple=g.step) for g in trace.groups}

    def ratios_for(k: int) -> dict[str, float]:
        removed = dict.fromkeys(cap, 0)
        for _, name in entries[:k]:
            if removed[name] < cap[name]:
                removed[name] += 1
        return {g.name: removed[g.name] / g.channels for g in trace.groups}

    def fits(k: int) -> bool:
        return fits_budget(trace, kept_counts(trace, ratios_for(k), round_to), target * dense, latency)

    lo, hi = 0, len(entries)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return ratios_for(lo)
