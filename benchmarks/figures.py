"""What every performance figure shares: the median timer and the table row (``run_all.py``'s JSON)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_seconds(fn: Callable[[], Any], *, repeats: int, inner: int = 1, warmup: int = 2) -> float:
    """Median over ``repeats`` of the mean seconds of ``inner`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def seconds_in_turns(fns: dict[str, Callable[[], Any]], *, repeats: int, inner: int = 1,
                     warmup: int = 2) -> dict[str, list[float]]:
    """Per name, the mean seconds of ``inner`` calls in each of ``repeats`` rounds that call every
    function in turn: a drift of the machine's speed hits all of them alike, so ratios of the same
    round hold where ratios of medians timed minutes apart do not."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def figure(value: float | None, baseline: float | None, *, goal: str, unit: str, how: str,
           ratio: float | None = None) -> dict[str, Any]:
    """One row of the table; ``ratio`` defaults to value / baseline and ``met`` is read off ``goal``."""
    if ratio is None and value is not None and baseline:
        ratio = value / baseline
    op, target = goal.split()
    met = ratio is not None and {">=": ratio >= float(target), "<=": ratio <= float(target),
                                 "<": ratio < float(target)}[op]
    return {"value": value, "baseline": baseline, "ratio": ratio, "goal": goal, "met": met, "unit": unit, "how": how}
