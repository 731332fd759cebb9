"""Verdicts on the paper's claims (a)-(c) from finished runs: paired-by-seed effects, 95 % intervals, and the
rule that turns them into "holds", "does not hold" or "inconclusive at this sample size".

Zhang et al. (ICML 2024) claim: (a) SAM raises robustness over ERM with no loss of clean accuracy; (b) AT is
more robust still but loses clean accuracy; (c) SAM costs ~2 passes per step, PGD-K AT ~K+1.

**Pairing.** Runs with the same seed see the same data order and are evaluated on the same examples
(``common/loop.py`` draws the evaluation subset from the seed), whatever the method. So every comparison is
the per-seed difference ``B(seed) - A(seed)`` over the seeds both settings have; a seed that only one side has
is dropped from that comparison, and the verdict says so. The interval is the 95 % Student-t interval of the
mean difference (:func:`samat.common.stats.stat`); with fewer than two pairs there is none, and every verdict
is "inconclusive".

**What is compared.** The robust endpoint is fixed before looking at the numbers: the headline metric under
the strongest attack the runs hold in the threat model (the suite's worst case, e.g. ``apgd-suite-linf``, where
it was run; else the lowest of the attacks of that norm), *averaged over the evaluated radii* (one number, so
no radius is picked after the fact; the per-radius numbers are in the table). SAM's and AT's radii for the
verdicts are pre-specified (``primary_rho`` / ``primary_eps``, the preset's), never chosen on the test numbers;
the other radii of the grid are listed as secondary comparisons, not used by any verdict and not corrected for
multiplicity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from samat.common.stats import Stat, stat
from samat.common.tables import format_table

from .runs import Run, Setting, eps_value, group

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive at this sample size"
MARGIN = 0.01          # non-inferiority margin for the clean metric: 1 point (metrics in [0, 1])
COST_TOLERANCE = 0.05  # relative tolerance on passes per step vs the expected multiple of ERM's
CLAIMS = {
    "a": "SAM raises robustness over ERM with no loss of clean accuracy",
    "b": "AT is more robust than SAM but loses clean accuracy (vs ERM)",
    "c": "SAM costs ~2 forward-backward passes per optimizer step, PGD-K AT ~K+1 (ERM: 1)",
}

Getter = Callable[[Run], Optional[float]]


# ------------------------------------------------------------------------------------------- endpoints


def norm_of(runs: Sequence[Run]) -> Optional[str]:
    """The threat model of the verdicts: the AT runs' training norm where there are AT runs, else ``linf``
    where the runs were attacked in L-inf, else ``l2``; ``None`` if no run holds robust numbers."""
    at_norms = [r.hyper.get("norm") for r in runs if r.method == "pgd-at" and r.hyper.get("norm")]
    candidates = ([at_norms[0]] if at_norms else []) + ["linf", "l2"]
    for norm in candidates:
        if all(_radii(r, norm) for r in runs):
            return norm
    return None


def _radii(run: Run, norm: str) -> dict[str, float]:
    """``{eps label: headline metric}`` under the strongest attack of ``norm`` per radius (the lowest value
    of the attacks ``*-<norm>``; a suite's worst case is never above its members, so it wins where run)."""
    out: dict[str, float] = {}
    for key, value in run.robust.items():
        attack, _, label = key.partition("@")
        if attack.endswith(f"-{norm}"):
            out[label] = min(value, out.get(label, math.inf))
    return out


def common_radii(runs: Sequence[Run], norm: str) -> list[str]:
    """The radii every run was attacked at in ``norm``, ascending."""
    sets = [set(_radii(r, norm)) for r in runs]
    labels = set.intersection(*sets) if sets else set()
    return sorted(labels, key=eps_value)


@dataclass(frozen=True)
class Endpoint:
    """The robust endpoint: ``norm``, its ``radii`` and the attacks they come from."""

    norm: str
    radii: tuple[str, ...]
    attacks: tuple[str, ...]

    def at(self, label: str) -> Getter:
        return lambda r: _radii(r, self.norm).get(label)

    def mean(self, run: Run) -> Optional[float]:
        """The headline metric under attack, averaged over :attr:`radii` (``None`` if the run lacks one)."""
        values = [_radii(run, self.norm).get(label) for label in self.radii]
        return None if not values or any(v is None for v in values) else sum(values) / len(values)

    def describe(self) -> str:
        return (f"mean over L-{self.norm.removeprefix('l')} radii {', '.join(self.radii)} of the strongest attack "
                f"per radius ({', '.join(self.attacks)})")


def endpoint(runs: Sequence[Run]) -> Optional[Endpoint]:
    norm = norm_of(runs)
    if norm is None:
        return None
    attacks = sorted({k.partition("@")[0] for r in runs for k in r.robust if k.partition("@")[0].endswith(f"-{norm}")})
    return Endpoint(norm, tuple(common_radii(runs, norm)), tuple(attacks))


def passes_per_step(run: Run) -> Optional[float]:
    """Forward-backward passes per optimizer step, the paper's unit (ERM 1, SAM 2, PGD-K AT K+1): the mean of
    the exact forward and backward counts (``common/cost.py``) over the steps; ``None`` without them."""
    steps = run.cost.get("optimizer_steps")
    fwd, bwd = run.cost.get("forward_passes"), run.cost.get("backward_passes")
    if not steps or fwd is None or bwd is None:
        return None
    return (fwd + bwd) / (2 * steps)


# ------------------------------------------------------------------------------------------- pairing


@dataclass
class Effect:
    """``B - A`` (or ``B / A``) paired by seed: the per-seed values, their mean and its 95 % interval."""

    name: str
    a: str
    b: str
    kind: str  # "difference" or "ratio"
    seeds: list[int]
    values: list[float]
    mean: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    dropped: list[str] = field(default_factory=list)  # "seed 2 (only in sam rho=0.1)"

    @property
    def n(self) -> int:
        return len(self.values)

    def text(self, scale: float = 100.0, unit: str = " pts") -> str:
        """``+2.1 pts [0.4, 3.8] (3 seeds)``; no interval with fewer than two pairs."""
        if self.mean is None:
            return "no paired seeds"
        fmt = (lambda v: f"{v * scale:+.2f}") if self.kind == "difference" else (lambda v: f"{v:.3f}")
        head = fmt(self.mean) + (unit if self.kind == "difference" else "×")
        interval = f" [{fmt(self.lo)}, {fmt(self.hi)}]" if self.lo is not None else " (no interval)"
        return f"{head}{interval} ({self.n} seed{'s' if self.n != 1 else ''})"


def by_seed(s: Setting, get: Getter) -> dict[int, float]:
    """``{seed: get(run)}`` over the setting's runs with a seed and a finite value (the first run of a seed)."""
    out: dict[int, float] = {}
    for r in s.runs:
        v = get(r)
        if r.seed is not None and v is not None and math.isfinite(v):
            out.setdefault(r.seed, v)
    return out


def paired(name: str, a: Setting, b: Setting, get: Getter, kind: str = "difference") -> Effect:
    """The per-seed ``get(B) - get(A)`` (``kind="ratio"``: ``get(B) / get(A)``) over the seeds both settings
    have a value for; the others are dropped and listed."""
    va, vb = by_seed(a, get), by_seed(b, get)
    seeds = sorted(set(va) & set(vb))
    dropped = [f"seed {s} (only in {b.name if s in vb else a.name})" for s in sorted(set(va) ^ set(vb))]
    if kind == "ratio":
        values = [vb[s] / va[s] for s in seeds if va[s]]
    else:
        values = [vb[s] - va[s] for s in seeds]
    st: Stat = stat(values)
    mean = st.mean if st.n else None
    lo = hi = None
    if st.ci95 is not None:  # identical values (exact pass counts) give a zero-width interval
        lo, hi = st.mean - st.ci95, st.mean + st.ci95
    return Effect(name, a.name, b.name, kind, seeds, values, mean, lo, hi, dropped)


# ------------------------------------------------------------------------------------------- verdicts


@dataclass
class Verdict:
    claim: str
    statement: str
    verdict: str
    rule: str
    effects: list[Effect]
    secondary: list[Effect] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def find_setting(settings: Sequence[Setting], method: str, rho: Optional[float] = None,
                 eps_label: Optional[str] = None) -> Optional[Setting]:
    """The first plain (no variant) setting of ``method``, at SAM radius ``rho`` and training radius
    ``eps_label`` when given (compared with ``math.isclose``); ``None`` when there is none."""
    for s in settings:
        if s.method != method or s.variant:
            continue
        if rho is not None and (s.rho is None or not math.isclose(s.rho, rho)):
            continue
        if eps_label is not None and (s.eps is None or not math.isclose(s.eps, eps_value(eps_label))):
            continue
        return s
    return None


def _lower_median(values: list) -> object:
    return sorted(values)[(len(values) - 1) // 2]


def _too_few(effects: Sequence[Effect]) -> bool:
    return any(e.n < 2 or e.lo is None for e in effects)


def _dropped_notes(effects: Sequence[Effect]) -> list[str]:
    return [f"{e.name}: dropped {', '.join(e.dropped)} (no partner to pair with)" for e in effects if e.dropped]


def claim_a(erm: Optional[Setting], sam: Optional[Setting], sams: Sequence[Setting], ep: Endpoint,
            margin: float = MARGIN) -> Verdict:
    m = margin * 100
    rule = (f"Paired by seed, SAM at the pre-specified rho minus ERM. HOLDS if the 95 % interval of the robust "
            f"gain ({ep.describe()}) lies above 0 AND the interval of the clean change lies above −{m:g} point "
            f"(non-inferiority margin). DOES NOT HOLD if the robust gain's interval lies below 0 OR the clean "
            f"change's interval lies entirely below −{m:g} point. Otherwise inconclusive; always inconclusive "
            f"with fewer than 2 paired seeds (no interval).")
    if erm is None or sam is None:
        missing = "ERM" if erm is None else "SAM at the pre-specified rho"
        return Verdict("a", CLAIMS["a"], INCONCLUSIVE, rule, [], notes=[f"no finished {missing} runs"])
    robust = paired(f"robust gain ({sam.name} − {erm.name})", erm, sam, ep.mean)
    clean = paired(f"clean change ({sam.name} − {erm.name})", erm, sam, lambda r: r.clean)
    effects = [robust, clean]
    if _too_few(effects):
        verdict = INCONCLUSIVE
    elif robust.hi < 0 or clean.hi < -margin:
        verdict = FAILS
    elif robust.lo > 0 and clean.lo > -margin:
        verdict = HOLDS
    else:
        verdict = INCONCLUSIVE
    secondary = [e for s in sams if s is not sam
                 for e in (paired(f"robust gain ({s.name} − {erm.name})", erm, s, ep.mean),
                           paired(f"clean change ({s.name} − {erm.name})", erm, s, lambda r: r.clean))]
    return Verdict("a", CLAIMS["a"], verdict, rule, effects, secondary, _dropped_notes(effects))


def claim_b(erm: Optional[Setting], sam: Optional[Setting], at: Optional[Setting], ats: Sequence[Setting],
            ep: Endpoint) -> Verdict:
    rule = (f"Paired by seed, PGD-AT at the pre-specified eps. HOLDS if the 95 % interval of AT's robust gain over "
            f"SAM at the pre-specified rho ({ep.describe()}) lies above 0 AND the interval of AT's clean change vs "
            f"ERM lies below 0 (a loss). DOES NOT HOLD if the robust gain's interval lies below 0 OR the clean "
            f"change's interval lies above 0. Otherwise inconclusive; always inconclusive with fewer than 2 "
            f"paired seeds.")
    missing = [n for n, s in (("ERM", erm), ("SAM at the pre-specified rho", sam),
                              ("PGD-AT at the pre-specified eps", at)) if s is None]
    if missing:
        return Verdict("b", CLAIMS["b"], INCONCLUSIVE, rule, [], notes=[f"no finished {', '.join(missing)} runs"])
    robust = paired(f"robust gain ({at.name} − {sam.name})", sam, at, ep.mean)
    clean = paired(f"clean change ({at.name} − {erm.name})", erm, at, lambda r: r.clean)
    effects = [robust, clean]
    if _too_few(effects):
        verdict = INCONCLUSIVE
    elif robust.hi < 0 or clean.lo > 0:
        verdict = FAILS
    elif robust.lo > 0 and clean.hi < 0:
        verdict = HOLDS
    else:
        verdict = INCONCLUSIVE
    secondary = [e for s in ats if s is not at
                 for e in (paired(f"robust gain ({s.name} − {sam.name})", sam, s, ep.mean),
                           paired(f"clean change ({s.name} − {erm.name})", erm, s, lambda r: r.clean))]
    return Verdict("b", CLAIMS["b"], verdict, rule, effects, secondary, _dropped_notes(effects))


def expected_cost(setting: Setting) -> Optional[float]:
    """Forward+backward passes per step as a multiple of ERM's: SAM/ASAM 2, PGD-K AT K+1; ``None`` for
    methods the claim says nothing about."""
    if setting.method in ("sam", "asam"):
        return 2.0
    if setting.method == "pgd-at":
        steps = {r.hyper.get("steps") for r in setting.runs}
        if len(steps) == 1 and isinstance(next(iter(steps)), int):
            return float(next(iter(steps)) + 1)
    return None


def claim_c(erm: Optional[Setting], settings: Sequence[Setting], tolerance: float = COST_TOLERANCE) -> Verdict:
    rule = (f"Forward-backward passes per optimizer step (exact counts), as a ratio to ERM's, paired by seed, for "
            f"every SAM and PGD-AT setting. HOLDS if every seed's ratio is within ±{tolerance:.0%} of the expected "
            f"multiple (SAM 2, PGD-K AT K+1, K from the run's resolved method). DOES NOT HOLD if any is outside. "
            f"Inconclusive without ERM or pass counts, or with fewer than 2 paired seeds (the counts must be seen "
            f"not to vary with the seed).")
    checked = [s for s in settings if expected_cost(s) is not None]
    if erm is None or not checked:
        return Verdict("c", CLAIMS["c"], INCONCLUSIVE, rule, [],
                       notes=["no finished ERM runs" if erm is None else "no SAM or PGD-AT runs"])
    effects, notes, outside = [], [], False
    for s in checked:
        expected = expected_cost(s)
        e = paired(f"passes per step ({s.name} / {erm.name}); expected {expected:g}", erm, s, passes_per_step,
                   kind="ratio")
        effects.append(e)
        bad = [v for v in e.values if abs(v / expected - 1) > tolerance]
        if bad:
            outside = True
            notes.append(f"{s.name}: ratio {', '.join(f'{v:.3f}' for v in bad)} outside {expected:g} ± "
                         f"{tolerance:.0%}")
    if _too_few(effects):
        verdict = INCONCLUSIVE
    else:
        verdict = FAILS if outside else HOLDS
    return Verdict("c", CLAIMS["c"], verdict, rule, effects, notes=notes + _dropped_notes(effects))


@dataclass
class Verdicts:
    """Everything ``verdicts.md`` / ``verdicts.json`` hold."""

    task: str
    headline: str
    endpoint: Optional[Endpoint]
    primary_rho: Optional[float]
    primary_eps: Optional[str]
    settings: list[Setting]
    claims: list[Verdict]
    notes: list[str]


def decide(runs: Sequence[Run], primary_rho: Optional[float] = None, primary_eps: Optional[str] = None,
           margin: float = MARGIN, tolerance: float = COST_TOLERANCE) -> Verdicts:
    """Group ``runs`` into settings and decide claims (a)-(c). ``primary_rho``/``primary_eps``: the SAM and
    AT radii the verdicts use (pre-specified); ``None`` takes the lower median of the radii present (a rule on
    the grid, not on the results)."""
    settings = group(runs)
    # a collapsed model is "robust" at its one class: its numbers enter the verdicts, and the reader is told
    notes = [f"{r.path.name}: {w}" for r in runs for w in r.results.all_warnings()[:1]
             if r.results.collapsed or (r.results.sanity or {}).get("passed") is False]
    erm = find_setting(settings, "erm")
    sams = [s for s in settings if s.method == "sam" and not s.variant]
    ats = [s for s in settings if s.method == "pgd-at" and not s.variant]
    if primary_rho is None and sams:
        primary_rho = _lower_median([s.rho for s in sams if s.rho is not None])
        notes.append(f"no pre-specified rho: the lower median of the grid's, {primary_rho:g}")
    if primary_eps is None and ats:
        primary_eps = _lower_median([(s.eps, s.eps_label) for s in ats if s.eps is not None])[1]
        notes.append(f"no pre-specified eps: the lower median of the grid's, {primary_eps}")
    sam = find_setting(settings, "sam", rho=primary_rho) if primary_rho is not None else None
    at = find_setting(settings, "pgd-at", eps_label=primary_eps) if primary_eps is not None else None
    ep = endpoint(runs)
    if ep is None or not ep.radii:
        notes.append("no robust metric common to every run: claims (a) and (b) cannot be decided")
        a, b = (Verdict(c, CLAIMS[c], INCONCLUSIVE, "needs robust numbers", [], notes=["no robust endpoint"])
                for c in "ab")
    else:
        a = claim_a(erm, sam, sams, ep, margin)
        b = claim_b(erm, sam, at, ats, ep)
    c = claim_c(erm, settings, tolerance)
    return Verdicts(runs[0].task if runs else "?", runs[0].headline if runs else "?", ep, primary_rho,
                    primary_eps, settings, [a, b, c], notes)


# ------------------------------------------------------------------------------------------- output


def format_pct(st: Stat) -> str:
    """``86.5 ± 1.2`` (mean ± 95 % half-width, in points); mean alone for one seed; en dash for none."""
    if st.n == 0:
        return "–"
    return f"{st.mean * 100:.1f}" + ("" if st.ci95 is None else f" ± {st.ci95 * 100:.1f}")


def settings_table(v: Verdicts, pad: bool = False) -> str:
    """The paper-style table: per setting, seeds, clean and robust per radius (mean ± 95 % half-width in
    points), the endpoint, passes per step and its multiple of ERM's."""
    ep = v.endpoint
    radii = list(ep.radii) if ep else []
    erm = find_setting(v.settings, "erm")
    erm_pps = erm.of(passes_per_step).mean if erm else math.nan
    header = ["setting", "seeds", f"clean {v.headline}", *[f"robust {r}" for r in radii],
              "robust mean (endpoint)", "passes/step", "× ERM"]
    rows = []
    for s in v.settings:
        pps = s.of(passes_per_step)
        seeds = sorted(r.seed for r in s.runs if r.seed is not None)
        rows.append([s.name, ",".join(map(str, seeds)), format_pct(s.of(lambda r: r.clean)),
                     *[format_pct(s.of(ep.at(r))) for r in radii], format_pct(s.of(ep.mean)) if ep else "–",
                     f"{pps.mean:.2f}" if pps.n else "–",
                     f"{pps.mean / erm_pps:.2f}" if pps.n and erm_pps and math.isfinite(erm_pps) else "–"])
    return format_table(header, rows, pad=pad)


def verdict_table(v: Verdicts, pad: bool = False) -> str:
    rows = []
    for c in v.claims:
        effects = "; ".join(f"{e.name}: {e.text()}" for e in c.effects) or "; ".join(c.notes) or "–"
        rows.append([f"({c.claim}) {c.statement}", c.verdict.upper() if c.verdict != INCONCLUSIVE else c.verdict,
                     effects])
    return format_table(["claim", "verdict", "effect (paired by seed, 95 % interval)"], rows, pad=pad)


def to_markdown(v: Verdicts, header_lines: Sequence[str] = ()) -> str:
    out = [f"# samat reproduce: {v.task}", "", *header_lines]
    if header_lines:
        out.append("")
    ep = v.endpoint
    out += ["## Verdicts", "", verdict_table(v), ""]
    out += [f"Pre-specified radii: SAM rho {v.primary_rho if v.primary_rho is None else f'{v.primary_rho:g}'}, "
            f"PGD-AT eps {v.primary_eps}. Robust endpoint: {ep.describe() if ep else 'none'}. Effects in points "
            f"of {v.headline} (× 100).", ""]
    out += [f"- {n}" for n in v.notes] + ([""] if v.notes else [])
    for c in v.claims:
        out += [f"### ({c.claim}) {c.statement}: {c.verdict}", "", f"Rule: {c.rule}", ""]
        out += [f"- {e.name}: {e.text()}" for e in c.effects]
        out += [f"- note: {n}" for n in c.notes]
        if c.secondary:
            out += ["", "Secondary comparisons (other radii of the grid; not used by the verdict, no correction for "
                    "multiplicity):", ""] + [f"- {e.name}: {e.text()}" for e in c.secondary]
        out.append("")
    out += ["## Settings", "", "Mean ± half-width of the 95 % t-interval over seeds, in points of "
            f"{v.headline} (no ± for a single seed). Robust: the strongest attack per radius "
            f"({', '.join(ep.attacks) if ep else '–'}). Passes/step: forward-backward passes per optimizer "
            "step (mean of the exact forward and backward counts; ERM 1).", "", settings_table(v), ""]
    return "\n".join(out)


def to_json(v: Verdicts, extra: Optional[dict] = None) -> dict:
    ep = v.endpoint
    out = {"task": v.task, "headline_metric": v.headline, "primary_rho": v.primary_rho, "primary_eps": v.primary_eps,
           "endpoint": asdict(ep) if ep else None, "margin": MARGIN, "cost_tolerance": COST_TOLERANCE,
           "claims": [c.to_dict() for c in v.claims], "notes": v.notes,
           "settings": [{"name": s.name, "method": s.method, "rho": s.rho, "eps": s.eps_label,
                         "seeds": sorted(r.seed for r in s.runs if r.seed is not None),
                         "clean": asdict(s.of(lambda r: r.clean)),
                         "robust": {r: asdict(s.of(ep.at(r))) for r in (ep.radii if ep else ())},
                         "robust_mean": asdict(s.of(ep.mean)) if ep else None,
                         "passes_per_step": asdict(s.of(passes_per_step))} for s in v.settings]}
    out.update(extra or {})
    return out
