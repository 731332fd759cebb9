"""What each efficient SAM variant keeps of SAM's robustness gain, and at what cost (issue 12's frontier).

Reads the settings and the robust endpoint that :func:`samat.analysis.verdicts.decide` fixed, so the numbers use
the same pairing by seed, the same pre-specified SAM rho / AT eps and the same endpoint as the verdicts:

- **cost**: forward-backward passes per optimizer step as a multiple of ERM's, counted in examples (exact
  counts, paired by seed, :func:`samat.analysis.verdicts.example_passes_per_step`: ESAM's passes at ``w + e``
  see part of the batch; AE-SAM's cost varies with the run, the others' do not). Step *time* ratios are in
  ``bench/`` (wall time in a grid of separate processes on a shared machine is not a fair comparison);
- **gain**: the robust endpoint minus ERM's, paired by seed, with its 95 % t-interval;
- **share of SAM's gain kept**: mean gain of the variant over the mean gain of SAM at the pre-specified rho,
  per seed paired, with Fieller's 95 % interval (:func:`samat.common.stats.fieller_ratio`) -- computed only
  when SAM's own gain is significantly above 0 (its 95 % interval, with test-set noise, lies above 0): a share
  of a gain that may be 0 or negative is a ratio of noise, or of two negatives (a variant as bad as SAM would
  "keep 100 %"), and the notes say why no share is given;
- **clean vs SAM**: the variant's clean metric minus SAM's, paired.

The goal of issue 12 is a variant at <= 1.4x ERM's cost that keeps >= 80 % of SAM's gain and SAM's clean
accuracy (within the verdicts' 1-point margin). ``meets goal`` is "shown" when the intervals say so (share's
lower bound >= 0.8, clean change's lower bound >= -1 point), "point estimate only" when only the means do;
where a mean misses it, "ruled out (...)" names each criterion whose interval lies wholly on the wrong side, and
"no, not ruled out" says none does yet (more seeds could still decide).

Looks: a user who adds seeds until the frontier decides looks at it several times, and each look is another
chance for a 95 % interval to miss by luck. ``looks=k`` (the looks so far, this one included) decides ``meets
goal`` on two-sided ``1 - 0.05/k`` intervals instead (Bonferroni over the looks: the chance that any look
decides wrongly stays under 5 %, whenever the user stops), shown in their own columns beside the 95 % ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from samat.common.stats import Ratio, Stat, fieller_ratio
from samat.common.tables import format_table

from .runs import Setting
from samat.common.registry import METHODS, UPDATE_RULES

from .verdicts import (MARGIN, Effect, Verdicts, by_seed, clean_se, endpoint_se, example_passes_per_step, exact,
                       find_setting, format_pct, paired)

# The efficient SAM update rules of the engine's registry on the clean objective (samat.common.efficient_sam,
# samat.common.saf), in the registry's order.
EFFICIENT = tuple(m.name for m in METHODS.values() if UPDATE_RULES[m.update].efficient and m.objective == "clean")
GOAL_COST, GOAL_SHARE = 1.4, 0.8
ALPHA = 0.05  # two-sided error of one look's intervals


def decision_level(looks: int) -> float:
    """The two-sided interval level that decides ``meets goal`` after ``looks`` (>= 1) looks: ``1 - 0.05/looks``
    (0.95 for one look)."""
    if looks < 1:
        raise ValueError(f"looks must be >= 1, got {looks}")
    return 1 - ALPHA / looks


@dataclass
class Row:
    """One setting of the frontier: ERM, SAM, AT or an efficient variant."""

    name: str
    method: str
    role: str  # "reference" (ERM, SAM, AT) or "variant"
    cost: Effect  # passes per step / ERM's, paired
    clean: Stat
    robust: Stat
    gain: Optional[Effect]  # robust endpoint - ERM's, paired (None for ERM itself)
    share: Optional[Ratio]  # of SAM's gain (None for ERM and SAM)
    clean_vs_sam: Optional[Effect]
    goal: str = "–"
    # the same three at the look-adjusted level (None with one look: the 95 % ones above decide)
    share_adjusted: Optional[Ratio] = None
    clean_vs_sam_adjusted: Optional[Effect] = None
    cost_adjusted: Optional[Effect] = None


@dataclass
class Frontier:
    endpoint: str
    sam: Optional[str]
    rows: list[Row]
    notes: list[str]
    looks: int = 1

    @property
    def level(self) -> float:
        """The level of the intervals that decide ``meets goal``."""
        return decision_level(self.looks)

    @property
    def variants(self) -> list[Row]:
        return [r for r in self.rows if r.role == "variant"]


def _share(erm: Setting, sam: Setting, s: Setting, get, level: float = 0.95) -> Ratio:
    e, m, v = by_seed(erm, get), by_seed(sam, get), by_seed(s, get)
    seeds = sorted(set(e) & set(m) & set(v))
    return fieller_ratio([v[k] - e[k] for k in seeds], [m[k] - e[k] for k in seeds], level)


def _goal(share: Optional[Ratio], clean_vs_sam: Optional[Effect], cost: Effect) -> str:
    """Whether a variant meets the goal, as these intervals of its row say (the 95 % ones, or the look-adjusted
    ones after several looks):

    - ``"shown"``: every interval is on the goal's side (share's lower bound >= 80 %, clean change's >= -1 point,
      cost <= 1.4x);
    - ``"point estimate only"``: the means meet it, an interval still reaches past it;
    - ``"ruled out (cost, share, clean)"``: the interval of each criterion named lies wholly on the wrong side
      (cost's lower bound > 1.4x, share's upper bound < 80 %, clean change's upper bound < -1 point);
    - ``"no, not ruled out"``: a mean misses it, but every interval still reaches it (more seeds could decide);
    - ``"–"`` where there is no share (SAM's gain not shown above 0)."""
    if share is None or share.value is None or cost.mean is None or clean_vs_sam is None \
            or clean_vs_sam.mean is None:
        return "–"
    cheap = cost.mean <= GOAL_COST + 1e-9
    if cheap and share.value >= GOAL_SHARE and clean_vs_sam.mean >= -MARGIN:
        shown = (share.bounded and share.lo >= GOAL_SHARE and clean_vs_sam.lo is not None
                 and clean_vs_sam.lo >= -MARGIN and (cost.hi is None or cost.hi <= GOAL_COST + 1e-9))
        return "shown" if shown else "point estimate only"
    # Pass counts are exact (a zero-width interval unless the count varies by seed, as AE-SAM's does)
    cost_lo = cost.mean if cost.lo is None else cost.lo
    out = [name for name, excluded in (
        ("cost", cost_lo > GOAL_COST + 1e-9),
        ("share", share.bounded and share.hi < GOAL_SHARE),
        ("clean", clean_vs_sam.hi is not None and clean_vs_sam.hi < -MARGIN)) if excluded]
    return f"ruled out ({', '.join(out)})" if out else "no, not ruled out"


def frontier(v: Verdicts, looks: int = 1) -> Optional[Frontier]:
    """The frontier of ``v``'s grid, or ``None`` when it holds no efficient SAM variant (or no ERM, SAM at the
    pre-specified rho or robust endpoint to measure a gain against). ``looks``: how many times the frontier has
    been looked at while its seeds grew, this time included (:func:`decision_level`)."""
    level = decision_level(looks)
    variants = [s for s in v.settings if s.method in EFFICIENT]
    if not variants:
        return None
    notes = []
    erm = find_setting(v.settings, "erm")
    sam = find_setting(v.settings, "sam", rho=v.primary_rho) if v.primary_rho is not None else None
    at = find_setting(v.settings, "pgd-at", eps_label=v.primary_eps) if v.primary_eps is not None else None
    ep = v.endpoint
    if erm is None or sam is None or ep is None or not ep.radii:
        missing = "ERM runs" if erm is None else ("SAM runs at the pre-specified rho" if sam is None
                                                   else "a robust endpoint")
        return Frontier("–", None, [], [f"no {missing}: no gain to measure the variants against"], looks)
    sam_gain = paired(f"robust gain ({sam.name} − {erm.name})", erm, sam, ep.mean, se=endpoint_se(ep))
    guard = sam_gain.lo is not None and sam_gain.lo > 0
    if not guard:
        why = ("has no interval (fewer than 2 paired seeds)" if sam_gain.lo is None else
               "is significantly below 0" if sam_gain.hi < 0 else "is not significantly above 0")
        notes.append(f"SAM's own robust gain over ERM ({sam_gain.text()}) {why}: no share of it is given (a share "
                     "of a gain that may be 0 or negative means nothing; a ratio of two negatives would read as "
                     "a gain kept)")
    rows = []
    for s, role in [(erm, "reference"), (sam, "reference")] + ([(at, "reference")] if at else []) \
            + [(s, "variant") for s in variants]:
        cost = paired(f"passes per step ({s.name} / {erm.name})", erm, s, example_passes_per_step, kind="ratio",
                      se=exact)
        gain = None if s is erm else paired(f"robust gain ({s.name} − {erm.name})", erm, s, ep.mean,
                                            se=endpoint_se(ep))
        share = None if s in (erm, sam) or not guard else _share(erm, sam, s, ep.mean)
        vs_sam = None if s in (erm, sam) else paired(f"clean change ({s.name} − {sam.name})", sam, s,
                                                     lambda r: r.clean, se=clean_se)
        row = Row(s.name, s.method, role, cost, s.of(lambda r: r.clean), s.of(ep.mean), gain, share, vs_sam)
        if role == "variant":
            if looks > 1:
                row.cost_adjusted = paired(cost.name, erm, s, example_passes_per_step, kind="ratio", se=exact,
                                           level=level)
                row.share_adjusted = None if share is None else _share(erm, sam, s, ep.mean, level)
                row.clean_vs_sam_adjusted = paired(vs_sam.name, sam, s, lambda r: r.clean, se=clean_se, level=level)
                row.goal = _goal(row.share_adjusted, row.clean_vs_sam_adjusted, row.cost_adjusted)
            else:
                row.goal = _goal(share, vs_sam, cost)
        rows.append(row)
    n_ref = min(rows[0].robust.n, rows[1].robust.n)  # ERM's and SAM's rows: the seeds column's counts
    fewer = [f"{r.name} ({r.robust.n})" for r in rows if r.role == "variant" and r.robust.n < n_ref]
    if fewer:
        # a seed-count column alone would hide that a share uses only the seeds all three settings ran
        notes.append(f"ERM and SAM ran {n_ref} seeds, these variants fewer: {', '.join(fewer)}; each variant's "
                     "gain, share and clean change pair it with ERM and SAM on its own seeds only")
    for s in variants:
        # SAF and MESA have no rho (no ascent step): nothing to compare
        if v.primary_rho is not None and s.rho is not None and not math.isclose(s.rho, v.primary_rho):
            notes.append(f"{s.name}: rho differs from SAM's pre-specified {v.primary_rho:g}; its share compares "
                         "different radii")
    return Frontier(ep.describe(), sam.name, rows, notes, looks)


# ------------------------------------------------------------------------------------------- output


def _effect(e: Optional[Effect]) -> str:
    if e is None or e.mean is None:
        return "–"
    interval = f" [{e.lo * 100:+.1f}, {e.hi * 100:+.1f}]" if e.lo is not None else ""
    return f"{e.mean * 100:+.1f}{interval}"


def _ratio(r: Optional[Ratio]) -> str:
    if r is None or r.value is None:
        return "–"
    if r.bounded:
        return f"{r.value:.0%} [{r.lo:.0%}, {r.hi:.0%}]"
    return f"{r.value:.0%} (interval unbounded)" if r.n >= 2 else f"{r.value:.0%} (no interval)"


def _level(level: float) -> str:
    """``0.9833...`` -> ``"98.33 %"``."""
    return f"{level * 100:.2f}".rstrip("0").rstrip(".") + " %"


def table(f: Frontier, pad: bool = False) -> str:
    header = ["setting", "seeds", "passes × ERM", "clean", "robust (endpoint)", "robust gain vs ERM (pts)",
              "share of SAM's gain kept", "clean vs SAM (pts)"]
    if f.looks > 1:
        header += [f"share kept [{_level(f.level)}]", f"clean vs SAM [{_level(f.level)}]"]
    header += ["meets goal"]
    rows = []
    for r in f.rows:
        row = [r.name, str(r.robust.n), f"{r.cost.mean:.2f}" if r.cost.mean is not None else "–", format_pct(r.clean),
               format_pct(r.robust), _effect(r.gain),
               _ratio(r.share) if r.role == "variant" or r.method == "pgd-at" else "–", _effect(r.clean_vs_sam)]
        if f.looks > 1:
            row += [_ratio(r.share_adjusted), _effect(r.clean_vs_sam_adjusted)]
        rows.append(row + [r.goal])
    return format_table(header, rows, pad=pad)


def to_markdown(f: Frontier, figure: Optional[str] = None) -> str:
    out = ["## Efficient SAM: cost vs robustness gain kept", "",
           f"Robust endpoint: {f.endpoint} (as the verdicts). Clean and robust: mean ± 95 % half-width over seeds, "
           "in points. Gains and changes: paired by seed, mean [95 % interval]. Share of SAM's gain kept: ratio of "
           f"the mean paired gains over ERM (variant / {f.sam}), Fieller's 95 % interval. Goal (issue 12): ≤ "
           f"{GOAL_COST:g}× ERM's passes, ≥ {GOAL_SHARE:.0%} of SAM's gain and SAM's clean accuracy within "
           f"{MARGIN * 100:g} point."]
    if f.looks > 1:
        out[-1] += (f" These seeds were looked at {f.looks} times as they grew (this table included): `meets goal` "
                    f"is decided by two-sided {_level(f.level)} intervals (1 − 0.05/{f.looks}, Bonferroni over "
                    "the looks: under 5 % chance that any look decides wrongly), in the columns before it; the 95 % "
                    "columns hold for one look only.")
    out += [""]
    out += [table(f), ""] if f.rows else []
    out += [f"- {n}" for n in f.notes] + ([""] if f.notes else [])
    if figure:
        out += [f"![cost vs robustness gain]({figure})", ""]
    return "\n".join(out)


def to_json(f: Frontier) -> dict:
    return {"endpoint": f.endpoint, "sam": f.sam, "notes": f.notes, "looks": f.looks, "decision_level": f.level,
            "goal": {"cost": GOAL_COST, "share": GOAL_SHARE, "clean_margin": MARGIN},
            "rows": [asdict(r) for r in f.rows]}


def figure(f: Frontier) -> Optional[bytes]:
    """Passes per step × ERM on x, robust gain over ERM (points, 95 % interval) on y: a point per setting,
    with SAM's gain and 80 % of it as horizontal lines and the 1.4× budget as a vertical one."""
    if not f.rows:
        return None
    from .figures import STYLE, png_bytes, plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sam_gain = f.rows[1].gain
    # the registry's thin markers for the variants are hard to see as single points: filled ones here
    variant_markers = iter(("D", "v", "P", "X", "h", "*"))
    for r in f.rows:
        gain = 0.0 if r.gain is None else r.gain.mean
        if r.cost.mean is None or gain is None:
            continue
        colour, marker = STYLE.get(r.method, ("tab:gray", "*"))
        if r.role == "variant":
            marker = next(variant_markers, "*")
        err = None
        if r.gain is not None and r.gain.lo is not None:
            err = [[(r.gain.mean - r.gain.lo) * 100], [(r.gain.hi - r.gain.mean) * 100]]
        ax.errorbar([r.cost.mean], [gain * 100], yerr=err, color=colour, marker=marker, ms=9, capsize=3, ls="")
        ax.annotate(r.name, (r.cost.mean, gain * 100), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if sam_gain is not None and sam_gain.mean is not None:
        ax.axhline(sam_gain.mean * 100, color="tab:blue", lw=0.8, ls="--", label="SAM's gain")
        ax.axhline(GOAL_SHARE * sam_gain.mean * 100, color="tab:blue", lw=0.8, ls=":",
                   label=f"{GOAL_SHARE:.0%} of SAM's gain")
    ax.axhline(0, color="black", lw=0.6)
    ax.axvline(GOAL_COST, color="gray", lw=0.8, ls="-.", label=f"{GOAL_COST:g}× ERM")
    ax.set_xscale("log")
    costs = sorted({round(r.cost.mean, 2) for r in f.rows if r.cost.mean is not None})
    ax.set_xticks(costs, [f"{c:g}×" for c in costs], fontsize=7)
    ax.minorticks_off()
    ax.set(xlabel="forward-backward passes per step (× ERM, log scale)",
           ylabel="robust gain over ERM (points, 95 % interval)",
           title="Efficient SAM: cost vs robustness gain (paired by seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return png_bytes(fig)
