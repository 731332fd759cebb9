"""A report of finished runs: ``report.md``, ``results.csv`` (one row per run), ``summary.csv`` (one row per
setting) and the figures, built in memory and then written, each file atomically.

Runs are read and grouped by :mod:`samat.analysis.runs`, tabulated by :mod:`samat.analysis.tables` and drawn
by :mod:`samat.analysis.figures`; ``scripts/report.py`` (``samat report``) is the command line.
"""

from __future__ import annotations

import os

from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from samat.common.errors import UsageError
from samat.common.files import csv_bytes, write_bytes_atomic

from .describe import data_used
from .runs import Run, Setting, find_unfinished, group, load_runs
from .tables import (column_group_tables, cost_table, csv_rows, headline_table, interval_table, sharpness_keys,
                     sharpness_table, summary_rows)

COST_NOTE = ("Wall times depend on the machine (see each run's `device`); the pass counts do not. `× ERM` "
             "compares means with the ERM setting of this report. Forward examples count a doubled "
             "clean+adversarial batch (TRADES, `--at_clean_weight`) twice; forward passes count it once.")
SHARPNESS_NOTE = ("Worst-case increase of the loss on a fixed evaluation subset within an L2 ball of radius rho "
                  "around the trained weights (`sam@rho`), or within the ASAM ball scaled by |w| + eta "
                  "(`asam@rho`); projected gradient ascent, eval mode (`common/sharpness.py`).")
INTERVAL_NOTE = ("95 % intervals of the mean (Student t with n − 1 degrees of freedom), as `mean [lo, hi]`, for "
                 "settings with two or more seeds; with few seeds they are wide, and honest about it.")


def _results_sections(runs: list[Run], settings: list[Setting]) -> list[str]:
    """Clean and robust (mean ± std, then 95 % intervals), the task's extra columns, cost, sharpness."""
    headline = runs[0].headline
    out = [f"## Clean and robust {headline}", "", headline_table(runs, settings), ""]
    intervals = interval_table(runs, settings)
    if intervals:
        out += ["### 95 % intervals", "", INTERVAL_NOTE, "", intervals, ""]
    for heading, table in column_group_tables(runs, settings):
        out += [f"## {heading}", "", table, ""]
    out += ["## Cost", "", COST_NOTE, "", cost_table(settings), ""]
    sharpness = sharpness_table(runs, settings)
    if sharpness:
        out += ["## Weight-space sharpness", "", SHARPNESS_NOTE, "", sharpness, ""]
    return out


def _sanity_section(runs: list[Run], unfinished: list[Path]) -> list[str]:
    """Runs whose sanity checks failed, and runs left unfinished."""
    failed = [r for r in runs if (r.results.sanity or {}).get("passed") is False]
    out = ["## Sanity", ""]
    if failed:
        out += ["Runs whose AutoAttack-style sanity checks FAILED (their robust numbers are suspect):", ""]
        out += [f"- `{r.path}`: " + ", ".join(c.get("name", "?") for c in r.results.sanity.get("checks") or []
                                               if isinstance(c, dict) and not c.get("passed", True))
                for r in failed]
    else:
        out += ["Every run that recorded sanity checks passed them."]
    out += [""]
    if unfinished:
        out += ["Unfinished runs (checkpoints, no results.json; `scripts/sweep.py` resumes them):", ""]
        out += [f"- `{p}`" for p in unfinished] + [""]
    return out


def run_pictures(runs: Sequence[Run]) -> list[tuple[Run, Path]]:
    """Pictures the runs' tasks drew into their run folders and named in results (``metrics.<block>.figure``,
    a file name relative to the run folder, e.g. segmentation's ``segmentations.png``), where the file exists."""
    out = []
    for r in runs:
        folder = r.path if r.path.is_dir() else r.path.parent
        for block in r.results.metrics.values():
            name = block.get("figure") if isinstance(block, dict) else None
            if isinstance(name, str) and (folder / name).is_file():
                out.append((r, folder / name))
    return out


def _pictures_section(runs: Sequence[Run], out_dir: Optional[Path]) -> list[str]:
    pictures = run_pictures(runs)
    if not pictures:
        return []
    lines = ["## Pictures", "", "Drawn by each run on fixed evaluation examples (the run's own file, linked)."
             "", ""]
    for r, path in pictures:
        link = Path(os.path.relpath(path.resolve(), out_dir.resolve())) if out_dir else path.resolve()
        lines += [f"### {r.label} (`{path.parent.name}`)", "", f"![{r.label}]({link.as_posix()})", ""]
    return lines


def build_markdown(runs: list[Run], settings: list[Setting], figures: list[tuple[str, str]],
                   unfinished: list[Path], sources: Sequence[str], out_dir: Optional[Path] = None) -> str:
    """``report.md``: ``figures`` are ``(file name, title)`` of the PNGs written beside it; the runs' own
    pictures are linked relative to ``out_dir`` (the report's folder; absolute paths without it)."""
    out = [f"# samat report: {runs[0].task}", "",
           f"{len(runs)} run(s) in {len(settings)} setting(s) from {', '.join(sources)}; headline metric "
           f"`{runs[0].headline}`; generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}.", "",
           *([data_used([r.results for r in runs]), ""] if data_used([r.results for r in runs]) else []),
           "Mean ± std over seeds (std with ddof=1, shown only for two or more seeds).", ""]
    out += _results_sections(runs, settings)
    out += _sanity_section(runs, unfinished)
    out += ["## Figures", ""] + [f"### {title}\n\n![{title}]({name})\n" for name, title in figures]
    out += _pictures_section(runs, out_dir)
    devices = OrderedDict((f"{r.results.device or '?'} × {r.results.num_processes} "
                           f"({r.results.mixed_precision})", None) for r in runs)
    out += ["## Runs", "", f"Devices: {', '.join(devices)}. One row per run in `results.csv`.", ""]
    return "\n".join(out)


def pick_sharpness_key(runs: Sequence[Run], wanted: Optional[str]) -> Optional[str]:
    """The sharpness measurement to plot: ``wanted`` (which some run must have), else the first SAM one."""
    available = sharpness_keys(runs)
    if wanted is not None and wanted not in available:
        raise UsageError(f"--sharpness: no run has {wanted!r}; available: {', '.join(available) or 'none'}")
    return wanted or (available[0] if available else None)


def build_report(paths: Sequence[str], sharpness_key: Optional[str] = None,
                 out_dir: Optional[Path] = None) -> dict[str, bytes]:
    """Every output file of the report as ``{name: bytes}``; nothing is written here, so a ``UsageError``
    leaves no half-written report behind. ``out_dir``: where it will be written (for links to the runs'
    own pictures)."""
    runs = load_runs(paths)
    settings = group(runs)
    sharp_key = pick_sharpness_key(runs, sharpness_key)
    from .figures import draw_figures  # matplotlib is slow to load: only once the input is known good

    figures = draw_figures(runs, settings, sharp_key)
    files = {name: png for name, _, png in figures}
    files["report.md"] = build_markdown(runs, settings, [(name, title) for name, title, _ in figures],
                                        find_unfinished(paths), paths, out_dir).encode()
    files["results.csv"] = csv_bytes(*csv_rows(runs, out_dir))
    files["summary.csv"] = csv_bytes(*summary_rows(runs, settings))
    return files


def write_report(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into ``out`` (created if missing), each atomically: a reader never sees half a file."""
    for name, data in files.items():
        write_bytes_atomic(out / name, data)
