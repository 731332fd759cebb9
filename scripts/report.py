#!/usr/bin/env python
"""Gather finished runs (their results.json) into a report: tables, a CSV and figures.

    python scripts/report.py runs/sweep-vision                 # -> runs/sweep-vision/report/
    python scripts/report.py runs/a runs/b --out report_ab

Folders are searched recursively for ``results.json``; all runs must be of one task. Writes, into ``--out``:
``report.md`` (mean ± std over seeds per setting, and 95 % intervals where a setting has several seeds: clean
and robust headline metric, the task's extra result columns such as TextAttack's, cost, weight-space
sharpness), ``results.csv`` (one row per run), ``summary.csv`` (one row per setting) and the figures
``clean_vs_robust.png``, ``robust_vs_eps.png``, ``sweep_rho_eps.png``, ``cost.png`` and, where runs carry a
sharpness measurement, ``sharpness_vs_robust.png``.

A *setting* is a method with its SAM rho and/or AT eps (e.g. ``sam rho=0.05``, ``pgd-at eps=8/255``); runs
of one setting with different seeds are averaged (std with ddof=1; a single seed shows no std).
The work is done in ``samat.analysis`` (runs → tables → figures → report).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from samat.common.cli import ArgumentParser, main_guard
from samat.analysis.report import build_report, write_report


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="Runs folders (searched recursively) or results.json files.")
    p.add_argument("--out", default=None,
                   help="Folder for report.md, the CSVs and figures. Default: <first path>/report.")
    p.add_argument("--sharpness", default=None,
                   help="Which sharpness measurement to plot, e.g. sam@0.05 or asam@0.5. Default: the first SAM one.")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the report and write it; bad input raises ``UsageError`` before anything is written."""
    args = build_parser().parse_args(argv)
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (first.parent if first.is_file() else first) / "report"
    files = build_report(args.paths, args.sharpness, out)
    write_report(out, files)
    print(f"report: {out / 'report.md'} ({len(files)} files: {', '.join(files)})")
    return 0


if __name__ == "__main__":
    main_guard(main)
