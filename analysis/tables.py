"""What the runs hold as table columns, and the tables of a report: markdown tables of settings (mean ± std,
95 % intervals) and CSV rows of runs and settings.

Column keys: ``"<attack>@<eps label>"`` for the engine's robust metrics (``"pgd-linf@8/255"``), the task's
extra columns by name (``"textattack/pwws/attack_success_rate"``, see ``Task.extra_columns``). An extra
column named ``.../<headline>_under_attack`` is a robust metric too: it joins the clean/robust table and the
figures. Nothing here knows a task.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from samat.common.results import Cost
from samat.common.stats import Stat
from samat.common.tables import format_table

from .runs import Run, Setting, eps_value, portable_path

Getter = Callable[[Run], Optional[float]]
COST_FIELDS = tuple(f.name for f in fields(Cost))
# Headings of extra-column groups whose usual spelling is not their key; other groups show their key.
GROUP_TITLES = {"textattack": "TextAttack"}
# Words shortened in column titles, so that tables stay narrow.
SHORT_WORDS = {"accuracy": "acc."}


# ----------------------------------------------------------------------------------------------- columns


def robust_keys(runs: Sequence[Run]) -> list[str]:
    """The engine's robust keys: attacks in the order the engine writes them (pgd-linf first), radii
    ascending."""
    keys = list(OrderedDict((k, None) for r in runs for k in r.robust))
    attacks = list(OrderedDict((k.partition("@")[0], None) for k in keys))
    return sorted(keys, key=lambda k: (attacks.index(k.partition("@")[0]), eps_value(k.partition("@")[2])))


def extra_columns(runs: Sequence[Run]) -> list[str]:
    """Every extra column any run has, in first-seen order."""
    return list(OrderedDict((k, None) for r in runs for k in r.columns))


def headline_keys(runs: Sequence[Run]) -> list[str]:
    """Robust keys, then the extra columns that are the headline metric under an attack."""
    suffix = f"{runs[0].headline}_under_attack"
    return robust_keys(runs) + [c for c in extra_columns(runs) if c.rpartition("/")[2] == suffix]


def sharpness_keys(runs: Sequence[Run]) -> list[str]:
    """``sam@rho`` measurements by radius, then ``asam@rho``."""
    keys = OrderedDict((k, None) for r in runs for k in r.sharpness)
    return sorted(keys, key=lambda k: (not k.startswith("sam@"), eps_value(k.partition("@")[2])))


def is_robust_key(key: str) -> bool:
    """``"pgd-linf@8/255"`` (an attack at a radius), as opposed to an extra column's name."""
    return "@" in key and "/" not in key.partition("@")[0]


def column_title(key: str) -> str:
    """A key as a table or axis title: ``"pgd-linf 8/255"``; an extra column without its group, words
    shortened: ``"textattack/deepwordbug/accuracy_under_attack"`` → ``"deepwordbug acc. under attack"``."""
    if is_robust_key(key):
        attack, _, label = key.partition("@")
        return f"{attack} {label}"
    parts = key.split("/")
    words = " ".join(parts[1:] if len(parts) > 1 else parts).replace("_", " ").split()
    return " ".join(SHORT_WORDS.get(w, w) for w in words)


def csv_name(key: str) -> str:
    """An extra column as a CSV column: ``"textattack_deepwordbug_accuracy_under_attack"``."""
    return key.replace("/", "_")


def number_format(values: Sequence[Optional[float]]) -> str:
    """Four decimals for values in [-1, 1] (rates, accuracies), one otherwise (counts, percentages)."""
    return "{:.4f}" if all(v is None or abs(v) <= 1 for v in values) else "{:.1f}"


# ------------------------------------------------------------------------------------------ markdown


def interval_text(st: Stat, fmt: str = "{:.4f}") -> str:
    """``mean [lo, hi]`` (95 % t-interval of the mean), an en dash without one (fewer than two seeds)."""
    if st.ci95 is None:
        return "–"
    return f"{fmt.format(st.mean)} [{fmt.format(st.mean - st.ci95)}, {fmt.format(st.mean + st.ci95)}]"


def seeds_text(s: Setting) -> str:
    """``"2 (0, 1)"``: how many runs, and their seeds."""
    seeds = sorted({r.seed for r in s.runs if r.seed is not None})
    return f"{len(s.runs)} ({', '.join(map(str, seeds))})" if seeds else str(len(s.runs))


def _headline_getters(runs: Sequence[Run]) -> list[tuple[str, Getter]]:
    """``(title, get)`` of the clean/robust table: clean, then :func:`headline_keys`."""
    return [(f"clean {runs[0].headline}", lambda r: r.clean)] + \
        [(column_title(k), lambda r, k=k: r.metric(k)) for k in headline_keys(runs)]


def headline_table(runs: Sequence[Run], settings: Sequence[Setting]) -> str:
    """One row per setting: runs (seeds), then mean ± std of clean and every robust metric."""
    getters = _headline_getters(runs)
    rows = [[s.name, seeds_text(s), *[s.of(get).text() for _, get in getters]] for s in settings]
    return format_table(["setting", "runs (seeds)", *[t for t, _ in getters]], rows, pad=False)


def interval_table(runs: Sequence[Run], settings: Sequence[Setting]) -> Optional[str]:
    """The clean/robust table as 95 % intervals; ``None`` where no setting has two seeds."""
    if all(len(s.runs) < 2 for s in settings):
        return None
    getters = _headline_getters(runs)
    rows = [[s.name, *[interval_text(s.of(get)) for _, get in getters]] for s in settings]
    return format_table(["setting", *[t for t, _ in getters]], rows, pad=False)


def column_group_tables(runs: Sequence[Run], settings: Sequence[Setting]) -> list[tuple[str, str]]:
    """``(heading, table)`` per group of extra columns (``group/row/field``, e.g. a TextAttack recipe's
    fields): a row per setting and row, a column per field, mean ± std."""
    groups: "OrderedDict[str, OrderedDict[str, dict[str, str]]]" = OrderedDict()
    for name in extra_columns(runs):
        group, _, rest = name.partition("/")
        row, _, fieldname = rest.rpartition("/")
        groups.setdefault(group, OrderedDict()).setdefault(row, {})[fieldname or rest] = name
    out = []
    for group, by_row in groups.items():
        names = list(OrderedDict((f, None) for cols in by_row.values() for f in cols))
        formats = {f: number_format([r.columns.get(c.get(f, "")) for r in runs for c in by_row.values()])
                   for f in names}
        table = [[s.name, row, *[s.of(lambda r, c=cols.get(f): r.columns.get(c)).text(formats[f]) for f in names]]
                 for s in settings for row, cols in by_row.items()]
        out.append((GROUP_TITLES.get(group, group),
                    format_table(["setting", group, *[column_title(f) for f in names]], table, pad=False)))
    return out


def cost_table(settings: Sequence[Setting]) -> str:
    """Wall times and pass counts per setting, and their ratios to the ERM setting's means."""
    erm = next((s for s in settings if s.method == "erm"), None)

    def ratio(st: Stat, key: str) -> str:
        base = erm.of(lambda r: r.cost.get(key)).mean if erm else math.nan
        return f"{st.mean / base:.2f}" if base and st.n and math.isfinite(base) else "–"

    rows = []
    for s in settings:
        cost = {k: s.of(lambda r, k=k: r.cost.get(k)) for k in COST_FIELDS}
        rows.append([s.name, cost["train_wall_s"].text("{:.1f}"), cost["eval_wall_s"].text("{:.1f}"),
                     *[cost[k].text("{:.0f}") for k in ("optimizer_steps", "forward_passes", "backward_passes")],
                     *[ratio(cost[k], k) for k in ("train_wall_s", "forward_passes", "forward_examples")]])
    return format_table(["setting", "train s", "eval s", "steps", "forward passes", "backward passes",
                         "train time × ERM", "forward passes × ERM", "forward examples × ERM"], rows, pad=False)


def sharpness_table(runs: Sequence[Run], settings: Sequence[Setting]) -> Optional[str]:
    """Sharpness per setting next to clean and the first attack's robust columns (the duality in one
    table); ``None`` where no run measured sharpness."""
    sharp = sharpness_keys(runs)
    if not sharp:
        return None
    keys = robust_keys(runs)
    first = [k for k in keys if k.partition("@")[0] == keys[0].partition("@")[0]] if keys else []
    rows = [[s.name, *[s.of(lambda r, k=k: r.sharpness.get(k)).text("{:.4g}") for k in sharp],
             s.of(lambda r: r.clean).text(), *[s.of(lambda r, k=k: r.robust.get(k)).text() for k in first]]
            for s in settings]
    return format_table(["setting", *sharp, f"clean {runs[0].headline}", *[column_title(k) for k in first]],
                        rows, pad=False)


# ------------------------------------------------------------------------------------------------ CSVs


def _csv_getters(runs: Sequence[Run], robust_suffix: str) -> "OrderedDict[str, Getter]":
    """Every number of a run by CSV column: clean, robust, extra columns, cost, sharpness."""
    headline = runs[0].headline
    getters: "OrderedDict[str, Getter]" = OrderedDict()
    getters[f"clean_{headline}"] = lambda r: r.clean
    for k in robust_keys(runs):
        getters[f"{k}{robust_suffix}"] = lambda r, k=k: r.robust.get(k)
    for k in extra_columns(runs):
        getters[csv_name(k)] = lambda r, k=k: r.columns.get(k)
    for c in COST_FIELDS:
        getters[f"cost_{c}"] = lambda r, c=c: r.cost.get(c)
    for k in sharpness_keys(runs):
        getters[f"sharpness_{k}"] = lambda r, k=k: r.sharpness.get(k)
    return getters


def csv_rows(runs: Sequence[Run], base: Optional[Path] = None) -> tuple[list[str], list[dict]]:
    """``results.csv``: one flat row per run, identity, every number, and where it ran. ``run_dir`` is relative
    to ``base`` (the CSV's folder; default: the working directory), never absolute, so that committed results
    hold no path of the machine that made them."""
    getters = _csv_getters(runs, robust_suffix=f"_{runs[0].headline}")
    header = ["run_dir", "task", "method", "setting", "seed", "rho", "train_eps", *getters,
              "sanity_passed", "device", "num_processes", "mixed_precision", "finished_at"]
    rows = []
    for r in runs:
        res = r.results
        row: dict[str, Any] = {"run_dir": portable_path(str(r.path.resolve()), base or Path.cwd()), "task": r.task, "method": r.method, "setting": r.label,
                               "seed": r.seed, "rho": r.rho, "train_eps": r.eps_label,
                               "sanity_passed": (res.sanity or {}).get("passed"), "device": res.device,
                               "num_processes": res.num_processes, "mixed_precision": res.mixed_precision,
                               "finished_at": res.finished_at}
        row.update({name: get(r) for name, get in getters.items()})
        rows.append(row)
    return header, rows


def summary_rows(runs: Sequence[Run], settings: Sequence[Setting]) -> tuple[list[str], list[dict]]:
    """``summary.csv``: one row per setting, mean, std and 95 % interval half-width of every number."""
    getters = _csv_getters(runs, robust_suffix="")
    header = ["setting", "method", "rho", "train_eps", "runs"]
    header += [f"{name}_{part}" for name in getters for part in ("mean", "std", "ci95")]
    rows = []
    for s in settings:
        row: dict[str, Any] = {"setting": s.name, "method": s.method, "rho": s.rho, "train_eps": s.eps_label,
                               "runs": len(s.runs)}
        for name, get in getters.items():
            st = s.of(get)
            row.update({f"{name}_mean": st.mean if st.n else None, f"{name}_std": st.std, f"{name}_ci95": st.ci95})
        rows.append(row)
    return header, rows
