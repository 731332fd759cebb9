#!/usr/bin/env python
"""Reproduce the paper's claims on one task: train the grid, then write a verdict per claim.

    samat reproduce --task vision --scale quick          # low-powered, minutes on a 2-core CPU
    samat reproduce --task vision --scale cpu            # small CNN, 40 epochs, SAM rho 0.1 and PGD-3 AT 2/255, 3 seeds
    samat reproduce --task text --scale gpu --seeds 5
    samat reproduce --task vision --scale gpu --print    # the commands only, for a scheduler
    samat reproduce --task vision --scale quick -- --epochs 8     # run.py flags for every run, after --
    samat reproduce --task vision --scale cpu --efficient_sam     # + every efficient SAM variant (issues 12, 22)

Trains ERM, SAM over the preset's rho grid and PGD-AT over its eps grid, each with every seed, through the
sweep machinery (a finished run is skipped, an interrupted one resumed: rerun the same command to finish), then
writes ``<root>/verdicts.md`` and ``verdicts.json``: the table (mean ± 95 % interval over seeds, clean and robust
per radius, passes per step) and, for claims (a) SAM is more robust than ERM at no clean cost, (b) AT is more
robust still but loses clean accuracy, (c) SAM costs ~2 passes per step and PGD-K AT ~K+1, a verdict — holds,
does not hold, inconclusive at this sample size — with the paired-by-seed effect, its 95 % interval and the rule
that decided it (``samat.analysis.verdicts``). Exit status: 0 all runs finished, 1 a run failed (the verdicts
use the runs that finished, and say which are missing), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from samat.analysis.efficient import EFFICIENT
from samat.analysis.reproduce import PRESETS, SCALES, TASKS, plan_reproduction, run_jobs, write_verdicts
from samat.analysis.sweep import add_launch_flags, print_commands, run_subprocess, set_commands, split_at_double_dash
from samat.common.cli import ArgumentParser, main_guard
from samat.common.errors import UsageError
from samat.common.registry import METHODS, UPDATE_RULES


def _variants_help() -> str:
    """Each variant's summary and default hyper-parameters, from the registry."""
    parts = []
    for name in EFFICIENT:
        rule = UPDATE_RULES[METHODS[name].update]
        defaults = ", ".join(f"{k} {v:g}" for k, v in rule.defaults.items() if k != "rho")
        parts.append(f"{name}: {rule.summary}" + (f" [{defaults}]" if defaults else ""))
    return "; ".join(parts).replace("%", "%%") + "."


def build_parser() -> argparse.ArgumentParser:
    scales = "; ".join(f"{t}/{s}: {p.summary}; {p.seeds} seeds" for (t, s), p in PRESETS.items() if t == "vision")
    suites: dict[str, list[str]] = {}  # each preset's default suite, read from the presets so it cannot drift
    for (task, scale), preset in PRESETS.items():
        suites.setdefault(preset.eval_attacks, []).append(f"{task}/{scale}")
    suite_defaults = "; ".join(f"{suite} for {', '.join(names)}" for suite, names in suites.items())
    p = ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [options] [-- run.py flags]")
    p.add_argument("--task", default="vision", help=f"Task: {', '.join(TASKS)} (default: vision).")
    p.add_argument("--scale", default="quick",
                   help=f"Preset: {', '.join(SCALES)}. quick is low-powered (minutes on a CPU; checks the protocol, "
                        f"not the paper; the default); cpu fits a CPU; gpu is the paper's grid on full data. Vision: "
                        f"{scales}.")
    p.add_argument("--seeds", type=int, default=None,
                   help="Number of seeds (0 .. N-1), the same for every method so that runs pair by seed. Default: "
                        f"the preset's ({' or '.join(sorted({str(p.seeds) for p in PRESETS.values()}))}). Fewer "
                        "than 2 gives no interval: every verdict is inconclusive.")
    p.add_argument("--root", default=None, help="Folder of the runs and the verdicts. Default: "
                                                "runs/reproduce-<task>-<scale>.")
    p.add_argument("--results_dir", default=None,
                   help="Folder of the verdicts and of every run's results.json (the evidence to commit; no "
                        "checkpoints or models). Default: results/reproduce-<task>-<scale> with the default --root, "
                        "else the root.")
    p.add_argument("--allow_unlike", action="store_true",
                   help="Pair runs that differ in more than method, method flags and seed (recipe, evaluation "
                        "examples, attacks, suite) with a warning in the verdicts, instead of refusing.")
    p.add_argument("--eval_attacks", default=None,
                   help="Attack suite for every run (quoted if several names): pgd, apgd, autoattack or attack "
                        f"names. Default: the preset's: {suite_defaults}.")
    p.add_argument("--efficient_sam", nargs="*", default=None, metavar="VARIANT",
                   help=f"Also train efficient SAM variants ({', '.join(EFFICIENT)}; alone: all "
                        f"{len(EFFICIENT)}) at the preset's pre-specified rho, every seed, and add their "
                        "cost-vs-robustness frontier to the verdicts (passes x ERM counted in examples, share of "
                        "SAM's robust gain kept, Fieller 95 %% interval; efficient_frontier.png). "
                        + _variants_help())
    p.add_argument("--looks", type=int, default=1,
                   help="How many times the efficient SAM frontier of these runs has been looked at while seeds "
                        "were added, this time included (default 1: the seed count was fixed before any result). "
                        "With N > 1, 'meets goal' is decided by two-sided 1 - 0.05/N intervals (Bonferroni over "
                        "the looks), shown beside the 95 %% ones, so adding seeds until a look decides keeps the "
                        "error under 5 %%. Needs --efficient_sam.")
    add_launch_flags(p, "Print the commands of the runs still to do, one per line, and stop.")
    p.add_argument("--verdicts_only", action="store_true",
                   help="Train nothing: write the verdicts from the runs already finished under --root (e.g. "
                        "while a scheduler runs the --print commands); unfinished runs are listed as such.")
    return p


def main(argv: Optional[Sequence[str]] = None, runner: Callable[[list[str]], int] = run_subprocess) -> int:
    argv, passthrough = split_at_double_dash(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.print_only and args.verdicts_only:
        raise UsageError("--print and --verdicts_only: choose one")
    if args.looks < 1:
        raise UsageError(f"--looks {args.looks}: must be 1 or more (the looks at the frontier, this one included)")
    if args.looks > 1 and args.efficient_sam is None:
        raise UsageError(f"--looks {args.looks}: it adjusts the efficient SAM frontier's intervals; pass "
                         "--efficient_sam, or leave --looks out")
    if args.looks > 1 and args.print_only:
        raise UsageError(f"--looks {args.looks} with --print: --print writes no verdicts to adjust; leave one out")
    efficient = [] if args.efficient_sam is None else (args.efficient_sam or list(EFFICIENT))
    rep = plan_reproduction(args.task, args.scale, args.seeds, args.root, args.eval_attacks, passthrough, efficient)
    set_commands(rep.jobs, args)
    if args.print_only:
        print_commands(rep.jobs)
        return 0
    code = 0 if args.verdicts_only else run_jobs(rep, runner)
    results_dir = Path(args.results_dir or (f"results/reproduce-{rep.task}-{rep.scale}" if args.root is None
                                            else rep.root))
    verdict_table, settings_table, notes, frontier_table = write_verdicts(rep, results_dir, args.allow_unlike,
                                                                          args.looks)
    if rep.preset.low_powered:
        print("\nLOW-POWERED (--scale quick): these verdicts check that the protocol runs; they are not evidence.")
    print(f"\n{settings_table}\n\n{verdict_table}\n" + "".join(f"\nnote: {n}" for n in notes)
          + (f"\n\nEfficient SAM (cost vs share of SAM's robust gain kept):\n{frontier_table}" if frontier_table else "")
          + f"\n\nreproduce: {results_dir / 'verdicts.md'} "
          f"(rules, intervals, notes) and verdicts.json", flush=True)
    return code


if __name__ == "__main__":
    main_guard(lambda: sys.exit(main()))
