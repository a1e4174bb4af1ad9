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

:func:`summarise`, :func:`markdown` and :func:`plot` make ``frontier.json``, ``frontier.md`` and ``frontier.png``
from points in the frontier issue's schema (per-seed lists).
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
    """Mean and 95% t interval of per-seed differences; None (JSON null) where undefined: everywhere when a
    seed's difference is, the interval alone for a single seed."""
    per_seed = [None if math.isnan(v) else v for v in values]
    if not values or None in per_seed:
        return {"mean": None, "ci95_low": None, "ci95_high": None, "n": len(values), "per_seed": per_seed}
    interval = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in mean_ci(values).to_dict().items()}
    return {**interval, "per_seed": per_seed}


def verdict(interval: dict[str, Any]) -> str:
    """``above`` / ``below`` zero, ``noise`` (the interval holds zero) or ``undefined`` (no interval)."""
    low, high = interval["ci95_low"], interval["ci95_high"]
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "undefined"
    if low > 0:
        return "above"
    if high < 0:
        return "below"
    return "noise"


POINT_METRICS = ("accuracy", "identity_leak@1", "image_leak@1", "psnr_masked", "hf_ratio")


def summarise(points: Sequence[dict[str, Any]], *, method: str = "facemae", baseline: str = "mae") -> dict[str, Any]:
    """``frontier.json``'s body: the points as given, the comparison of :func:`compare` and a one-line verdict.

    Args:
        points: ``{"method", "mask_ratio", "lambda_irm", "options", "seeds", <POINT_METRICS>: [per seed]}``.
        method: The method judged.
        baseline: What it is judged against.
    """
    of = {name: [p for p in points if p["method"] == name] for name in (method, baseline)}
    if not of[method] or not of[baseline]:
        raise ValueError(f"a frontier comparison needs points of {method!r} and of {baseline!r}; got methods "
                         f"{sorted({p['method'] for p in points})}")
    rows = compare(of[method], of[baseline])
    return {"points": list(points), "comparison": rows, "verdict": verdict_line(rows, method=method, baseline=baseline)}


def verdict_line(rows: Sequence[dict[str, Any]], *, method: str, baseline: str) -> str:
    """The comparison in words: where (at which of the baseline's frontier leaks) the method's accuracy is
    above, below, inside the noise or undefined."""
    by: dict[str, list[float]] = {}
    for row in rows:
        by.setdefault(row["accuracy_gain_verdict"], []).append(row["leak"])
    words = {"above": f"{method} is above {baseline}", "below": f"{method} is below {baseline}",
             "noise": "the difference is inside the noise", "undefined": f"undefined (outside {method}'s leak range "
                                                                          "in some seed, or a single seed)"}
    parts = [f"{words[v]} at identity_leak@1 {', '.join(f'{leak:.3f}' for leak in sorted(by[v]))}"
             for v in ("above", "below", "noise", "undefined") if v in by]
    return (f"Accuracy at equal leak, at each of {baseline}'s {len(rows)} frontier point(s): " + "; ".join(parts)
            + ".")


def markdown(result: dict[str, Any], *, meta: dict[str, Any]) -> list[str]:
    """``frontier.md``: every point (seed means and 95% intervals), the paired comparison, the verdict and
    where the numbers came from."""
    lines = ["# Privacy-utility frontiers", "", result["verdict"], "",
             "| method | mask ratio | lambda | release | seeds | " + " | ".join(POINT_METRICS) + " |",
             "|---" * (len(POINT_METRICS) + 5) + "|"]
    for p in sorted(result["points"], key=lambda p: (p["method"], p["mask_ratio"], p["lambda_irm"],
                                                     str(p.get("options")))):
        cells = [mean_ci(p[k]).format(3) if p.get(k) and all(map(math.isfinite, p[k])) else "-" for k in POINT_METRICS]
        lines.append(f"| {p['method']} | {p['mask_ratio']} | {p['lambda_irm']} | {_release_cell(p)} | "
                     f"{len(p['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "At each baseline frontier point: the method's accuracy at the same leak and its leak at the same "
              "accuracy, paired by seed (mean [95% t interval]; + = the method is better).", "",
              "| baseline leak | baseline accuracy | accuracy gain | verdict | leak gain | verdict |", "|---" * 6 + "|"]
    for r in result["comparison"]:
        gain = [_interval_cell(r[k]) for k in ("accuracy_gain", "leak_gain")]
        lines.append(f"| {r['leak']:.3f} | {r['accuracy']:.3f} | {gain[0]} | {r['accuracy_gain_verdict']} | "
                     f"{gain[1]} | {r['leak_gain_verdict']} |")
    return lines + [""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]


def _release_cell(point: dict[str, Any]) -> str:
    """How a point's faces were released: the owner's visible patches pasted back, or the decoder's output
    everywhere (``loss.paste_visible``); ``-`` where there is no generator."""
    paste = (point.get("options") or {}).get("paste_visible")
    return "-" if paste is None else "pasted" if paste else "decoder"


def _interval_cell(interval: dict[str, Any]) -> str:
    if interval["mean"] is None:
        return "undefined"
    if interval["ci95_low"] is None:
        return f"{interval['mean']:+.4f} (n={interval['n']})"
    return f"{interval['mean']:+.4f} [{interval['ci95_low']:+.4f}, {interval['ci95_high']:+.4f}]"


def plot(points: Sequence[dict[str, Any]], path: str, *, ceiling: tuple[float, float] | None = None) -> None:
    """Accuracy against identity_leak@1: every point at its seed mean with 95% interval crosses, each method's
    frontier as a line, the masked release as the floor and the originals (``ceiling``, leak and accuracy)
    as the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in dict.fromkeys(p["method"] for p in points):
        mine = [p for p in points if p["method"] == name]
        leak, acc = seed_means(mine)
        half = [[_half(p[k]) for p in mine] for k in (LEAK, ACCURACY)]
        bars = ax.errorbar(leak, acc, xerr=half[0], yerr=half[1], fmt="o", capsize=2, label=name, linestyle="none",
                           alpha=0.8)
        front = pareto_frontier(leak, acc)
        style = ":" if name == "masked" else "-"
        ax.plot(front.leak, front.accuracy, style, color=bars[0].get_color())
        for p, x, y in zip(mine, leak, acc):
            ax.annotate(f"{p['mask_ratio']}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if ceiling:
        ax.scatter([ceiling[0]], [ceiling[1]], marker="*", s=120, color="black", label="originals")
    ax.set(xlabel="identity_leak@1 (lower is more private)", ylabel="verification accuracy",
           title="privacy-utility frontiers (labels: mask ratio)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _half(values: Sequence[float]) -> float:
    """Half-width of the 95% t interval of a point's seeds; 0 for a single seed (no cross drawn)."""
    interval = mean_ci(values)
    return 0.0 if math.isnan(interval.half_width) else interval.half_width
