"""A sweep: a grid of methods × SAM rho × AT eps × seeds planned as ``scripts/run.py`` calls, each into its
own folder, and run one after another as subprocesses (or printed for a scheduler).

A method gets the SAM radii if it has a rho, the AT radii if it trains on adversarial inputs (every pair for
both), and runs once per seed otherwise. A folder with results.json is skipped and one with a checkpoint gets
``--resume`` (:func:`samat.analysis.runs.run_status`), so running the same sweep again finishes it.
``scripts/sweep.py`` (``samat sweep``) is the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional, Sequence

import samat.scripts as _scripts
from samat.common.config import MAX_RHO, MethodArgs, parse_eps
from samat.common.errors import UsageError
from samat.common.recipe import NORMS, check_choice
from samat.common.registry import METHODS, TASKS, task_recipe

from .runs import NOT_RECIPE, RESULTS_FILE, run_status

RUN_PY = Path(_scripts.__file__).resolve().with_name("run.py")

DEFAULT_METHODS = ("erm", "sam", "pgd-at")


def method_flags() -> dict[str, set[str]]:
    """``{method: MethodArgs fields it reads}``, from the engine's (torch-free) registry."""
    return {name: set(m.flags) for name, m in METHODS.items()}


def _method_arg_names() -> set[str]:
    from dataclasses import fields

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
    value = parse_eps(text, pixel_space=pixel_space, flag="--train_eps")
    if value == 0:
        raise UsageError(f"--train_eps: {text!r} must be > 0 (AT at eps 0 is ERM; add erm to --methods)")
    return value


def alpha_for(eps_text: str, ratio: float) -> str:
    """The PGD step size ``ratio * eps`` written exactly: ``alpha_for("8/255", 0.25) == "2/255"``."""
    value = Fraction(eps_text.strip()) * Fraction(ratio).limit_denominator(1000)
    return str(value) if value.denominator != 1 else str(value.numerator)


def split_at_double_dash(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(own flags, run flags)``: what comes before ``--`` and what comes after it (for every run)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


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


SWEEP_FLAGS = ("task", "method", "seed", "output_dir", "resume", "overwrite", "rho", "train_eps")


def flag_name(group: Sequence[str]) -> str:
    """``["--train_steps=3"]`` or ``["--train_steps", "3"]`` → ``"train_steps"``."""
    return group[0][2:].split("=")[0]


@dataclass
class Grid:
    """A checked sweep request: the values :func:`plan` crosses, and the flags passed to every run."""

    task: str
    methods: list[str]
    rhos: list[str]
    epss: list[str]
    seeds: list[str]
    train_norm: str
    alpha_ratio: float
    root: Path
    passthrough: list[list[str]]
    fixed: list[str]  # --model / --dataset for every run


def check_grid(args: argparse.Namespace, passthrough: Sequence[str]) -> Grid:
    """The sweep's flags checked and filled from the task's recipe (:func:`samat.common.registry.task_recipe`);
    ``UsageError`` for the first bad one."""
    if args.task not in TASKS:
        raise UsageError(f"--task: unknown task {args.task!r}; choose one of: {', '.join(TASKS)}")
    recipe = task_recipe(args.task)
    check_choice("--train_norm", args.train_norm, NORMS)
    norm = args.train_norm or recipe.defaults.train_norm
    flags = method_flags()
    methods = _unique(args.methods)
    for m in methods:
        if m not in flags:
            raise UsageError(f"--methods: unknown method {m!r}; choose one of: {', '.join(flags)}")
    rhos = _unique(args.rho or recipe.rho_grid)
    for r in rhos:
        parse_rho(r)
    epss = _unique(args.train_eps or recipe.eps_grid(norm))
    for e in epss:
        parse_train_eps(e, recipe.pixel_space and norm == "linf")
    seeds = _unique(args.seeds)
    for s in seeds:
        if not s.isdigit():
            raise UsageError(f"--seeds: {s!r} is not a non-negative integer")
    ratio = recipe.alpha_ratio if args.alpha_ratio is None else args.alpha_ratio
    if not (math.isfinite(ratio) and 0 <= ratio <= 1):
        raise UsageError(f"--alpha_ratio: {ratio!r} must be in [0, 1]")
    groups = split_passthrough(passthrough)
    for g in groups:
        if flag_name(g) in SWEEP_FLAGS:
            raise UsageError(f"after --: {g[0]} is set by the sweep itself (use the sweep's own flags)")
    fixed = (["--model", args.model] if args.model else []) + (["--dataset", args.dataset] if args.dataset else [])
    return Grid(args.task, methods, rhos, epss, seeds, norm, ratio,
                Path(args.root or f"runs/sweep-{args.task}"), groups, fixed)


def _run_args(grid: Grid, method: str, rho: Optional[str], eps: Optional[str], seed: str, out: Path) -> list[str]:
    """The scripts/run.py flags of one run. Method flags after ``--`` go only to the methods that read
    them (run.py refuses the others)."""
    reads = method_flags()[method]
    passed = {flag_name(g) for g in grid.passthrough}
    args = ["--task", grid.task, "--method", method, *grid.fixed]
    args += ["--rho", rho] if rho else []
    args += ["--train_eps", eps, "--train_norm", grid.train_norm] if eps else []
    if eps and grid.alpha_ratio > 0 and {"train_alpha", "train_steps"} <= reads and "train_alpha" not in passed:
        args += ["--train_alpha", alpha_for(eps, grid.alpha_ratio)]
    args += ["--seed", seed, "--output_dir", str(out)]
    method_args = _method_arg_names()
    for g in grid.passthrough:
        if not (flag_name(g) in method_args and flag_name(g) not in reads):
            args += g
    return args


def plan(args: argparse.Namespace, passthrough: Sequence[str]) -> list[Job]:
    """Check the grid and list its runs in order (methods, then rho/eps, then seeds), each marked
    ``done``/``resume``/``new``. Raises ``UsageError`` before anything is run or written, also for a finished
    run made with other flags (:func:`_check_finished`)."""
    grid = check_grid(args, passthrough)
    jobs = []
    for m in grid.methods:
        flags = method_flags()[m]
        for rho in grid.rhos if "rho" in flags else [None]:
            for eps in grid.epss if "train_eps" in flags else [None]:
                for seed in grid.seeds:
                    name = m + (f"_rho{rho}" if rho else "") + (f"_eps{_safe(eps)}" if eps else "") + f"_s{seed}"
                    out = grid.root / name
                    jobs.append(Job(name, out, _run_args(grid, m, rho, eps, seed, out), run_status(out)))
    _check_finished(grid.root, jobs)
    for job in jobs:
        if job.status == "resume":
            job.args.append("--resume")
    return jobs


# How a run was started or where it was written, not what it is: a root that was moved or linked, threads, logs.
_HOW_STARTED = (NOT_RECIPE - {"task", "method", "seed"}) | {"output_dir"}


def _same(a, b) -> bool:
    """Equal once both are as results.json holds them (tuples as lists, numbers as numbers)."""
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def _recorded_config(path: Path) -> dict:
    """The ``config`` block of a finished run's results.json; ``{}`` where the file holds none it can read
    (which run is finished stays :func:`samat.analysis.runs.run_status`'s rule; the reports check the files)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    config = doc.get("config") if isinstance(doc, dict) else None
    return config if isinstance(config, dict) else {}


def _check_finished(root: Path, jobs: Sequence[Job]) -> None:
    """Refuse a finished run whose results.json records other flags than the ones this request plans for it.

    A run is skipped as done when its folder holds a results.json; without this check, a run made by another
    request (a sweep or reproduction with other flags after ``--`` into the same root, ``reproduce
    --verdicts_only`` on a root filled by hand, a run copied or linked in) would count as this request's.
    Compared: the method flags in full (results.json records them as given), and every other flag the planned
    command sets itself (the rest of the record is filled by the task's recipe). A record that lacks a flag (an
    older schema) is not compared on it."""
    done = [j for j in jobs if j.status == "done"]
    if not done:
        return
    from samat.common.config import non_default_fields
    from samat.scripts.run import parse

    for job in done:
        recorded = _recorded_config(job.output_dir / RESULTS_FILE)
        run, method, evals, task = parse(job.args)
        planned = {"method": asdict(method), "run": non_default_fields(run), "eval": non_default_fields(evals),
                   "task": non_default_fields(task.args)}
        differ = []
        for block, values in planned.items():
            record = recorded.get(block)
            if not isinstance(record, dict):
                continue
            for key, value in values.items():
                if key in record and key not in _HOW_STARTED and not _same(value, record[key]):
                    differ.append(f"--{key} {record[key]!r} there, {value!r} here")
        if differ:
            raise UsageError(f"--root {root}: {job.name} finished with other flags than this request plans for it "
                             f"({'; '.join(differ)}); its results would be reported as this request's: use "
                             "another --root, or move that run out")


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


def add_launch_flags(parser: argparse.ArgumentParser, print_help: str) -> None:
    """The flags every grid command shares (``samat sweep``, ``samat reproduce``): how a run is started, and
    ``--print`` (``print_help`` says what is printed)."""
    parser.add_argument("--launcher", default="python", choices=["python", "accelerate"],
                        help="Start each run with `python scripts/run.py` or `accelerate launch scripts/run.py`.")
    parser.add_argument("--accelerate_args", default="",
                        help="Arguments for `accelerate launch`, e.g. \"--num_processes 8 --mixed_precision bf16\".")
    parser.add_argument("--print", dest="print_only", action="store_true", help=print_help)


def set_commands(jobs: Sequence[Job], args: argparse.Namespace) -> None:
    """Each job's full command from the launch flags (:func:`add_launch_flags`); ``UsageError`` for
    ``--accelerate_args`` without ``--launcher accelerate``. ``--print`` writes portable commands."""
    if args.accelerate_args and args.launcher != "accelerate":
        raise UsageError("--accelerate_args needs --launcher accelerate")
    prefix = launcher_prefix(args.launcher, args.accelerate_args, portable=args.print_only)
    for job in jobs:
        job.command = prefix + job.args


def print_commands(jobs: Sequence[Job]) -> None:
    """The commands of the runs still to do, one per line on stdout (finished ones noted on stderr)."""
    for job in jobs:
        if job.status == "done":
            print(f"# finished, skipped: {job.output_dir}", file=sys.stderr)
        else:
            print(shlex.join(job.command))


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
