"""Finished runs as typed records: find the results.json files, read them, group runs into settings.

A *run* is one results.json, read through the engine's one reader (:class:`samat.common.results.RunResults`,
which also upgrades files of older schemas). A *setting* is a method with its SAM rho and/or AT eps (e.g.
``sam rho=0.05``, ``pgd-at eps=8/255``) and any other hyper-parameter that tells its runs apart; the runs of
one setting differ only in the seed, and are averaged (:func:`samat.common.stats.stat`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from samat.common.errors import UsageError
from samat.common.registry import METHODS
from samat.common.results import RunResults
from samat.common.stats import Stat, stat

RESULTS_FILE = "results.json"
# Rows of every table and figure go in the method registry's order (ERM, then SAM, then the AT family); other
# methods last.
METHOD_ORDER = tuple(METHODS)


@dataclass
class Run:
    """One finished run. ``robust`` maps ``"<attack>@<eps label>"`` (``"pgd-linf@8/255"``) to the headline
    metric under that attack; ``columns`` are the task's extra result columns (``"group/row/field"``)."""

    path: Path
    results: RunResults = field(repr=False)
    seed: Optional[int]
    rho: Optional[float]
    eps_label: Optional[str]
    eps: Optional[float]
    robust: dict[str, float]
    columns: dict[str, float]
    cost: dict[str, float]  # wall times and pass counts; only those the file holds (older runs lack some)
    sharpness: dict[str, float]  # "sam@0.05" / "asam@0.5" -> loss increase
    # The method's other hyper-parameters (method_resolved without method/rho/eps, e.g. at_clean_weight) and
    # the run's recipe (its config's run and task flags that change what is trained or measured, e.g. epochs).
    hyper: dict[str, Any] = field(default_factory=dict)
    # Those of ``hyper`` that differ between runs of the same method/rho/eps, as " k=v ..." (set by group()).
    variant: str = ""

    @property
    def task(self) -> str:
        return self.results.task

    @property
    def method(self) -> str:
        return self.results.method

    @property
    def headline(self) -> str:
        return self.results.headline_metric

    @property
    def clean(self) -> float:
        return float(self.results.clean)

    @property
    def eval_examples(self) -> Optional[int]:
        """How many examples the run was evaluated on (``data.eval_examples``); ``None`` where not recorded."""
        n = (self.results.data or {}).get("eval_examples")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    def metric(self, key: str) -> Optional[float]:
        """A robust key (``"pgd-linf@8/255"``) or an extra column name, ``None`` where the run lacks it."""
        return self.robust.get(key, self.columns.get(key))

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


# ------------------------------------------------------------------------------------------------ finding


def find_results(paths: Sequence[str]) -> list[Path]:
    """Every ``results.json`` at or under ``paths`` (sorted, deduplicated)."""
    found: list[Path] = []
    for text in paths:
        p = Path(text)
        if not p.exists():
            raise UsageError(f"{text}: no such file or folder")
        if p.is_file():
            if p.name != RESULTS_FILE:
                raise UsageError(f"{text}: expected a runs folder or a {RESULTS_FILE} file")
            found.append(p.resolve())
        else:
            found += [q.resolve() for q in p.rglob(RESULTS_FILE) if q.is_file()]
    return sorted(set(found))


def run_status(output_dir: Path) -> str:
    """``done`` if the run finished (results.json), ``resume`` if it holds a checkpoint to continue from
    (``scripts/run.py --resume``), else ``new``."""
    if (output_dir / RESULTS_FILE).is_file():
        return "done"
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir() and any(p.is_dir() for p in checkpoints.glob("step_*")):
        return "resume"
    return "new"


def find_unfinished(paths: Sequence[str]) -> list[Path]:
    """Run folders under ``paths`` that were interrupted: a checkpoint, no results.json."""
    folders = {c.parent for text in paths if Path(text).is_dir() for c in Path(text).rglob("checkpoints")}
    return sorted(f for f in folders if run_status(f) == "resume")


# ------------------------------------------------------------------------------------------------ reading


def eps_value(label: str) -> float:
    """``"8/255"`` → 0.0314; ``"0.25"`` → 0.25. Unparseable labels sort last (inf)."""
    try:
        return float(Fraction(label)) if "/" in label else float(label)
    except (ValueError, ZeroDivisionError):
        return math.inf


def eps_label(value: float, pixel_space: bool) -> str:
    """A radius as users write it: ``k/255`` where it is one (pixel tasks), else ``%g``."""
    k = value * 255
    if pixel_space and value > 0 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{value:g}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_results(path: Path) -> dict:
    """One results.json as a dict, checked to be a samat results file; else a ``UsageError`` naming it."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not a readable JSON file ({type(err).__name__})") from None
    for keys in (("task",), ("method",), ("headline_metric",), ("metrics", "clean")):
        value: Any = raw
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if value is None:
            raise UsageError(f"{path}: not a samat results.json (no {'.'.join(keys)!r})")
    if not _number(raw["metrics"]["clean"].get(raw["headline_metric"])):
        raise UsageError(f"{path}: metrics.clean has no number {raw['headline_metric']!r}")
    return raw


def _rho_and_eps(results: RunResults) -> tuple[Optional[float], Optional[str], Optional[float]]:
    """The setting's rho and eps (label and value). They belong to it only where the method uses them:
    ``method_resolved`` (written by the engine) lists exactly those; the flags in ``config`` are the
    fallback for files without it."""
    resolved = results.method_resolved or {}
    flags = (results.config or {}).get("method") or {}
    rho = resolved.get("rho") if resolved else flags.get("rho")
    label = None
    if (resolved and "eps" in resolved) or (not resolved and flags.get("train_eps") is not None):
        # k/255 where the run's own evaluation radii are written so (pixel tasks), else %g (embeddings)
        in_255ths = any(radius.endswith("/255") for _, radius, _ in results.robust())
        label = flags.get("train_eps") or eps_label(float(resolved["eps"]), pixel_space=in_255ths)
    return (float(rho) if rho is not None else None), label, (eps_value(label) if label is not None else None)


def _sharpness(block: Optional[dict]) -> dict[str, float]:
    """``{"sam@0.05": loss increase, "asam@0.5": ...}`` from results' ``sharpness`` block."""
    out = {}
    for kind in ("sam", "asam"):
        for radius, entry in ((block or {}).get(kind) or {}).items():
            if isinstance(entry, dict) and _number(entry.get("sharpness")):
                out[f"{kind}@{radius}"] = float(entry["sharpness"])
    return out


# Run flags that change neither what is trained nor what is measured: runs that differ only in these (and
# the seed) are seeds of one setting. Every other run and task flag is part of the setting, so that e.g. a
# 5-epoch and a 10-epoch run of one seed are never averaged as if they were two seeds.
NOT_RECIPE = frozenset({"task", "method", "seed", "output_dir", "resume", "overwrite", "log_with", "logging_steps",
                         "num_workers", "cpu_threads", "checkpoint_every", "push_to_hub", "hub_model_id", "config",
                         "divergence_guard", "eval_batch_size"})


def _hyper(results: RunResults) -> dict[str, Any]:
    """The method's resolved hyper-parameters besides method/rho/eps, then the run's recipe flags."""
    hyper = {k: v for k, v in (results.method_resolved or {}).items() if k not in ("method", "rho", "eps")}
    config = results.config or {}
    for block in ("run", "task"):
        for k, v in (config.get(block) or {}).items():
            if k not in NOT_RECIPE and k not in hyper:
                hyper[k] = v
    return hyper


def load_run(path: Path) -> Run:
    """Read one results.json into a :class:`Run`."""
    return load_run_dict(read_results(path), path.parent, source=str(path))


def load_run_dict(raw: dict, run_dir: Path, source: str = "results") -> Run:
    """A results document (a results.json's contents) of the run in ``run_dir`` as a :class:`Run`."""
    results = RunResults.from_dict(raw, source=source)  # upgrades older schemas (e.g. adds columns)
    rho, label, eps = _rho_and_eps(results)
    robust = {f"{attack}@{radius}": float(value) for attack, radius, value in
              sorted(results.robust(), key=lambda t: eps_value(t[1])) if _number(value)}
    # The counts the file holds: RunResults.cost reads a count older runs did not record as 0.
    cost = {k: float(v) for k, v in (raw.get("cost") or {}).items() if _number(v)}
    seed = ((results.config or {}).get("run") or {}).get("seed")
    return Run(path=run_dir, results=results, seed=seed if isinstance(seed, int) else None, rho=rho,
               eps_label=label, eps=eps, robust=robust,
               columns={k: float(v) for k, v in results.columns.items() if _number(v)}, cost=cost,
               sharpness=_sharpness(results.sharpness), hyper=_hyper(results))


def load_runs(paths: Sequence[str]) -> list[Run]:
    """All runs under ``paths``, checked to be of one task. ``UsageError`` if none or mixed."""
    files = find_results(paths)
    if not files:
        raise UsageError(f"no {RESULTS_FILE} under {', '.join(paths)} (are the runs finished?)")
    runs = [load_run(f) for f in files]
    tasks: "OrderedDict[str, list[Run]]" = OrderedDict()
    for r in runs:
        tasks.setdefault(r.task, []).append(r)
    if len(tasks) > 1:
        detail = "; ".join(f"{t}: {len(rs)} run(s), e.g. {rs[0].path}" for t, rs in tasks.items())
        raise UsageError(f"results from different tasks ({detail}); report one task at a time")
    metrics = {r.headline for r in runs}
    if len(metrics) > 1:
        raise UsageError(f"runs disagree on the headline metric ({', '.join(sorted(metrics))})")
    return runs


# ------------------------------------------------------------------------------------------- settings


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
        """Mean, std and 95 % interval of ``get(run)`` over the runs (seeds) that have it."""
        return stat([get(r) for r in self.runs])


def setting_order(run: Run) -> tuple:
    """Sort key of a run's setting: method (``METHOD_ORDER``, unknown ones last), then rho, then eps."""
    method_rank = METHOD_ORDER.index(run.method) if run.method in METHOD_ORDER else len(METHOD_ORDER)
    return (method_rank, run.method, run.rho or 0.0, run.eps or 0.0)


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


# ------------------------------------------------------------------------------------------- portability

# An absolute path inside a string: "/" not preceded by a word character, a dot, a colon or a slash (so
# "8/255", "a/b" and "https://..." are left alone), up to whitespace or a delimiter.
_ABSOLUTE = re.compile(r"(?<![\w.:/])/[^\s\"'`,;()\[\]<>|]+")


def portable_path(path: str, base: Path, repo: Optional[Path] = None) -> str:
    """``path`` as committed evidence may hold it: relative to ``base`` (the results folder) where it lies
    inside ``repo`` (default: the working directory); elsewhere ``.../`` and its last three parts (the machine's
    own folders say nothing to a reader of a clone). Relative paths are returned as they are."""
    if not os.path.isabs(path):
        return path
    root = os.path.abspath(repo or Path.cwd())
    if os.path.commonpath([root, os.path.abspath(path)]) == root:
        return Path(os.path.relpath(path, os.path.abspath(base))).as_posix()
    return ".../" + "/".join(Path(path).parts[-3:])


def portable(value: Any, base: Path, repo: Optional[Path] = None) -> Any:
    """``value`` (a JSON-like document or a string) with every absolute path in its strings made portable
    (:func:`portable_path`)."""
    if isinstance(value, str):
        return _ABSOLUTE.sub(lambda m: portable_path(m.group(0), base, repo), value)
    if isinstance(value, dict):
        return {k: portable(v, base, repo) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, base, repo) for v in value]
    return value
