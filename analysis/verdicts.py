"""Verdicts on the paper's claims (a)-(c) from finished runs: paired-by-seed effects, 95 % intervals, and the
rule that turns them into "holds", "does not hold" or "inconclusive at this sample size".

Zhang et al. (ICML 2024) claim: (a) SAM raises robustness over ERM with no loss of clean accuracy; (b) AT is
more robust still but loses clean accuracy; (c) SAM costs ~2 passes per step, PGD-K AT ~K+1.

**Pairing.** Runs with the same seed see the same data order and are evaluated on the same examples
(``common/experiment.py`` draws the evaluation subset from the seed), whatever the method. So every comparison is
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
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from samat.common.errors import UsageError
from samat.common.stats import Interval, Stat, binomial_se, effect_interval, seeds_to_resolve
from samat.common.tables import format_table

from .runs import NOT_RECIPE, Run, Setting, eps_value, group

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive at this sample size"
NO_EFFECT = "no effect within ±margin"  # a finding: the equivalence test puts the effect inside ±MARGIN
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


def example_passes_per_step(run: Run) -> Optional[float]:
    """Forward-backward passes per optimizer step counted in examples: the mean of the exact forward and backward
    example counts over the examples one step trains on (per process). ERM 1, SAM 2, as :func:`passes_per_step`;
    it differs where a pass sees part of the batch (ESAM: 1.5 + gamma) or a doubled one (a clean+adversarial
    forward counts twice). :func:`passes_per_step` for runs without example counts."""
    fwd, bwd, trained = (run.cost.get(k) for k in ("forward_examples", "backward_examples", "train_examples"))
    if not fwd or bwd is None or not trained:
        return passes_per_step(run)
    return (fwd + bwd) / (2 * trained / max(run.results.num_processes, 1))


# ------------------------------------------------------------------------------------------- test-set noise


def _bootstrap_se(run: Run, prefix: str) -> Optional[float]:
    """A run's standard error of ``<prefix>_<headline>`` from the 95 % bootstrap interval over images its task
    wrote (``<group>/<prefix>_<headline>_ci95_low``/``_high``, e.g. segmentation's clean mIoU): width / 3.92."""
    suffix = f"{prefix}_{run.headline}_ci95_"
    lo = next((v for k, v in run.columns.items() if k.rpartition("/")[2] == suffix + "low"), None)
    hi = next((v for k, v in run.columns.items() if k.rpartition("/")[2] == suffix + "high"), None)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return (hi - lo) / (2 * 1.96)


def clean_se(run: Run) -> Optional[float]:
    """The test-set standard error of the run's clean headline metric: binomial for an accuracy on the run's
    ``data.eval_examples`` examples, else the task's bootstrap over images; ``None`` where neither is known."""
    n = run.eval_examples
    if run.headline == "accuracy" and n:
        return binomial_se(run.clean, n)
    return _bootstrap_se(run, "clean")


def endpoint_se(ep: "Endpoint") -> Callable[[Run], Optional[float]]:
    """The test-set standard error of :meth:`Endpoint.mean`: for accuracies the mean of the per-radius binomial
    errors (the radii's accuracies are measured on the same examples, so their errors are taken as fully
    correlated: an upper bound); for other metrics only where the task wrote a robust bootstrap (none does yet)."""

    def se(run: Run) -> Optional[float]:
        n = run.eval_examples
        values = [_radii(run, ep.norm).get(label) for label in ep.radii]
        if run.headline != "accuracy" or not n or any(v is None for v in values):
            return None
        return sum(binomial_se(v, n) for v in values) / len(values)

    return se


def exact(run: Run) -> Optional[float]:
    """Test-set standard error of an exact count (passes per step): 0."""
    return 0.0


# ------------------------------------------------------------------------------------------- pairing


@dataclass
class Effect:
    """``B - A`` (or ``B / A``) paired by seed: the per-seed values, their test-set standard errors, the mean
    and its 95 % interval (seed-to-seed and test-set noise, :func:`samat.common.stats.effect_interval`), the
    90 % interval of the equivalence test, and how the interval was made."""

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
    test_se: Optional[list[float]] = None  # per seed; None: not known (the interval is seed-to-seed only)
    lo90: Optional[float] = None
    hi90: Optional[float] = None
    noise: str = ""  # which sources of noise the interval holds
    interval: Optional[Interval] = field(default=None, repr=False)

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


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def usable_seeds(s: Setting, gets: Sequence[Getter]) -> tuple[dict[int, Run], list[str]]:
    """``{seed: run}`` of the setting's runs that can enter a comparison on ``gets``, and one line per run left
    out with the rule that left it out: a seed run twice (ambiguous: neither run is chosen), a run without a
    seed, a run with a missing or non-finite value (diverged or unmeasured: the seed leaves every component)."""
    by: dict[int, list[Run]] = {}
    out: list[str] = []
    for r in s.runs:
        if r.seed is None:
            out.append(f"{r.path.name} ({s.name}): no seed, cannot be paired")
        else:
            by.setdefault(r.seed, []).append(r)
    keep: dict[int, Run] = {}
    for seed, runs in sorted(by.items()):
        if len(runs) > 1:
            out.append(f"{', '.join(r.path.name for r in runs)} ({s.name}): seed {seed} run {len(runs)} times; "
                       "the seed is dropped (rule: a duplicated seed is ambiguous, neither run is chosen)")
        elif not all(_finite(get(runs[0])) for get in gets):
            out.append(f"{runs[0].path.name} ({s.name}, seed {seed}): a missing or non-finite value (diverged or "
                       "not measured); the seed is dropped from the whole comparison (rule: a seed enters every "
                       "component of a comparison or none)")
        else:
            keep[seed] = runs[0]
    return keep, out


def by_seed(s: Setting, get: Getter) -> dict[int, float]:
    """``{seed: get(run)}`` over the setting's usable runs (:func:`usable_seeds`)."""
    return {seed: get(r) for seed, r in usable_seeds(s, [get])[0].items()}


def comparison_seeds(a: Setting, b: Setting, gets: Sequence[Getter]) -> tuple[list[int], list[str]]:
    """The seeds both settings have a usable run of for every one of ``gets``, and the lines that say which
    runs were left out and why (partial seed sets: the run whose partner is missing)."""
    ra, out_a = usable_seeds(a, gets)
    rb, out_b = usable_seeds(b, gets)
    lonely = [f"{(ra.get(s) or rb.get(s)).path.name} ({a.name if s in ra else b.name}, seed {s}): no usable run of "
              f"seed {s} in {b.name if s in ra else a.name}; dropped (rule: only seeds both sides have are paired)"
              for s in sorted(set(ra) ^ set(rb))]
    return sorted(set(ra) & set(rb)), out_a + out_b + lonely


def paired(name: str, a: Setting, b: Setting, get: Getter, kind: str = "difference",
           se: Optional[Callable[[Run], Optional[float]]] = None, seeds: Optional[Sequence[int]] = None,
           shared_examples: bool = False, level: float = 0.95) -> Effect:
    """The per-seed ``get(B) - get(A)`` (``kind="ratio"``: ``get(B) / get(A)``) over ``seeds`` (default: the
    seeds both settings have a usable value for; :func:`comparison_seeds`). ``se(run)``: the run's test-set
    standard error of ``get`` (the effect's is the two runs' combined, :func:`paired_binomial_se`'s bound);
    ``None`` or an unknown one leaves the interval seed-to-seed only, and then identical values give no
    interval (a zero width would claim a certainty the test set cannot give). ``lo``/``hi``: the two-sided
    ``level`` interval (95 % by default)."""
    ra, rb = usable_seeds(a, [get])[0], usable_seeds(b, [get])[0]
    dropped = [f"seed {s} (only in {b.name if s in rb else a.name})" for s in sorted(set(ra) ^ set(rb))]
    use = sorted(set(ra) & set(rb)) if seeds is None else [s for s in seeds if s in ra and s in rb]
    if kind == "ratio":
        use = [s for s in use if get(ra[s])]
        values = [get(rb[s]) / get(ra[s]) for s in use]
    else:
        values = [get(rb[s]) - get(ra[s]) for s in use]
    ses = None
    if se is not None:
        pairs = [(se(ra[s]), se(rb[s])) for s in use]
        if all(x is not None and y is not None for x, y in pairs):
            ses = [math.hypot(x, y) if kind == "difference" else math.hypot(x, y) / abs(get(ra[s]))
                   for (x, y), s in zip(pairs, use)]
    mean = statistics.fmean(values) if values else None
    iv = effect_interval(values, ses, shared_examples, level)
    if iv is not None and ses is None and len(set(values)) == 1:
        iv = None  # no test-set noise known and no spread: no interval, rather than a zero-width one
    noise = ("exact counts" if ses is not None and not any(ses) else
             "seed-to-seed only (test-set noise unknown)" if ses is None else
             "seed-to-seed and test-set noise" + (" (the same examples for every seed)" if shared_examples else ""))
    return Effect(name, a.name, b.name, kind, list(use), values, mean, iv.lo if iv else None, iv.hi if iv else None,
                  dropped, ses, iv.lo90 if iv else None, iv.hi90 if iv else None, noise, iv)


# ------------------------------------------------------------------------------------------- like with like


# Evaluation flags that change nothing a verdict reads (batching, diagnostics, sharpness, the cascade: the
# suite's worst case is the same example by example with it or without it).
_NOT_MEASURED = ("eval_batch_size", "eval_diagnostics", "sharpness", "eval_cascade")


def comparable(run: Run, ep: Optional["Endpoint"]) -> dict[str, str]:
    """What two runs must share to be paired, as ``{field: value}``: the recipe (every run and task flag that
    changes what is trained or measured, i.e. everything but the method, its flags and the seed), the
    evaluation flags and examples (``eval.*``, ``data.*``), and the attacks at each endpoint radius."""
    config = run.results.config or {}
    out = {f"recipe.{k}": repr(v) for block in ("run", "task") for k, v in (config.get(block) or {}).items()
           if k not in NOT_RECIPE}
    out.update({f"eval.{k}": repr(v) for k, v in (config.get("eval") or {}).items()
                if not k.startswith(_NOT_MEASURED)})
    out.update({f"data.{k}": repr(v) for k, v in (run.results.data or {}).items()})
    for label in (ep.radii if ep else ()):
        out[f"attacks@{label}"] = ", ".join(sorted(k.partition("@")[0] for k in run.robust
                                                   if k.endswith(f"@{label}") and k.partition("@")[0].endswith(
                                                       f"-{ep.norm}")))
    return out


def unlike(runs: Sequence[Run], ep: Optional["Endpoint"]) -> list[str]:
    """One line per field the ``runs`` do not share (:func:`comparable`), naming the values and a run of each:
    ``recipe.epochs: 5 (erm_s0), 10 (sam_s0)``. Empty when they are alike."""
    records = [(r, comparable(r, ep)) for r in runs]
    keys = sorted({k for _, rec in records for k in rec})
    lines = []
    for k in keys:
        seen: dict[str, str] = {}
        for r, rec in records:
            seen.setdefault(rec.get(k, "(absent)"), r.path.name)
        if len(seen) > 1:
            lines.append(f"{k}: " + ", ".join(f"{v} ({name})" for v, name in seen.items()))
    return lines


def same_examples_every_seed(runs: Sequence[Run]) -> bool:
    """Whether every seed was evaluated on the same examples: the whole evaluation split (``--max_eval_samples``
    0, or more than the split holds). Otherwise each seed draws its own subset (``common/experiment.py``) and the
    seeds' test-set noise is independent."""
    def whole(r: Run) -> bool:
        asked = ((r.results.config or {}).get("run") or {}).get("max_eval_samples")
        return asked == 0 or (isinstance(asked, int) and r.eval_examples is not None and asked > r.eval_examples)

    return bool(runs) and all(whole(r) for r in runs)


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
    power: str = ""  # for "inconclusive": the seeds that would decide it at the observed variance

    def to_dict(self) -> dict:
        out = asdict(self)
        for e in out["effects"] + out["secondary"]:
            e.pop("interval", None)
        return out


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


# Comparisons against a bound allow for floating-point residue: -0.01 computed as 0.84 - 0.85 is
# -0.010000000000000009, which must not count as "below -1 point".
TOL = 1e-9


def above(x: float, bound: float) -> bool:
    return x > bound + TOL


def below(x: float, bound: float) -> bool:
    return x < bound - TOL


def equivalent(e: Effect, margin: float) -> bool:
    """The equivalence test (TOST, two one-sided tests at 5 %): the 90 % interval inside ``(-margin, margin)``."""
    return e.lo90 is not None and above(e.lo90, -margin) and below(e.hi90, margin)


def power_note(parts: Sequence[tuple[Effect, float]], margin: float) -> str:
    """For an inconclusive verdict: per component ``(effect, the bound its interval must clear)``, the seeds at
    which, with the observed mean and per-seed variance, the 95 % interval would clear the bound, or the 90 %
    interval fall inside ±margin (no effect), whichever comes first."""
    lines = []
    for e, bound in parts:
        if e.interval is None:
            lines.append(f"{e.name}: no interval yet (needs 2 or more seeds with a spread or a known test-set error)")
            continue
        if not (e.lo <= bound + TOL and e.hi >= bound - TOL):
            continue  # this component is decided
        clear = seeds_to_resolve(e.interval, bound)
        equiv = (seeds_to_resolve(e.interval, math.copysign(margin, e.mean), level=0.90)
                 if abs(e.mean) < margin else None)
        options = [f"~{clear} seeds would put its interval clear of {bound * 100:+g} pts" if clear else
                   f"no number of seeds up to 1000 puts its interval clear of {bound * 100:+g} pts"]
        if equiv:
            options.append(f"~{equiv} would show it within ±{margin * 100:g} pts (no effect)")
        lines.append(f"{e.name} ({e.n} seeds now): " + "; ".join(options))
    return ("At the observed means and per-seed variances (seed-to-seed and test-set): " + " | ".join(lines)
            + ".") if lines else ""


def three_way(effects: Sequence[Effect], holds: bool, fails: bool, no_effect: bool) -> str:
    """"does not hold" before "holds" before "no effect within ±margin"; inconclusive without intervals."""
    if _too_few(effects):
        return INCONCLUSIVE
    return FAILS if fails else HOLDS if holds else NO_EFFECT if no_effect else INCONCLUSIVE


@dataclass
class Context:
    """What every comparison of one grid shares: the endpoint, the test-set errors and the exclusions."""

    ep: "Endpoint"
    shared: bool
    margin: float = MARGIN
    excluded: list[str] = field(default_factory=list)

    def compare(self, a: Setting, b: Setting, pairs: Sequence[tuple[str, Getter, Callable]]) -> list[Effect]:
        """Paired effects of ``b`` over ``a`` for each ``(label, get, se)``, on one seed set for all of them
        (a seed leaves the comparison as a whole); what was left out goes to :attr:`excluded`."""
        seeds, out = comparison_seeds(a, b, [get for _, get, _ in pairs])
        self.excluded += [line for line in out if line not in self.excluded]
        return [paired(f"{label} ({b.name} − {a.name})", a, b, get, se=se, seeds=seeds, shared_examples=self.shared)
                for label, get, se in pairs]

    def robust_clean(self, a: Setting, b: Setting) -> list[Effect]:
        return self.compare(a, b, [("robust gain", self.ep.mean, endpoint_se(self.ep)),
                                   ("clean change", lambda r: r.clean, clean_se)])


def claim_a(erm: Optional[Setting], sam: Optional[Setting], sams: Sequence[Setting], ctx: Context) -> Verdict:
    m, margin = ctx.margin * 100, ctx.margin
    rule = (f"Paired by seed, SAM at the pre-specified rho minus ERM. HOLDS if the 95 % interval of the robust "
            f"gain ({ctx.ep.describe()}) lies above 0 AND the interval of the clean change lies above −{m:g} point "
            f"(non-inferiority margin). DOES NOT HOLD if the robust gain's interval lies below 0 OR the clean "
            f"change's interval lies entirely below −{m:g} point. NO EFFECT WITHIN ±{m:g} POINT if neither, and the "
            f"robust gain's 90 % interval lies inside ±{m:g} point (equivalence, two one-sided tests at 5 %). "
            f"Otherwise inconclusive, with the seeds that would decide it; always inconclusive with fewer than 2 "
            f"paired seeds (no interval).")
    if erm is None or sam is None:
        missing = "ERM" if erm is None else "SAM at the pre-specified rho"
        return Verdict("a", CLAIMS["a"], INCONCLUSIVE, rule, [], notes=[f"no finished {missing} runs"])
    robust, clean = effects = ctx.robust_clean(erm, sam)
    verdict = INCONCLUSIVE if _too_few(effects) else three_way(
        effects, holds=above(robust.lo, 0) and above(clean.lo, -margin),
        fails=below(robust.hi, 0) or below(clean.hi, -margin), no_effect=equivalent(robust, margin))
    secondary = [e for s in sams if s is not sam for e in ctx.robust_clean(erm, s)]
    power = power_note([(robust, 0.0), (clean, -margin)], margin) if verdict == INCONCLUSIVE else ""
    notes = [f"the robust gain is within ±{m:g} point (90 % interval [{robust.lo90 * 100:+.2f}, "
             f"{robust.hi90 * 100:+.2f}])"] if verdict == NO_EFFECT else []
    return Verdict("a", CLAIMS["a"], verdict, rule, effects, secondary, notes, power)


def claim_b(erm: Optional[Setting], sam: Optional[Setting], at: Optional[Setting], ats: Sequence[Setting],
            ctx: Context) -> Verdict:
    m, margin = ctx.margin * 100, ctx.margin
    rule = (f"Paired by seed, PGD-AT at the pre-specified eps. HOLDS if the 95 % interval of AT's robust gain over "
            f"SAM at the pre-specified rho ({ctx.ep.describe()}) lies above 0 AND the interval of AT's clean change "
            f"vs ERM lies below 0 (a loss). DOES NOT HOLD if the robust gain's interval lies below 0 OR the clean "
            f"change's interval lies above 0. NO EFFECT WITHIN ±{m:g} POINT if neither, and the 90 % interval of "
            f"the robust gain or of the clean change lies inside ±{m:g} point (equivalence, two one-sided tests "
            f"at 5 %). Otherwise inconclusive, with the seeds that would decide it; always inconclusive with fewer "
            f"than 2 paired seeds.")
    missing = [n for n, s in (("ERM", erm), ("SAM at the pre-specified rho", sam),
                              ("PGD-AT at the pre-specified eps", at)) if s is None]
    if missing:
        return Verdict("b", CLAIMS["b"], INCONCLUSIVE, rule, [], notes=[f"no finished {', '.join(missing)} runs"])
    robust = ctx.robust_clean(sam, at)[0]
    clean = ctx.robust_clean(erm, at)[1]
    effects = [robust, clean]
    verdict = INCONCLUSIVE if _too_few(effects) else three_way(
        effects, holds=above(robust.lo, 0) and below(clean.hi, 0), fails=below(robust.hi, 0) or above(clean.lo, 0),
        no_effect=equivalent(robust, margin) or equivalent(clean, margin))
    secondary = [e for s in ats if s is not at
                 for e in (ctx.robust_clean(sam, s)[0], ctx.robust_clean(erm, s)[1])]
    power = power_note([(robust, 0.0), (clean, 0.0)], margin) if verdict == INCONCLUSIVE else ""
    notes = [f"{e.name} is within ±{m:g} point (90 % interval [{e.lo90 * 100:+.2f}, {e.hi90 * 100:+.2f}])"
             for e in effects if verdict == NO_EFFECT and equivalent(e, margin)]
    return Verdict("b", CLAIMS["b"], verdict, rule, effects, secondary, notes, power)


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


def claim_c(erm: Optional[Setting], settings: Sequence[Setting], tolerance: float = COST_TOLERANCE,
            ctx: Optional[Context] = None) -> Verdict:
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
        seeds, out = comparison_seeds(erm, s, [passes_per_step])
        if ctx is not None:
            ctx.excluded += [line for line in out if line not in ctx.excluded]
        e = paired(f"passes per step ({s.name} / {erm.name}); expected {expected:g}", erm, s, passes_per_step,
                   kind="ratio", se=exact, seeds=seeds)
        effects.append(e)
        bad = [v for v in e.values if abs(v / expected - 1) > tolerance + TOL]
        if bad:
            outside = True
            notes.append(f"{s.name}: ratio {', '.join(f'{v:.3f}' for v in bad)} outside {expected:g} ± "
                         f"{tolerance:.0%}")
    if _too_few(effects):
        verdict = INCONCLUSIVE
    else:
        verdict = FAILS if outside else HOLDS
    return Verdict("c", CLAIMS["c"], verdict, rule, effects, notes=notes)


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
    excluded: list[str] = field(default_factory=list)  # runs left out of a comparison, each with its rule
    unlike: list[str] = field(default_factory=list)  # fields the paired runs do not share (allowed by the caller)
    shared_examples: bool = False


NOISE_RULE = ("Every interval combines two sources of noise: seed-to-seed variation (the spread of the paired "
              "per-seed effects) and the test set's sampling noise of each seed's effect (binomial for an accuracy "
              "on the run's n evaluation examples, the task's bootstrap over images for a mean IoU where it wrote "
              "one; two runs of one seed see the same examples, and without per-example outcomes in results.json "
              "the paired error is bounded by the unpaired one). Where each seed drew its own examples, the "
              "variance of one seed's effect is max(spread², mean test-set variance), with Satterthwaite's degrees "
              "of freedom; where every seed saw the same examples, the test-set variance is added whole (it does "
              "not average out over seeds). A zero-width interval is possible only for exact counts. An effect "
              "whose test-set error is unknown says so (seed-to-seed only), and then identical per-seed values "
              "give no interval.")


def decide(runs: Sequence[Run], primary_rho: Optional[float] = None, primary_eps: Optional[str] = None,
           margin: float = MARGIN, tolerance: float = COST_TOLERANCE, allow_unlike: bool = False) -> Verdicts:
    """Group ``runs`` into settings and decide claims (a)-(c). ``primary_rho``/``primary_eps``: the SAM and
    AT radii the verdicts use (pre-specified); ``None`` takes the lower median of the radii present (a rule on
    the grid, not on the results). Runs that are compared must be alike (:func:`unlike`): otherwise a
    ``UsageError`` naming the differing fields, or with ``allow_unlike`` a warning in the verdicts."""
    settings = group(runs)
    # a collapsed model is "robust" at its one class: its numbers are real measurements of a failed model and
    # enter the verdicts (leaving them out would flatter the method that collapsed), and the reader is told
    notes = [f"{r.path.name}: {w} (kept in the comparisons: a measurement of the method, not a harness error)"
             for r in runs for w in r.results.all_warnings()[:1]
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
    compared = [r for s in settings if not s.variant for r in s.runs]
    differ = unlike(compared, ep)
    if differ and not allow_unlike:
        raise UsageError("the runs to be paired differ in more than method, method flags and seed: "
                         + "; ".join(differ) + " (pass --allow_unlike to pair them anyway, with a warning)")
    shared = same_examples_every_seed(compared)
    excluded: list[str] = []
    if ep is None or not ep.radii:
        notes.append("no robust metric common to every run: claims (a) and (b) cannot be decided")
        a, b = (Verdict(c, CLAIMS[c], INCONCLUSIVE, "needs robust numbers", [], notes=["no robust endpoint"])
                for c in "ab")
        ctx = None
    else:
        ctx = Context(ep, shared, margin, excluded)
        a = claim_a(erm, sam, sams, ctx)
        b = claim_b(erm, sam, at, ats, ctx)
    c = claim_c(erm, settings, tolerance, ctx)
    if ctx is not None:
        excluded = ctx.excluded
    return Verdicts(runs[0].task if runs else "?", runs[0].headline if runs else "?", ep, primary_rho,
                    primary_eps, settings, [a, b, c], notes, excluded, differ, shared)


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


def verdict_text(verdict: str, margin: float = MARGIN) -> str:
    """``HOLDS``, ``DOES NOT HOLD``, ``NO EFFECT within ±1 point``, ``inconclusive at this sample size``."""
    if verdict == NO_EFFECT:
        return f"NO EFFECT within ±{margin * 100:g} point"
    return verdict if verdict == INCONCLUSIVE else verdict.upper()


def verdict_table(v: Verdicts, pad: bool = False) -> str:
    rows = []
    for c in v.claims:
        effects = "; ".join(f"{e.name}: {e.text()}" for e in c.effects) or "; ".join(c.notes) or "–"
        rows.append([f"({c.claim}) {c.statement}", verdict_text(c.verdict), effects])
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
    out += [f"Intervals: {NOISE_RULE} In this grid every seed "
            + ("saw the same evaluation examples." if v.shared_examples else "drew its own evaluation examples."), ""]
    if v.unlike:
        out += ["**WARNING: unlike runs paired** (allowed with `--allow_unlike`); the fields they differ in:", ""]
        out += [f"- {line}" for line in v.unlike] + [""]
    out += [f"- {n}" for n in v.notes] + ([""] if v.notes else [])
    out += ["Runs left out of a comparison, each with the rule that left it out: "
            + ("none." if not v.excluded else ""), ""]
    out += [f"- {line}" for line in v.excluded] + ([""] if v.excluded else [])
    for c in v.claims:
        out += [f"### ({c.claim}) {c.statement}: {verdict_text(c.verdict)}", "", f"Rule: {c.rule}", ""]
        out += [f"- {e.name}: {e.text()}; noise: {e.noise}" + (
            f"; 90 % interval [{e.lo90 * 100:+.2f}, {e.hi90 * 100:+.2f}]" if e.lo90 is not None and
            e.kind == "difference" else "") for e in c.effects]
        out += [f"- note: {n}" for n in c.notes]
        out += [f"- power: {c.power}"] if c.power else []
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
           "interval_method": NOISE_RULE, "same_examples_every_seed": v.shared_examples,
           "claims": [c.to_dict() for c in v.claims], "notes": v.notes, "excluded": v.excluded,
           "unlike_runs_paired": v.unlike,
           "settings": [{"name": s.name, "method": s.method, "rho": s.rho, "eps": s.eps_label,
                         "seeds": sorted(r.seed for r in s.runs if r.seed is not None),
                         "clean": asdict(s.of(lambda r: r.clean)),
                         "robust": {r: asdict(s.of(ep.at(r))) for r in (ep.radii if ep else ())},
                         "robust_mean": asdict(s.of(ep.mean)) if ep else None,
                         "passes_per_step": asdict(s.of(passes_per_step))} for s in v.settings]}
    out.update(extra or {})
    return out
