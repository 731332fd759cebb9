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
