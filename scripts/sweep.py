#!/usr/bin/env python
"""Run a grid of methods × SAM rho × AT eps × seeds, one run after another, or print the commands.

    python scripts/sweep.py --task vision                      # the paper's grid, seed 0, into runs/sweep-vision
    python scripts/sweep.py --task vision --seeds 0 1 2 --launcher accelerate --accelerate_args "--num_processes 8"
    python scripts/sweep.py --task text --print > jobs.txt    # one command per line, for a cluster scheduler
    python scripts/sweep.py --methods erm sam --rho 0.05 -- --max_steps 200 --model small_cnn

A method gets the SAM radii if it has a rho (sam, asam, sam-at), the AT radii if it trains on adversarial
inputs (pgd-at, fgsm-at, trades, sam-at; sam-at gets every pair), and runs once per seed otherwise (erm).
Multi-step AT gets a PGD step of ``--alpha_ratio`` × eps (images eps/4, Madry et al.'s 2/255 at 8/255).
Each run goes to ``<root>/<method>[_rho<rho>][_eps<eps>]_s<seed>``. On a re-run a folder with results.json is
skipped and one with checkpoints gets ``--resume`` (scripts/run.py continues it exactly), so an interrupted
sweep is finished by running the same command again. Flags after ``--`` go to every scripts/run.py call,
except method flags (``--train_steps``, ``--trades_beta``, ...), which go only to the methods that use them.
Then: ``python scripts/report.py <root>``. The planning and running are in ``samat.analysis.sweep``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable, Optional, Sequence

from samat.analysis.runs import METHOD_ORDER
from samat.analysis.sweep import (DEFAULT_METHODS, TASK_GRIDS, execute, launcher_prefix, plan, run_subprocess,
                                  split_at_double_dash)
from samat.common.cli import ArgumentParser
from samat.common.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       usage="%(prog)s [options] [-- run.py flags]")
    p.add_argument("--task", default="vision", help=f"Task: {', '.join(TASK_GRIDS)}.")
    p.add_argument("--model", default=None, help="--model for every run (default: the task's default).")
    p.add_argument("--dataset", default=None, help="--dataset for every run (default: the task's default).")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help=f"Methods: {', '.join(METHOD_ORDER)}.")
    p.add_argument("--rho", nargs="+", default=None,
                   help="SAM/ASAM radii. Default: the task's grid (0.05 0.1 0.2 0.5).")
    p.add_argument("--train_eps", nargs="+", default=None,
                   help="AT radii (fractions like 8/255 allowed). Default: the task's grid for --train_norm "
                        "(images L-inf: 1/255 2/255 4/255 8/255; text: relative to the mean embedding norm).")
    p.add_argument("--train_norm", default="linf", help="AT threat model, passed to the AT methods: linf or l2.")
    p.add_argument("--alpha_ratio", type=float, default=None,
                   help="PGD step size of multi-step AT (pgd-at, trades, sam-at) as a share of each train eps, so "
                        "every radius of the grid is attacked alike. Default: the task's ratio at its default eps "
                        "(images 0.25: Madry's 2/255 at 8/255; text 0.5). 0 leaves scripts/run.py's default "
                        "(a fixed 2/255 for images). fgsm-at keeps its own 1.25 eps.")
    p.add_argument("--seeds", nargs="+", default=["0"], help="Seeds; the report averages over them.")
    p.add_argument("--root", default=None, help="Folder of the runs. Default: runs/sweep-<task>.")
    p.add_argument("--launcher", default="python", choices=["python", "accelerate"],
                   help="Start each run with `python scripts/run.py` or `accelerate launch scripts/run.py`.")
    p.add_argument("--accelerate_args", default="",
                   help="Arguments for `accelerate launch`, e.g. \"--num_processes 8 --mixed_precision bf16\".")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="Print the commands of the runs still to do (one per line) instead of running them.")
    p.add_argument("--keep_going", action="store_true", help="Continue with the next run when one fails.")
    return p


def main(argv: Optional[Sequence[str]] = None, runner: Callable[[list[str]], int] = run_subprocess) -> int:
    argv, passthrough = split_at_double_dash(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.accelerate_args and args.launcher != "accelerate":
            raise UsageError("--accelerate_args needs --launcher accelerate")
        jobs = plan(args, passthrough)
    except UsageError as err:
        print(f"sweep.py: error: {err}", file=sys.stderr)
        return 2
    prefix = launcher_prefix(args.launcher, args.accelerate_args, portable=args.print_only)
    for job in jobs:
        job.command = prefix + job.args
    if args.print_only:
        for job in jobs:
            if job.status == "done":
                print(f"# finished, skipped: {job.output_dir}", file=sys.stderr)
            else:
                print(shlex.join(job.command))
        return 0
    return execute(jobs, runner, args.keep_going)


if __name__ == "__main__":
    sys.exit(main())
