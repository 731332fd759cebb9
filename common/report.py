"""Finished runs (their results.json) into a report: loading, mean ± std over seeds, report.md and the CSVs.

A *setting* is a method with its SAM rho and/or AT eps (e.g. ``sam rho=0.05``, ``pgd-at eps=8/255``); runs
of one setting with different seeds are averaged (std with ddof=1; a single seed shows no std). The figures
are drawn by :mod:`common.figures`; ``scripts/report.py`` is the command line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import UsageError
from .files import write_bytes_atomic

# Rows of every table and figure go in this order (ERM, then SAM, then the AT family); other methods last.
METHOD_ORDER = ("erm", "sam", "asam", "pgd-at", "fgsm-at", "trades", "sam-at")
TEXTATTACK_FIELDS = ("accuracy_under_attack", "attack_success_rate", "avg_perturbed_word_pct", "avg_queries",
                     "num_examples")
COST_FIELDS = ("train_wall_s", "eval_wall_s", "optimizer_steps", "forward_passes", "backward_passes",
               "forward_examples", "backward_examples", "train_examples")


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class Run:
    """One finished run, flattened. ``robust`` maps a column key (``"pgd-linf@8/255"`` or
    ``"textattack:deepwordbug"``) to the headline metric (accuracy under attack for TextAttack)."""

    path: Path
    task: str
    method: str
    headline: str
    seed: Optional[int]
    rho: Optional[float]
    eps_label: Optional[str]
    eps: Optional[float]
    clean: float
    robust: dict[str, float]
    textattack: dict[str, dict[str, float]]
    cost: dict[str, float]
    sharpness: dict[str, float]
    raw: dict = field(repr=False)
    # The method's other hyper-parameters (method_resolved without method/rho/eps), e.g. at_clean_weight.
    hyper: dict[str, Any] = field(default_factory=dict)
    # Those of ``hyper`` that differ between runs of the same method/rho/eps, as " k=v ..." (set by group()).
    variant: str = ""

    @property
    def setting(self) -> str:
        """Method, rho and eps: ``sam rho=0.05``, ``pgd-at eps=8/255``."""
        parts = [self.method]
        if self.rho is not None:
            parts.append(f"rho={self.rho:g}")
        if self.eps_label is not None:
            parts.append(f"eps={self.eps_label}")
        return " ".join(parts)

    @property
    def label(self) -> str:
        """The setting the report groups by: ``setting`` plus whatever else tells its runs apart, e.g.
        ``pgd-at eps=0.02 at_clean_weight=0.5`` next to ``... at_clean_weight=0``."""
        return self.setting + self.variant


def eps_value(label: str) -> float:
    """``"8/255"`` → 0.0314; ``"0.25"`` → 0.25. Unparseable labels sort last (inf)."""
    try:
        return float(Fraction(label)) if "/" in label else float(label)
    except (ValueError, ZeroDivisionError):
        return math.inf


def _eps_label(value: float, pixel_space: bool) -> str:
    """A radius as users write it: ``k/255`` where it is one (pixel tasks), else ``%g``."""
    k = value * 255
    if pixel_space and value > 0 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{value:g}"


def find_results(paths: Sequence[str]) -> list[Path]:
    """Every ``results.json`` at or under ``paths`` (sorted, deduplicated)."""
    found: list[Path] = []
    for text in paths:
        p = Path(text)
        if not p.exists():
            raise UsageError(f"{text}: no such file or folder")
        if p.is_file():
            if p.name != "results.json":
                raise UsageError(f"{text}: expected a runs folder or a results.json file")
            found.append(p.resolve())
        else:
            found += [q.resolve() for q in p.rglob("results.json") if q.is_file()]
    return sorted(set(found))


def find_unfinished(paths: Sequence[str]) -> list[Path]:
    """Run folders that hold checkpoints but no results.json (interrupted; ``--resume`` continues them)."""
    out = []
    for text in paths:
        p = Path(text)
        if p.is_dir():
            out += [c.parent for c in p.rglob("checkpoints") if c.is_dir() and not (c.parent / "results.json").exists()]
    return sorted(set(out))


def _get(d: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def load_run(path: Path) -> Run:
    """Parse one results.json; a file that is not one is a ``UsageError`` naming it."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not a readable JSON file ({type(err).__name__})") from None
    for keys in (("task",), ("method",), ("headline_metric",), ("metrics", "clean")):
        if _get(raw, *keys) is None:
            raise UsageError(f"{path}: not a samat results.json (no {'.'.join(keys)!r})")
    headline = raw["headline_metric"]
    clean = _get(raw, "metrics", "clean", headline)
    if not isinstance(clean, (int, float)):
        raise UsageError(f"{path}: metrics.clean has no number {headline!r}")
    pixel_space = raw["task"] != "text"
    resolved = raw.get("method_resolved") or {}
    method_cfg = _get(raw, "config", "method") or {}
    # rho / eps belong to the setting only where the method uses them; method_resolved (written by the
    # engine) lists exactly those, the raw config (flags) is the fallback.
    rho = resolved.get("rho") if resolved else method_cfg.get("rho")
    eps_label, eps = None, None
    if (resolved and "eps" in resolved) or (not resolved and method_cfg.get("train_eps") is not None):
        eps_label = method_cfg.get("train_eps") or _eps_label(float(resolved["eps"]), pixel_space)
        eps = eps_value(eps_label)
    robust = {}
    for attack, by_eps in (_get(raw, "metrics", "robust") or {}).items():
        for label in sorted(by_eps, key=eps_value):
            value = _get(by_eps, label, headline)
            if isinstance(value, (int, float)):
                robust[f"{attack}@{label}"] = float(value)
    textattack = {}
    for recipe, fields_ in (_get(raw, "metrics", "textattack") or {}).items():
        if isinstance(fields_, dict):
            textattack[recipe] = {k: float(v) for k, v in fields_.items() if isinstance(v, (int, float))}
            if "accuracy_under_attack" in textattack[recipe]:
                robust[f"textattack:{recipe}"] = textattack[recipe]["accuracy_under_attack"]
    cost = {k: float(v) for k, v in (raw.get("cost") or {}).items() if isinstance(v, (int, float))}
    sharpness = {}
    block = raw.get("sharpness") or {}
    for kind in ("sam", "asam"):
        for r, entry in (block.get(kind) or {}).items():
            if isinstance(_get(entry, "sharpness"), (int, float)):
                sharpness[f"{kind}@{r}"] = float(entry["sharpness"])
    seed = _get(raw, "config", "run", "seed")
    return Run(path=path.parent, task=raw["task"], method=raw["method"], headline=headline,
               seed=seed if isinstance(seed, int) else None, rho=float(rho) if rho is not None else None,
               eps_label=eps_label, eps=eps, clean=float(clean), robust=robust, textattack=textattack,
               cost=cost, sharpness=sharpness, raw=raw,
               hyper={k: v for k, v in resolved.items() if k not in ("method", "rho", "eps")})


def load_runs(paths: Sequence[str]) -> list[Run]:
    """All runs under ``paths``, checked to be of one task. ``UsageError`` if none or mixed."""
    files = find_results(paths)
    if not files:
        raise UsageError(f"no results.json under {', '.join(paths)} (are the runs finished?)")
    runs = [load_run(f) for f in files]
    tasks = OrderedDict()
    for r in runs:
        tasks.setdefault(r.task, []).append(r)
    if len(tasks) > 1:
        detail = "; ".join(f"{t}: {len(rs)} run(s), e.g. {rs[0].path}" for t, rs in tasks.items())
        raise UsageError(f"results from different tasks ({detail}); report one task at a time")
    metrics = {r.headline for r in runs}
    if len(metrics) > 1:
        raise UsageError(f"runs disagree on the headline metric ({', '.join(sorted(metrics))})")
    return runs




# ------------------------------------------------------------------------------------------ aggregation



def setting_order(run: Run) -> tuple:
    """Sort key of a run's setting: method (``METHOD_ORDER``, unknown ones last), then rho, then eps."""
    method_rank = METHOD_ORDER.index(run.method) if run.method in METHOD_ORDER else len(METHOD_ORDER)
    return (method_rank, run.method, run.rho or 0.0, run.eps or 0.0)


def robust_columns(runs: Sequence[Run]) -> list[str]:
    """Robust column keys in a stable order: PGD attacks (by radius), then TextAttack recipes."""
    keys = OrderedDict((k, None) for r in runs for k in r.robust)
    # Attacks in the order the engine writes them (pgd-linf first), radii ascending.
    attacks = list(OrderedDict((k.partition("@")[0], None) for k in keys if not k.startswith("textattack:")))

    def order(key: str) -> tuple:
        if key.startswith("textattack:"):
            return (1, 0, key, 0.0)
        attack, _, label = key.partition("@")
        return (0, attacks.index(attack), attack, eps_value(label))

    return sorted(keys, key=order)


def sharpness_columns(runs: Sequence[Run]) -> list[str]:
    keys = OrderedDict((k, None) for r in runs for k in r.sharpness)
    return sorted(keys, key=lambda k: (not k.startswith("sam@"), eps_value(k.partition("@")[2])))


@dataclass
class Stat:
    mean: float
    std: Optional[float]  # None for a single value
    n: int

    def text(self, fmt: str = "{:.4f}") -> str:
        if self.n == 0:
            return "–"
        return fmt.format(self.mean) + ("" if self.std is None else " ± " + fmt.format(self.std))


def stat(values: Sequence[Optional[float]]) -> Stat:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return Stat(math.nan, None, 0)
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))


@dataclass
class Setting:
    """The runs of one setting (all seeds)."""

    name: str
    method: str
    rho: Optional[float]
    eps_label: Optional[str]
    eps: Optional[float]
    runs: list[Run]
    variant: str = ""  # Run.variant of its runs: the other hyper-parameters that tell it apart

    def of(self, get: Callable[[Run], Optional[float]]) -> Stat:
        return stat([get(r) for r in self.runs])


def _hyper_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def group(runs: Sequence[Run]) -> list[Setting]:
    """Runs grouped into settings (seeds of one configuration). Runs of one method/rho/eps that differ in
    another hyper-parameter (``--at_clean_weight``, ``--train_steps``, ...) are different settings, named by
    what differs (``Run.variant``, set here), never averaged together as if they were seeds."""
    same_base: "OrderedDict[str, list[Run]]" = OrderedDict()
    for r in runs:
        same_base.setdefault(r.setting, []).append(r)
    for members in same_base.values():
        keys = sorted({k for r in members for k in r.hyper})
        varying = [k for k in keys if len({_hyper_text(r.hyper.get(k)) for r in members}) > 1]
        for r in members:
            r.variant = "".join(f" {k}={_hyper_text(r.hyper.get(k))}" for k in varying)
    settings: "OrderedDict[str, Setting]" = OrderedDict()
    for r in sorted(runs, key=lambda r: (*setting_order(r), r.variant)):
        if r.label not in settings:
            settings[r.label] = Setting(r.label, r.method, r.rho, r.eps_label, r.eps, [], r.variant)
        settings[r.label].runs.append(r)
    return list(settings.values())


# ----------------------------------------------------------------------------------------------- tables


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _seeds(s: Setting) -> str:
    seeds = sorted({r.seed for r in s.runs if r.seed is not None})
    return f"{len(s.runs)} ({', '.join(map(str, seeds))})" if seeds else str(len(s.runs))


def column_title(key: str) -> str:
    """A robust column key as a table or axis title: ``"pgd-linf 8/255"``, ``"deepwordbug acc. under attack"``."""
    if key.startswith("textattack:"):
        return f"{key.partition(':')[2]} acc. under attack"
    attack, _, label = key.partition("@")
    return f"{attack} {label}"


def build_markdown(runs: list[Run], settings: list[Setting], figures: list[tuple[str, str]],
                   unfinished: list[Path], sources: Sequence[str]) -> str:
    task, headline = runs[0].task, runs[0].headline
    cols = robust_columns(runs)
    out = [f"# samat report: {task}", "",
           f"{len(runs)} run(s) in {len(settings)} setting(s) from {', '.join(sources)}; headline metric "
           f"`{headline}`; generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}.", "",
           "Mean ± std over seeds (std with ddof=1, shown only for two or more seeds).", "",
           "## Clean and robust " + headline, ""]
    rows = [[s.name, _seeds(s), s.of(lambda r: r.clean).text(),
             *[s.of(lambda r, k=k: r.robust.get(k)).text() for k in cols]] for s in settings]
    out += [_md_table(["setting", "runs (seeds)", f"clean {headline}",
                       *[column_title(k) for k in cols]], rows), ""]

    recipes = list(OrderedDict((rec, None) for r in runs for rec in r.textattack))
    if recipes:
        out += ["## TextAttack", ""]
        rows = [[s.name, rec, *[s.of(lambda r, rec=rec, f=f: r.textattack.get(rec, {}).get(f)).text(
            "{:.4f}" if f in ("accuracy_under_attack", "attack_success_rate") else "{:.1f}")
            for f in TEXTATTACK_FIELDS]] for s in settings for rec in recipes]
        out += [_md_table(["setting", "recipe", *TEXTATTACK_FIELDS], rows), ""]

    erm = next((s for s in settings if s.method == "erm"), None)
    erm_time = erm.of(lambda r: r.cost.get("train_wall_s")).mean if erm else math.nan
    erm_fwd = erm.of(lambda r: r.cost.get("forward_passes")).mean if erm else math.nan
    erm_rows = erm.of(lambda r: r.cost.get("forward_examples")).mean if erm else math.nan
    out += ["## Cost", "",
            "Wall times depend on the machine (see each run's `device`); the pass counts do not. "
            "`× ERM` compares means with the ERM setting of this report. Forward examples count a doubled "
            "clean+adversarial batch (TRADES, `--at_clean_weight`) twice; forward passes count it once.", ""]
    rows = []
    for s in settings:
        t = s.of(lambda r: r.cost.get("train_wall_s"))
        f = s.of(lambda r: r.cost.get("forward_passes"))
        fe = s.of(lambda r: r.cost.get("forward_examples"))
        rows.append([s.name, t.text("{:.1f}"), s.of(lambda r: r.cost.get("eval_wall_s")).text("{:.1f}"),
                     s.of(lambda r: r.cost.get("optimizer_steps")).text("{:.0f}"), f.text("{:.0f}"),
                     s.of(lambda r: r.cost.get("backward_passes")).text("{:.0f}"),
                     f"{t.mean / erm_time:.2f}" if erm_time and t.n and math.isfinite(erm_time) else "–",
                     f"{f.mean / erm_fwd:.2f}" if erm_fwd and f.n and math.isfinite(erm_fwd) else "–",
                     f"{fe.mean / erm_rows:.2f}" if erm_rows and fe.n and math.isfinite(erm_rows) else "–"])
    out += [_md_table(["setting", "train s", "eval s", "steps", "forward passes", "backward passes",
                       "train time × ERM", "forward passes × ERM", "forward examples × ERM"], rows), ""]

    sharp_cols = sharpness_columns(runs)
    if sharp_cols:
        out += ["## Weight-space sharpness", "",
                "Worst-case increase of the loss on a fixed evaluation subset within an L2 ball of radius rho "
                "around the trained weights (`sam@rho`), or within the ASAM ball scaled by |w| + eta "
                "(`asam@rho`); projected gradient ascent, eval mode (`common/sharpness.py`).", ""]
        # Next to it, the first attack's robust columns (pgd-linf for images): the duality in one table.
        first = [k for k in cols if k.partition("@")[0] == cols[0].partition("@")[0]] if cols else []
        rows = [[s.name, *[s.of(lambda r, k=k: r.sharpness.get(k)).text("{:.4g}") for k in sharp_cols],
                 s.of(lambda r: r.clean).text(), *[s.of(lambda r, k=k: r.robust.get(k)).text() for k in first]]
                for s in settings]
        out += [_md_table(["setting", *sharp_cols, f"clean {headline}",
                           *[column_title(k) for k in first]], rows), ""]

    failed = [r for r in runs if _get(r.raw, "sanity", "passed") is False]
    out += ["## Sanity", ""]
    if failed:
        out += ["Runs whose AutoAttack-style sanity checks FAILED (their robust numbers are suspect):", ""]
        out += [f"- `{r.path}`: " + ", ".join(c.get("name", "?") for c in _get(r.raw, "sanity", "checks") or []
                                               if isinstance(c, dict) and not c.get("passed", True))
                for r in failed]
    else:
        out += ["Every run that recorded sanity checks passed them."]
    out += [""]
    if unfinished:
        out += ["Unfinished runs (checkpoints, no results.json; `scripts/sweep.py` resumes them):", ""]
        out += [f"- `{p}`" for p in unfinished] + [""]
    out += ["## Figures", ""] + [f"### {title}\n\n![{title}]({name})\n" for name, title in figures]
    devices = OrderedDict((f"{r.raw.get('device', '?')} × {r.raw.get('num_processes', '?')} "
                           f"({r.raw.get('mixed_precision', '?')})", None) for r in runs)
    out += ["## Runs", "", f"Devices: {', '.join(devices)}. One row per run in `results.csv`.", ""]
    return "\n".join(out)


def csv_rows(runs: list[Run]) -> tuple[list[str], list[dict]]:
    """One flat row per run: identity, clean, robust columns, TextAttack fields, cost, sharpness."""
    cols = robust_columns(runs)
    recipes = list(OrderedDict((rec, None) for r in runs for rec in r.textattack))
    sharp = sharpness_columns(runs)
    headline = runs[0].headline
    header = ["run_dir", "task", "method", "setting", "seed", "rho", "train_eps", f"clean_{headline}",
              *[f"{k}_{headline}" for k in cols if not k.startswith("textattack:")],
              *[f"textattack_{rec}_{f}" for rec in recipes for f in TEXTATTACK_FIELDS],
              *[f"cost_{c}" for c in COST_FIELDS], *[f"sharpness_{k}" for k in sharp],
              "sanity_passed", "device", "num_processes", "mixed_precision", "finished_at"]
    rows = []
    for r in runs:
        row = {"run_dir": str(r.path), "task": r.task, "method": r.method, "setting": r.label, "seed": r.seed,
               "rho": r.rho, "train_eps": r.eps_label, f"clean_{headline}": r.clean,
               "sanity_passed": _get(r.raw, "sanity", "passed"), "device": r.raw.get("device"),
               "num_processes": r.raw.get("num_processes"), "mixed_precision": r.raw.get("mixed_precision"),
               "finished_at": r.raw.get("finished_at")}
        row.update({f"{k}_{headline}": r.robust.get(k) for k in cols if not k.startswith("textattack:")})
        row.update({f"textattack_{rec}_{f}": r.textattack.get(rec, {}).get(f) for rec in recipes
                    for f in TEXTATTACK_FIELDS})
        row.update({f"cost_{c}": r.cost.get(c) for c in COST_FIELDS})
        row.update({f"sharpness_{k}": r.sharpness.get(k) for k in sharp})
        rows.append(row)
    return header, rows


def summary_rows(runs: list[Run], settings: list[Setting]) -> tuple[list[str], list[dict]]:
    """One row per setting: mean and std of every number in the per-run CSV."""
    headline = runs[0].headline
    getters: "OrderedDict[str, Callable[[Run], Optional[float]]]" = OrderedDict()
    getters[f"clean_{headline}"] = lambda r: r.clean
    for k in robust_columns(runs):
        getters[f"{k}"] = lambda r, k=k: r.robust.get(k)
    for c in COST_FIELDS:
        getters[f"cost_{c}"] = lambda r, c=c: r.cost.get(c)
    for k in sharpness_columns(runs):
        getters[f"sharpness_{k}"] = lambda r, k=k: r.sharpness.get(k)
    header = ["setting", "method", "rho", "train_eps", "runs"]
    for name in getters:
        header += [f"{name}_mean", f"{name}_std"]
    rows = []
    for s in settings:
        row: dict[str, Any] = {"setting": s.name, "method": s.method, "rho": s.rho, "train_eps": s.eps_label,
                               "runs": len(s.runs)}
        for name, get in getters.items():
            st = s.of(get)
            row[f"{name}_mean"] = st.mean if st.n else None
            row[f"{name}_std"] = st.std
        rows.append(row)
    return header, rows


def _csv_bytes(header: list[str], rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


# ------------------------------------------------------------------------------------------------ output


def pick_sharpness_key(runs: Sequence[Run], wanted: Optional[str]) -> Optional[str]:
    """The sharpness measurement to plot: ``wanted`` (which some run must have), else the first SAM one."""
    available = sharpness_columns(runs)
    if wanted is not None and wanted not in available:
        raise UsageError(f"--sharpness: no run has {wanted!r}; available: {', '.join(available) or 'none'}")
    return wanted or (available[0] if available else None)


def build_report(paths: Sequence[str], sharpness_key: Optional[str] = None) -> dict[str, bytes]:
    """Every output file of the report as ``{name: bytes}``; nothing is written here, so a ``UsageError``
    leaves no half-written report behind."""
    # Imported here: common.figures imports this module, and matplotlib is slow to load.
    from .figures import draw_figures

    runs = load_runs(paths)
    settings = group(runs)
    figures = draw_figures(runs, settings, pick_sharpness_key(runs, sharpness_key))
    files = {name: png for name, _, png in figures}
    files["report.md"] = build_markdown(runs, settings, [(name, title) for name, title, _ in figures],
                                        find_unfinished(paths), paths).encode()
    files["results.csv"] = _csv_bytes(*csv_rows(runs))
    files["summary.csv"] = _csv_bytes(*summary_rows(runs, settings))
    return files


def write_report(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into ``out`` (created if missing), each atomically: a reader never sees half a file."""
    for name, data in files.items():
        write_bytes_atomic(out / name, data)
