"""The one statistics helper: mean, spread and a 95 % interval over seeds.

Single-seed convention (everywhere): the standard deviation and the interval of one value are ``None``
(shown as no spread), never 0 — one seed says nothing about the spread.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

# Two-sided 95 % Student-t quantiles by degrees of freedom (n - 1); large n tends to 1.96.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t95(dof: int) -> float:
    """The two-sided 95 % Student-t quantile for ``dof >= 1`` degrees of freedom (:func:`t_quantile`'s;
    conservative between tabulated values)."""
    return t_quantile(dof)


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


def fieller_ratio(num: Iterable[float], den: Iterable[float], level: float = 0.95) -> Ratio:
    """The ratio of the means of paired samples ``num[i]``, ``den[i]`` and its Fieller interval at ``level``
    (two-sided; 95 % by default).

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
    t2 = t_quantile(n - 1, level) ** 2
    qa = md * md - t2 * vdd
    qb = -2 * (mn * md - t2 * vnd)
    qc = mn * mn - t2 * vnn
    disc = qb * qb - 4 * qa * qc
    if qa <= 0 or disc < 0:
        return Ratio(value, None, None, n)
    root = math.sqrt(disc)
    return Ratio(value, (-qb - root) / (2 * qa), (-qb + root) / (2 * qa), n)


# ------------------------------------------------------------------------- intervals with test-set noise

# Two-sided 90 % Student-t quantiles (one-sided 95 %: the two one-sided tests of an equivalence test, TOST).
_T90 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        12: 1.782, 15: 1.753, 20: 1.725, 25: 1.708, 30: 1.697, 40: 1.684, 60: 1.671, 120: 1.658}


def t_quantile(dof: float, level: float = 0.95) -> float:
    """The two-sided ``level`` Student-t quantile at ``dof`` degrees of freedom (a float, e.g. Satterthwaite's;
    ``inf`` gives the normal's). 95 % and 90 % from the tables above (between tabulated values the smaller
    dof's: conservative, and the numbers every committed verdict used); any other level in (0, 1), e.g. a
    Bonferroni-adjusted 1 - 0.05/k, from scipy's exact quantile at the same conservative dof."""
    if dof < 1:
        raise ValueError("t_quantile needs dof >= 1")
    if not 0 < level < 1:
        raise ValueError(f"t_quantile needs 0 < level < 1, got {level}")
    tables = {0.95: (_T95, 1.960), 0.90: (_T90, 1.645)}  # the same dof keys
    conservative = None if dof > 120 else max(k for k in _T95 if k <= dof)
    if level in tables:
        table, normal = tables[level]
        return normal if conservative is None else table[conservative]
    from scipy.stats import norm, t

    q = 1 - (1 - level) / 2
    return float(norm.ppf(q)) if conservative is None else float(t.ppf(q, conservative))


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` in [0, 1] measured on ``n`` examples: ``sqrt(p (1 - p) / n)``."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def paired_binomial_se(p_a: float, p_b: float, n: int, discordant: Optional[float] = None) -> float:
    """Standard error of ``p_b - p_a``, two accuracies on the same ``n`` examples.

    With ``discordant`` (the share of examples exactly one model gets right, McNemar's b + c over n) the paired
    variance ``(discordant - (p_b - p_a)^2) / n``. Without it (results that keep no per-example outcomes) the
    variance of two independent binomials, ``p_a (1 - p_a) / n + p_b (1 - p_b) / n``: an upper bound whenever the
    two models' errors are positively correlated, as two models trained on the same data are."""
    if discordant is not None:
        return math.sqrt(max(discordant - (p_b - p_a) ** 2, 0.0) / n)
    return math.sqrt(binomial_se(p_a, n) ** 2 + binomial_se(p_b, n) ** 2)


@dataclass(frozen=True)
class Interval:
    """A mean effect over seeds with its interval (``lo``/``hi``: 95 % unless :func:`effect_interval` was asked
    for another level), its 90 % interval (``lo90``/``hi90``, the equivalence test's), the standard error and
    degrees of freedom behind them, and ``per_seed_var``, the variance of one seed's effect (seed-to-seed and
    test-set noise), the basis of the power note."""

    mean: float
    lo: float
    hi: float
    lo90: float
    hi90: float
    se: float
    dof: float
    per_seed_var: float
    shared_var: float = 0.0  # test-set variance that more seeds do not reduce (every seed saw the same examples)


def effect_interval(values: Sequence[float], test_se: Optional[Sequence[float]] = None,
                    shared_examples: bool = False, level: float = 0.95) -> Optional[Interval]:
    """The mean of per-seed effects ``values`` and its interval, combining seed-to-seed variation with the
    test-set noise of each seed's effect (``test_se[i]``, its standard error; ``None``: not known, seed-to-seed
    only). ``None`` with fewer than two values.

    - Each seed evaluated on its own examples (``shared_examples=False``): the spread of the effects over seeds
      already holds the test-set noise, but a few seeds can show less of it than there is (100 examples move an
      accuracy in 1-point steps: identical effects on every seed). The variance of one seed's effect is taken as
      ``max(s^2, mean(test_se^2))``: never below its known test-set part. Degrees of freedom by Satterthwaite:
      ``k - 1`` where the spread decides, growing to the normal's where the known part does; never narrower
      than the seed-to-seed t-interval alone.
    - Every seed evaluated on the same examples: their test-set noise is shared and does not average out over
      seeds; ``s^2 / k + mean(test_se^2)`` (the shared part taken as fully correlated: conservative).

    ``lo``/``hi`` are the two-sided ``level`` interval (95 % by default; e.g. 1 - 0.05/k for k looks at data
    that grew between them); ``lo90``/``hi90`` are always 90 %. A zero-width interval needs zero test-set noise
    (exact quantities such as pass counts)."""
    vals = [float(v) for v in values]
    k = len(vals)
    if k < 2:
        return None
    mean, s2 = statistics.fmean(vals), statistics.variance(vals)
    m = statistics.fmean(se * se for se in test_se) if test_se else 0.0
    if shared_examples:
        var_mean, per_seed, shared = s2 / k + m, s2, m
        dof = math.inf if s2 == 0 else var_mean ** 2 / ((s2 / k) ** 2 / (k - 1))
    else:
        per_seed, shared = max(s2, m), 0.0
        var_mean = per_seed / k
        dof = math.inf if s2 == 0 else (k - 1) * (per_seed / s2) ** 2
    se = math.sqrt(var_mean)
    # never narrower than the seed-to-seed t-interval alone: a known extra source of noise must not shrink it
    seed_se = math.sqrt(s2 / k)
    h = max(t_quantile(dof, level) * se, t_quantile(k - 1, level) * seed_se)
    h90 = max(t_quantile(dof, 0.90) * se, t_quantile(k - 1, 0.90) * seed_se)
    return Interval(mean, mean - h, mean + h, mean - h90, mean + h90, se, dof, per_seed, shared)


def seeds_to_resolve(interval: Interval, bound: float, level: float = 0.95, max_seeds: int = 1000) -> Optional[int]:
    """The fewest seeds whose interval (``level``, two-sided) would exclude ``bound`` if the mean effect and the
    per-seed variance stayed as observed; ``None`` where no number up to ``max_seeds`` would (the mean sits on
    the bound, or shared test-set noise alone is wider than the distance)."""
    gap = abs(interval.mean - bound)
    for k in range(2, max_seeds + 1):
        half = t_quantile(k - 1, level) * math.sqrt(interval.per_seed_var / k + interval.shared_var)
        if half < gap:
            return k
    return None
