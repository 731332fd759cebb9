"""The one statistics helper: mean, spread and a 95 % interval over seeds.

Single-seed convention (everywhere): the standard deviation and the interval of one value are ``None``
(shown as no spread), never 0 — one seed says nothing about the spread.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Optional

# Two-sided 95 % Student-t quantiles by degrees of freedom (n - 1); large n tends to 1.96.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t95(dof: int) -> float:
    """The two-sided 95 % Student-t quantile for ``dof >= 1`` degrees of freedom (conservative between
    tabulated values)."""
    if dof < 1:
        raise ValueError("t95 needs dof >= 1")
    known = [k for k in _T95 if k <= dof]
    return _T95[max(known)] if dof <= 120 else 1.960


@dataclass(frozen=True)
class Stat:
    """Mean over ``n`` finite values, their sample standard deviation (ddof 1) and the half-width of the
    95 % t-interval of the mean; ``std``/``ci95`` are ``None`` for fewer than two values."""

    mean: float
    std: Optional[float]
    n: int
    ci95: Optional[float] = None

    def text(self, fmt: str = "{:.4f}") -> str:
        """``mean ± std`` (or ``mean`` for one value, an en dash for none)."""
        if self.n == 0:
            return "–"
        return fmt.format(self.mean) + ("" if self.std is None else " ± " + fmt.format(self.std))


def stat(values: Iterable[Optional[float]]) -> Stat:
    """:class:`Stat` of the finite values among ``values`` (``None`` and NaN are skipped)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return Stat(math.nan, None, 0)
    if len(vals) == 1:
        return Stat(vals[0], None, 1)
    std = statistics.stdev(vals)
    return Stat(statistics.fmean(vals), std, len(vals), t95(len(vals) - 1) * std / math.sqrt(len(vals)))


@dataclass(frozen=True)
class Ratio:
    """``mean(num) / mean(den)`` of paired values with Fieller's 95 % interval (``lo``/``hi``; ``None`` where
    the interval is unbounded: the denominator's mean is not distinguishable from 0 at this sample size)."""

    value: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    n: int

    @property
    def bounded(self) -> bool:
        return self.lo is not None and self.hi is not None


def fieller_ratio(num: Iterable[float], den: Iterable[float]) -> Ratio:
    """The ratio of the means of paired samples ``num[i]``, ``den[i]`` and its 95 % Fieller interval.

    Fieller (1954): the set of theta with ``(mean_n - theta mean_d)^2 <= t^2 var(mean_n - theta mean_d)`` is a
    bounded interval exactly when the denominator's mean is significantly non-zero (``mean_d^2 > t^2
    var(mean_d)``); otherwise it is unbounded and ``lo``/``hi`` are ``None``. Uses the paired covariance, so
    an effect that moves both (a seed that helps every method) does not widen the interval. With fewer than two
    pairs there is no interval; with a zero denominator mean there is no ratio.
    """
    pairs = [(float(a), float(b)) for a, b in zip(num, den) if math.isfinite(a) and math.isfinite(b)]
    n = len(pairs)
    if n == 0:
        return Ratio(None, None, None, 0)
    mn = statistics.fmean(a for a, _ in pairs)
    md = statistics.fmean(b for _, b in pairs)
    value = mn / md if md else None
    if n < 2:
        return Ratio(value, None, None, n)
    vnn = statistics.variance([a for a, _ in pairs]) / n
    vdd = statistics.variance([b for _, b in pairs]) / n
    vnd = sum((a - mn) * (b - md) for a, b in pairs) / (n - 1) / n
    t2 = t95(n - 1) ** 2
    qa = md * md - t2 * vdd
    qb = -2 * (mn * md - t2 * vnd)
    qc = mn * mn - t2 * vnn
    disc = qb * qb - 4 * qa * qc
    if qa <= 0 or disc < 0:
        return Ratio(value, None, None, n)
    root = math.sqrt(disc)
    return Ratio(value, (-qb - root) / (2 * qa), (-qb + root) / (2 * qa), n)
