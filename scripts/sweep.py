#!/usr/bin/env python
"""Run a grid of methods × SAM rho × AT eps × seeds, one run after another, or print the commands.

    python scripts/sweep.py --task vision                      # the paper's grid, seed 0, into runs/sweep-vision
    python scripts/sweep.py --task vision --seeds 0 1 2 --launcher accelerate --accelerate_args "--num_processes 8"
    python scripts/sweep.py --task text --print > jobs.txt    # one command per line, for a cluster scheduler
    python scripts/sweep.py --methods erm sam --rho 0.05 -- --max_steps 200 --model small_cnn

A method gets the SAM radii if it has a rho (sam, asam, sam-at), the AT radii if it trains on adversarial
inputs (pgd-at, fgsm-at, trades, sam-at; sam-at gets every pair), and runs once per seed otherwise (erm).
Multi-step AT gets a PGD step of ``--alpha_ratio`` × eps, by default the task recipe's own ratio
(images eps/4, Madry et al.'s 2/255 at 8/255; text and segmentation eps/2).
Each run goes to ``<root>/<method>[_rho<rho>][_eps<eps>]_s<seed>``. On a re-run a folder with results.json is
skipped and one with checkpoints gets ``--resume`` (scripts/run.py continues it exactly), so an interrupted
sweep is finished by running the same command again. Flags after ``--`` go to every scripts/run.py call,
except method flags (``--train_steps``, ``--trades_beta``, ...), which go only to the methods that use them.
Then: ``python scripts/report.py <root>``. The planning and running are in ``samat.analysis.sweep``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from samat.analysis.sweep import (DEFAULT_METHODS, add_launch_flags, execute, plan, print_commands, run_subprocess,
                                  set_commands, split_at_double_dash)
from samat.common.cli import ArgumentParser
from samat.common.errors import UsageError
from samat.common.recipe import NORMS, PAPER_RHO_GRID
from samat.common.registry import METHODS, TASKS, task_recipe


def _grids() -> str:
    """Each task's AT grid and step ratio, read from its recipe."""
    recipes = [task_recipe(t) for t in TASKS]
    return "; ".join(f"{r.name}: " + ", ".join(f"{n} {' '.join(r.eps_grid(n))}" for n in NORMS)
                     + f", step {r.alpha_ratio:g} eps" for r in recipes)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       usage="%(prog)s [options] [-- run.py flags]")
    p.add_argument("--task", default="vision", help=f"Task: {', '.join(TASKS)}.")
    p.add_argument("--model", default=None, help="--model for every run (default: the task's default).")
    p.add_argument("--dataset", default=None, help="--dataset for every run (default: the task's default).")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help=f"Methods: {', '.join(METHODS)}.")
    p.add_argument("--rho", nargs="+", default=None,
                   help=f"SAM/ASAM radii. Default: the task's grid (the paper's {' '.join(PAPER_RHO_GRID)}).")
    p.add_argument("--train_eps", nargs="+", default=None,
                   help="AT radii (fractions like 8/255 allowed; text: relative to the mean embedding norm). "
                        f"Default: the task's grid for --train_norm ({_grids()}).")
    p.add_argument("--train_norm", default=None,
                   help=f"AT threat model, passed to the AT methods: {', '.join(NORMS)}. Default: the task's (images "
                        "linf, text l2).")
    p.add_argument("--alpha_ratio", type=float, default=None,
                   help="PGD step size of multi-step AT (pgd-at, trades, sam-at, ...) as a share of each train eps, "
                        "so every radius of the grid is attacked alike. Default: the task's own step ratio (listed "
                        "under --train_eps). 0 passes no --train_alpha, so each run takes its task's default. "
                        "fgsm-at keeps its own 1.25 eps.")
    p.add_argument("--seeds", nargs="+", default=["0"], help="Seeds; the report averages over them.")
    p.add_argument("--root", default=None, help="Folder of the runs. Default: runs/sweep-<task>.")
    add_launch_flags(p, "Print the commands of the runs still to do (one per line) instead of running them.")
    p.add_argument("--keep_going", action="store_true", help="Continue with the next run when one fails.")
    return p


def main(argv: Optional[Sequence[str]] = None, runner: Callable[[list[str]], int] = run_subprocess) -> int:
    argv, passthrough = split_at_double_dash(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        jobs = plan(args, passthrough)
        set_commands(jobs, args)
    except UsageError as err:
        print(f"sweep.py: error: {err}", file=sys.stderr)
        return 2
    if args.print_only:
        print_commands(jobs)
        return 0
    return execute(jobs, runner, args.keep_going)


if __name__ == "__main__":
    sys.exit(main())
