"""Privacy-utility frontiers: is one method's trade-off better than another's, not one point's?

DESIGN.md "Comparing methods: frontiers, not points". Every (method, mask ratio, lambda) point has per-seed
values of verification accuracy (utility, higher is better) and ``identity_leak@1`` (privacy, lower is better).

- A method's **frontier** is its upper-left set: the points no other point of the same method beats on both
  axes (seed means), ordered by leak, joined by straight lines. It is the Pareto set rather than the convex
  hull: the hull's chords would credit a method with accuracy at leaks that no setting of it released (a
  mixture of two releases is not a release the platform makes), while a straight line between two neighbouring
  settings stands for the settings between them (mask ratios between two swept ones).
- **Accuracy at equal leak**: at each of the baseline frontier's points, the method's frontier of the same seed
  is read at that seed's baseline leak, and the difference of accuracies is paired by seed: mean and 95% t
  interval. Outside the range of leaks the method's frontier spans, the difference is undefined (NaN), never
  extrapolated. **Leak at equal accuracy** is the same with the axes swapped (lower is better).
- A **verdict** per compared point: ``above`` (the interval lies above zero: the method is better there),
  ``below``, ``noise`` (the interval holds zero) or ``undefined`` (outside the method's range in some seed,
  or a single seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from facemae.eval.stats import mean_ci

ACCURACY = "accuracy"
LEAK = "identity_leak@1"


@dataclass(frozen=True)
class Frontier:
    """A piecewise-linear frontier: ``leak`` strictly increasing, ``accuracy`` strictly increasing with it."""

    leak: np.ndarray  # [K]
    accuracy: np.ndarray  # [K]
    members: tuple[int, ...]  # indices of the points it was built from, in leak order

    def accuracy_at(self, leak: float) -> float:
        """Accuracy along the frontier at ``leak``; NaN outside ``[leak[0], leak[-1]]`` (not extrapolated)."""
        return _along(self.leak, self.accuracy, leak)

    def leak_at(self, accuracy: float) -> float:
        """Leak along the frontier at ``accuracy`` (the frontier is monotone, so invertible); NaN outside."""
        return _along(self.accuracy, self.leak, accuracy)


def _along(x: np.ndarray, y: np.ndarray, at: float) -> float:
    if not math.isfinite(at) or at < x[0] or at > x[-1]:
        return math.nan
    return float(np.interp(at, x, y))


def pareto_frontier(leak: Sequence[float], accuracy: Sequence[float]) -> Frontier:
    """The upper-left (Pareto) frontier of points ``(leak[i], accuracy[i])``.

    A point is on it when no other point has leak <= and accuracy >= with one of them strict. Of exact
    duplicates the first index is kept, so the frontier's leaks and accuracies are strictly increasing.

    Raises:
        ValueError: No points, lengths differ, or a value is not finite.
    """
    leak, accuracy = np.asarray(leak, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    if leak.shape != accuracy.shape or leak.ndim != 1 or len(leak) == 0:
        raise ValueError(f"a frontier needs equally long non-empty lists, got {leak.shape} and {accuracy.shape}")
    if not (np.isfinite(leak).all() and np.isfinite(accuracy).all()):
        raise ValueError("a frontier's leaks and accuracies must be finite; a NaN point is an unfinished score")
    # Leak ascending; at equal leak, highest accuracy first; then by index (the first of duplicates wins).
    order = np.lexsort((np.arange(len(leak)), -accuracy, leak))
    members, best = [], -math.inf
    for i in order:
        if accuracy[i] > best:  # strictly better than everything at lower or equal leak
            members.append(int(i))
            best = accuracy[i]
    idx = np.array(members)
    return Frontier(leak=leak[idx], accuracy=accuracy[idx], members=tuple(members))


def seed_means(points: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """``(leak, accuracy)`` seed means of points in ``frontier.json``'s schema (per-seed lists)."""
    return (np.array([np.mean(p[LEAK]) for p in points]), np.array([np.mean(p[ACCURACY]) for p in points]))


def _seed_value(point: dict[str, Any], key: str, seed: int) -> float:
    seeds = list(point["seeds"])
    return float(point[key][seeds.index(seed)]) if seed in seeds else math.nan


def _seed_frontier(points: Sequence[dict[str, Any]], seed: int) -> Frontier | None:
    """The frontier of the points that have ``seed``, from that seed's values alone."""
    have = [p for p in points if seed in p["seeds"]]
    if not have:
        return None
    return pareto_frontier([_seed_value(p, LEAK, seed) for p in have], [_seed_value(p, ACCURACY, seed) for p in have])


def compare(method: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The method against the baseline at each point of the baseline's frontier (seed means), paired by seed.

    Args:
        method: The method's points (``seeds``, ``accuracy``, ``identity_leak@1`` lists, any other keys kept).
        baseline: The baseline's points.

    Returns:
        One row per baseline frontier point, in leak order: the point's ``leak`` and ``accuracy`` (seed
        means), ``accuracy_gain`` (method minus baseline at the baseline's leak) and ``leak_gain`` (baseline
        minus method at the baseline's accuracy: positive = the method leaks less), each ``{mean, ci95_low,
        ci95_high, n, per_seed}``, and a ``verdict`` for each.
    """
    leak, accuracy = seed_means(baseline)
    rows = []
    for i in pareto_frontier(leak, accuracy).members:
        point = baseline[i]
        gains: dict[str, list[float]] = {"accuracy_gain": [], "leak_gain": []}
        for seed in point["seeds"]:
            front = _seed_frontier(method, seed)
            base_leak, base_acc = _seed_value(point, LEAK, seed), _seed_value(point, ACCURACY, seed)
            gains["accuracy_gain"].append(math.nan if front is None else front.accuracy_at(base_leak) - base_acc)
            gains["leak_gain"].append(math.nan if front is None else base_leak - front.leak_at(base_acc))
        row = {"baseline_point": i, "leak": float(leak[i]), "accuracy": float(accuracy[i])}
        for name, values in gains.items():
            row[name] = _paired(values)
            row[f"{name}_verdict"] = verdict(row[name])
        rows.append(row)
    return rows


def _paired(values: list[float]) -> dict[str, Any]:
    """Mean and 95% t interval of per-seed differences; NaN throughout when any seed's is undefined."""
    if not values or any(math.isnan(v) for v in values):
        return {"mean": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "n": len(values), "per_seed": values}
    interval = mean_ci(values)
    return {**interval.to_dict(), "per_seed": values}


def verdict(interval: dict[str, Any]) -> str:
    """``above`` / ``below`` zero, ``noise`` (the interval holds zero) or ``undefined``."""
    low, high = interval["ci95_low"], interval["ci95_high"]
    if math.isnan(low) or math.isnan(high):
        return "undefined"
    if low > 0:
        return "above"
    if high < 0:
        return "below"
    return "noise"
