#!/usr/bin/env python
"""Train one model with one method on one task, then measure clean and robust performance.

    accelerate launch scripts/run.py --task vision --method sam
    python scripts/run.py --task vision --method pgd-at --model small_cnn --max_steps 200
    python scripts/run.py --task text --help        # the flags of the text task

Precision and process count come from ``accelerate config`` / ``accelerate launch`` flags
(``--mixed_precision bf16``, ``--num_processes 8``). Every finished run writes ``<output_dir>/results.json``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional


from samat.common.cli import main_guard, read_config_file, setup_logging  # noqa: E402
from samat.common.offline import probe_hub  # noqa: E402
from samat.common.errors import UsageError  # noqa: E402


def _parser(task_args_cls):
    from samat.common.cli import hf_argument_parser
    from samat.common.config import EvalArgs, MethodArgs, RunArgs
    from samat.common.registry import METHODS, TASKS

    epilog = ("tasks: " + ", ".join(TASKS) + ". methods: "
              + "; ".join(f"{m.name} ({m.summary})" for m in METHODS.values())
              + ". Task-specific flags: `--task <task> --help`. Eps values accept fractions such as 8/255.")
    return hf_argument_parser([RunArgs, MethodArgs, EvalArgs, task_args_cls],
                              description=__doc__.split("\n\n")[0], epilog=epilog,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def _config_to_argv(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        if isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *(str(v) for v in value)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def parse(argv: list[str]):
    """The flags of one run, parsed: ``(run, method_args, eval_args, task)`` (the task object holds its own
    flags). ``--config`` file values come first, so command-line flags win. ``UsageError`` for an unknown
    task or flag."""
    from samat.common.errors import lookup
    from samat.common.registry import TASKS, task_class

    # Stage 1: which task (its flags join the parser) and which config file.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    file_values = read_config_file(known.config) if known.config else {}
    task_name = known.task or file_values.get("task") or "vision"
    lookup(TASKS, "task", task_name)
    task_cls = task_class(task_name)

    # Stage 2: the full typed parse.
    parser = _parser(task_cls.Args)
    argv = _config_to_argv({k: v for k, v in file_values.items() if k != "config"}) + list(argv)
    run, method_args, eval_args, task_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (flags of this task: "
                         f"scripts/run.py --task {task_name} --help)")
    return run, method_args, eval_args, task_cls(task_args)


def resolve(argv: list[str]):
    """Parse and check ``argv`` into ``(ResolvedRun, task)``, writing nothing (see
    :func:`samat.common.resolve.resolve_run`)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from samat.common.resolve import Engine, resolve_run

    run, method_args, eval_args, task = parse(argv)
    # The first PartialState fixes the process group for the whole run: without cpu=, a CPU multi-process
    # launch (ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu) became N independent single-process runs.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    return resolve_run(run, method_args, eval_args, task, on_gpu=state.device.type != "cpu",
                       engine=Engine.from_environment()), task


def main(argv: Optional[list[str]] = None) -> None:
    setup_logging()
    probe_hub()
    from samat.common.experiment import run_experiment

    resolved, task = resolve(sys.argv[1:] if argv is None else argv)
    run_experiment(resolved, task)


if __name__ == "__main__":
    main_guard(main, resumable=True)
