"""Greedy per-unit sensitivity selection (Qualcomm AIMET's greedy compression-ratio selection, NVIDIA ModelOpt's
``fastnas``): every unit takes its largest ratio whose measured accuracy stays within one shared threshold, and the
threshold is the tightest one that meets the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["monotone", "threshold_allocation"]


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
