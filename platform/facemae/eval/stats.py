"""Means and 95% confidence intervals over seeds, and paired differences between methods.

A comparison of methods over a few seeds is only as good as its interval: with 3 seeds the
Student-t factor is 4.30, not 1.96. Paired differences (method A minus method B on the same seed,
which shares the data split, the masks, the teacher and the judge) remove what the seeds share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}``, the two-sided 95% quantile of Student's t with ``df`` degrees of freedom.

    Raises:
        ValueError: when ``df`` < 1 (an interval needs at least 2 values).
    """
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df={df}")
    # Imported here: scipy.stats takes about a second to import, and only the reports need it.
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.975, df))


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and the half-width of its 95% t interval (NaN when ``n`` < 2)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (NaN intervals never do)."""
        return bool(self.low > 0 or self.high < 0)

    def format(self, digits: int = 4) -> str:
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci95_low": self.low, "ci95_high": self.high, "n": self.n}


def mean_ci(values: Sequence[float]) -> Interval:
    """Mean and 95% interval ``t_{0.975, n-1} * s / sqrt(n)``, ``s`` the sample std (ddof 1)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"mean_ci needs a non-empty list of numbers, got {values!r}")
    if len(x) == 1:
        return Interval(float(x[0]), float("nan"), 1)
    half = t_quantile_975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(float(x.mean()), half, len(x))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Interval:
    """Mean and 95% interval of ``a[i] - b[i]`` (the same seed i for both methods)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need one per seed on both sides, got {len(a)} and {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b)])
