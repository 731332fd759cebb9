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
Then: ``python scripts/report.py <root>``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional, Sequence

from samat.common.cli import ArgumentParser  # noqa: E402
from samat.common.errors import UsageError  # noqa: E402

RUN_PY = Path(__file__).resolve().with_name("run.py")

# The paper's grid (Zhang et al. 2024): SAM rho 0.05-0.5 and AT L-inf radii 1-8/255 for images. Text radii
# are relative to the mean token-embedding norm (text/task.py); the L-inf ladder keeps the images' 1:2:4:8
# ratios around the text task's default L-inf AT radius (0.001), the L2 ladder around its L2 default (0.02).
# alpha_ratio: multi-step AT's PGD step as a share of eps, as each task's own defaults have it at its default
# eps (images 2/255 at 8/255; text eps/2).
TASK_GRIDS: dict[str, dict] = {
    "vision": {"pixel_space": True, "rho": ("0.05", "0.1", "0.2", "0.5"), "alpha_ratio": 0.25,
               "train_eps": {"linf": ("1/255", "2/255", "4/255", "8/255"), "l2": ("0.125", "0.25", "0.5", "1.0")}},
    "segmentation": {"pixel_space": True, "rho": ("0.05", "0.1", "0.2", "0.5"), "alpha_ratio": 0.25,
                     "train_eps": {"linf": ("1/255", "2/255", "4/255", "8/255"),
                                   "l2": ("0.125", "0.25", "0.5", "1.0")}},
    "text": {"pixel_space": False, "rho": ("0.05", "0.1", "0.2", "0.5"), "alpha_ratio": 0.5,
             "train_eps": {"linf": ("0.00025", "0.0005", "0.001", "0.002"), "l2": ("0.005", "0.01", "0.02", "0.04")}},
}
DEFAULT_METHODS = ("erm", "sam", "pgd-at")
MAX_RHO = 10.0  # scripts/run.py's own bound (common/config.py)

def method_flags() -> dict[str, set[str]]:
    """``{method: MethodArgs fields it reads}``, from the engine's registry."""
    from samat.common.methods import METHODS

    return {name: set(m.flags) for name, m in METHODS.items()}


def _method_arg_names() -> set[str]:
    from dataclasses import fields

    from samat.common.config import MethodArgs

    return {f.name for f in fields(MethodArgs)}


@dataclass
class Job:
    """One scripts/run.py call. ``status``: ``done`` (results.json; skipped), ``resume`` (checkpoints) or
    ``new``."""

    name: str
    output_dir: Path
    args: list[str]
    status: str = "new"
    command: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ validation


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def parse_rho(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--rho: {text!r} is not a number") from None
    if not (math.isfinite(value) and 0 < value <= MAX_RHO):
        raise UsageError(f"--rho: {text!r} must be in (0, {MAX_RHO:g}] (the paper uses 0.05-0.5)")
    return value


def parse_train_eps(text: str, pixel_space: bool) -> float:
    from samat.common.config import parse_eps

    value = parse_eps(text, pixel_space=pixel_space, flag="--train_eps")
    if value == 0:
        raise UsageError(f"--train_eps: {text!r} must be > 0 (AT at eps 0 is ERM; add erm to --methods)")
    return value


def alpha_for(eps_text: str, ratio: float) -> str:
    """The PGD step size ``ratio * eps`` written exactly: ``alpha_for("8/255", 0.25) == "2/255"``."""
    value = Fraction(eps_text.strip()) * Fraction(ratio).limit_denominator(1000)
    return str(value) if value.denominator != 1 else str(value.numerator)


def split_passthrough(tokens: Sequence[str]) -> list[list[str]]:
    """``["--a", "1", "--b", "--c", "x", "y"]`` → ``[["--a", "1"], ["--b"], ["--c", "x", "y"]]``."""
    groups: list[list[str]] = []
    for tok in tokens:
        if tok.startswith("--") or not groups:
            if not tok.startswith("--"):
                raise UsageError(f"after --: expected a flag such as --max_steps, got {tok!r}")
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


def _safe(text: str) -> str:
    """A radius as part of a folder name: ``8/255`` → ``8-255``."""
    return text.replace("/", "-")


def plan(args: argparse.Namespace, passthrough: Sequence[str]) -> list[Job]:
    """Validate the grid and list its runs in order (methods, then rho/eps, then seeds). Raises
    ``UsageError`` before anything is run or written."""
    if args.task not in TASK_GRIDS:
        raise UsageError(f"--task: unknown task {args.task!r}; choose one of: {', '.join(TASK_GRIDS)}")
    grid = TASK_GRIDS[args.task]
    flags = method_flags()
    methods = _unique(args.methods)
    for m in methods:
        if m not in flags:
            raise UsageError(f"--methods: unknown method {m!r}; choose one of: {', '.join(flags)}")
    if args.train_norm not in grid["train_eps"]:
        raise UsageError(f"--train_norm: {args.train_norm!r}; choose one of: {', '.join(grid['train_eps'])}")
    rhos = _unique(args.rho or grid["rho"])
    for r in rhos:
        parse_rho(r)
    epss = _unique(args.train_eps or grid["train_eps"][args.train_norm])
    for e in epss:
        parse_train_eps(e, grid["pixel_space"])
    seeds = _unique(args.seeds)
    for s in seeds:
        if not s.isdigit():
            raise UsageError(f"--seeds: {s!r} is not a non-negative integer")
    if args.alpha_ratio is None:
        args.alpha_ratio = grid["alpha_ratio"]
    if not (math.isfinite(args.alpha_ratio) and 0 <= args.alpha_ratio <= 1):
        raise UsageError(f"--alpha_ratio: {args.alpha_ratio!r} must be in [0, 1]")
    groups = split_passthrough(passthrough)
    passed = {g[0][2:].split("=")[0] for g in groups}
    method_args = _method_arg_names()
    for g in groups:
        name = g[0][2:].split("=")[0]
        if name in ("task", "method", "seed", "output_dir", "resume", "overwrite", "rho", "train_eps"):
            raise UsageError(f"after --: {g[0]} is set by the sweep itself (use the sweep's own flags)")

    jobs = []
    root = Path(args.root or f"runs/sweep-{args.task}")
    for m in methods:
        uses_rho, uses_eps = "rho" in flags[m], "train_eps" in flags[m]
        for rho in rhos if uses_rho else [None]:
            for eps in epss if uses_eps else [None]:
                for seed in seeds:
                    name = m + (f"_rho{rho}" if rho else "") + (f"_eps{_safe(eps)}" if eps else "") + f"_s{seed}"
                    out = root / name
                    run_args = ["--task", args.task, "--method", m]
                    run_args += ["--model", args.model] if args.model else []
                    run_args += ["--dataset", args.dataset] if args.dataset else []
                    run_args += ["--rho", rho] if rho else []
                    run_args += ["--train_eps", eps, "--train_norm", args.train_norm] if eps else []
                    if eps and args.alpha_ratio > 0 and {"train_alpha", "train_steps"} <= flags[m] \
                            and "train_alpha" not in passed:
                        run_args += ["--train_alpha", alpha_for(eps, args.alpha_ratio)]
                    run_args += ["--seed", seed, "--output_dir", str(out)]
                    for g in groups:  # method flags only where the method reads them (run.py refuses others)
                        name_ = g[0][2:].split("=")[0]
                        if name_ in method_args and name_ not in flags[m]:
                            continue
                        run_args += g
                    jobs.append(Job(name=name, output_dir=out, args=run_args))
    for job in jobs:
        job.status = status_of(job.output_dir)
        if job.status == "resume":
            job.args.append("--resume")
    return jobs


def status_of(output_dir: Path) -> str:
    """``done`` if the run finished, ``resume`` if it holds a checkpoint to continue from, else ``new``."""
    if (output_dir / "results.json").is_file():
        return "done"
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir() and any(p.is_dir() for p in checkpoints.glob("step_*")):
        return "resume"
    return "new"


# ------------------------------------------------------------------------------------------- execution


def launcher_prefix(launcher: str, accelerate_args: str, portable: bool) -> list[str]:
    """The command up to and including run.py. ``portable`` (for --print): ``python``/``accelerate`` and a
    path relative to the current folder, as a cluster job would write them."""
    run_py = os.path.relpath(RUN_PY) if portable else str(RUN_PY)
    if launcher == "python":
        return ["python" if portable else sys.executable, run_py]
    venv_accelerate = Path(sys.executable).with_name("accelerate")
    exe = "accelerate" if portable or not venv_accelerate.exists() else str(venv_accelerate)
    return [exe, "launch", *shlex.split(accelerate_args), run_py]


def run_subprocess(command: list[str]) -> int:
    """Run one job in the foreground. A SIGTERM to the sweep (a scheduler's preemption) is passed on, so the
    run can checkpoint and exit; the next sweep resumes it."""
    proc = subprocess.Popen(command)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def execute(jobs: list[Job], runner: Callable[[list[str]], int], keep_going: bool) -> int:
    """Run the pending jobs in order; returns the process exit status (0 all finished, 1 a run failed)."""
    pending = [j for j in jobs if j.status != "done"]
    done_before = len(jobs) - len(pending)
    print(f"sweep: {len(jobs)} runs, {done_before} already finished (skipped), {len(pending)} to run",
          flush=True)
    finished, failed = 0, []
    for i, job in enumerate(pending, 1):
        verb = "resuming" if job.status == "resume" else "running"
        print(f"sweep: [{i}/{len(pending)}] {verb} {job.name}: {shlex.join(job.command)}", flush=True)
        code = runner(job.command)
        if code == 0:
            finished += 1
            continue
        failed.append(job.name)
        print(f"sweep: {job.name} failed (exit {code})", file=sys.stderr, flush=True)
        if not keep_going:
            break
    print(f"sweep: {finished} finished now, {done_before} skipped, {len(failed)} failed"
          + (f" ({', '.join(failed)}); rerun the same command to retry" if failed else ""), flush=True)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                usage="%(prog)s [options] [-- run.py flags]")
    p.add_argument("--task", default="vision", help=f"Task: {', '.join(TASK_GRIDS)}.")
    p.add_argument("--model", default=None, help="--model for every run (default: the task's default).")
    p.add_argument("--dataset", default=None, help="--dataset for every run (default: the task's default).")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="Methods: erm, sam, asam, pgd-at, fgsm-at, trades, sam-at.")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
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
