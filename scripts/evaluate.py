#!/usr/bin/env python
"""Attack saved models without retraining: finished run folders and hub / timm / local models, side by side.

    samat evaluate runs/vision-erm-s0 runs/vision-sam-s0 --eval_attacks apgd --eval_linf 2/255 8/255
    samat evaluate --model timm:resnet18 --task vision --dataset uoft-cs/cifar10 --eval_attacks autoattack
    samat evaluate runs/text-erm-s0 runs/text-sam-s0 --textattack_recipes deepwordbug pwws
    accelerate launch scripts/evaluate.py runs/a runs/b --eval_attacks autoattack   # several processes

Prints one table (a row per model, a column per attack and radius) and writes each model's evaluation, a
results record like results.json, to ``<run>/evaluations/<suite>.json`` (``--output`` for ``--model``
models). Bad input (an unknown attack or suite, one the task cannot run, a folder that is not a finished
run, a model whose classes differ from the dataset's, radii in the wrong unit) is one ``error:`` line, exit
status 2, found before the first attack, and nothing is written.

A model is a finished run folder (its ``model/``, data and task flags come from its ``results.json``) or a
``--model`` (hub id, ``timm:<name>``, a built-in, a local folder) with ``--task`` and ``--dataset``. Each one is
built by the loop's own steps (``make_accelerator``, ``build`` with the saved folder as ``--model``,
``evaluate`` -> ``evaluate_all`` and the task's own evaluation, e.g. TextAttack recipes), so an evaluation
counts exactly as a run's does. Everything the user gave is checked, and every model built, before the first
attack; then each model's :class:`RunResults` is written atomically to ``<run>/evaluations/<suite>.json``
(``--output`` for ``--model`` models) and one table compares them all.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field, fields, make_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, get_type_hints

from samat.common.checkpoint import RESULTS_FILE
from samat.common.cli import main_guard, setup_logging
from samat.common.config import EvalArgs, RunArgs, non_default_fields, resolve_defaults
from samat.common.errors import UsageError, lookup
from samat.common.model_io import EVALUATIONS_DIR, MODEL_DIR, finished_run, task_from_record, write_model_card
from samat.common.offline import probe_hub
from samat.common.results import Cost, RunResults
from samat.common.tables import format_table
from samat.common.task import AttackSpec, Task

logger = logging.getLogger("samat")
EXTERNAL_METHOD = "external"  # the method of a --model nobody trained here: unknown


@dataclass
class _EvaluateOwnArgs:
    model: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Models to evaluate besides the run folders: hub ids, timm:<name>, built-in names or local "
                  "folders (a run's model/ too), with --task and --dataset."},
    )
    task: Optional[str] = field(
        default=None, metadata={"help": "Task of the --model models (default vision); run folders know theirs."}
    )
    output: str = field(
        default=EVALUATIONS_DIR,
        metadata={"help": "Folder for the evaluation files of --model models (<slug>-<suite>.json); run folders "
                  "get theirs in <run>/evaluations/<suite>.json."},
    )


# RunArgs fields that `samat evaluate` takes too: their type and help come from RunArgs; only what the default
# means here is said (a run folder's own value, or the task's for --model).
_SHARED_RUN_FLAGS = {
    "dataset": "Default: each run's own; the task's embedded dataset for --model.",
    "dataset_config": "",
    "eval_split": "Default: the run's, else 'test', else 'validation'.",
    "label_column": "Default: the run's.",
    "max_eval_samples": "Default: as many as the run evaluated (the same ones); for --model, all on a GPU and the "
                        "task's CPU subset on CPU.",
    "eval_batch_size": "",
    "seed": "Default: the run's (the example subset and the attacks' random starts).",
    "cpu_threads": "Default: every core.",
}


def _shared_field(name: str, default_note: str) -> tuple[str, Any, Any]:
    """``(name, Optional[type], field)`` of RunArgs' ``name`` with ``None`` (the run's value) as default."""
    run_field = {f.name: f for f in fields(RunArgs)}[name]
    help_text = run_field.metadata["help"].split(" Default:")[0]
    kind = get_type_hints(RunArgs)[name]
    return name, Optional[kind], field(default=None, metadata={"help": f"{help_text} {default_note}".strip()})


EvaluateArgs = make_dataclass("EvaluateArgs", [_shared_field(n, d) for n, d in _SHARED_RUN_FLAGS.items()],
                              bases=(_EvaluateOwnArgs,))
EvaluateArgs.__module__ = __name__
EvaluateArgs.__doc__ = "The flags of ``samat evaluate`` besides EvalArgs and the task's: what to evaluate and where."


@dataclass
class Target:
    """One model to evaluate: its row label, task, the run args that build it, how it was trained, where its
    evaluation file goes, and (for a run folder) the run."""

    label: str
    task: Task
    run: RunArgs
    method: str
    method_resolved: dict
    output: Path
    run_dir: Optional[Path] = None
    record: Optional[RunResults] = None
    specs: list[AttackSpec] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- parsing


def _run_task(path: str) -> Optional[str]:
    """The task of a finished run folder, or ``None`` when ``path`` is not one (checked properly later)."""
    try:
        return json.loads((Path(path) / RESULTS_FILE).read_text()).get("task")
    except (OSError, ValueError, AttributeError):
        return None


def parse(argv: Sequence[str]) -> tuple[EvaluateArgs, EvalArgs, Any, list[str]]:
    """``(evaluate args, eval args, task args or None, run folders)``. The task flags of one task join the
    parser: ``--task``'s, else the runs' when they are all of one task."""
    from samat.common.cli import hf_argument_parser
    from samat.common.registry import TASKS, task_class

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task")
    pre.add_argument("--model", nargs="*")
    known, rest = pre.parse_known_args(list(argv))
    if known.task is not None:
        lookup(TASKS, "task", known.task)
    run_tasks = {t for t in map(_run_task, [*rest, *(known.model or [])]) if t}
    # Whose task flags to parse: --task's; else the runs' when they are all of one task; else vision's.
    task_name = known.task or (next(iter(run_tasks)) if len(run_tasks) == 1 else None)
    task_name = task_name or (None if run_tasks else "vision")
    types: list = [EvaluateArgs, EvalArgs] + ([task_class(task_name).Args] if task_name else [])
    parser = hf_argument_parser(types, prog="samat evaluate", description=__doc__.split("\n\n")[0],
                                usage="samat evaluate [RUN ...] [--model NAME ...] [flags]",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Run folders come first. Task flags: add --task <task> --help.")
    parser.add_argument("runs", nargs="*", metavar="RUN", help="Finished run folders.")
    *parsed, remaining = parser.parse_args_into_dataclasses(args=list(argv), return_remaining_strings=True)
    if remaining:
        raise UsageError(f"unrecognized arguments: {' '.join(remaining)} (run folders come before the flags; "
                         "task flags need --task or runs of one task)")
    namespace = parsed.pop()
    ev, evals = parsed[0], parsed[1]
    task_args = parsed[2] if task_name else None
    if ev.task is None:
        ev.task = task_name  # --model models take the runs' task (None when the runs span tasks)
    return ev, evals, task_args, list(namespace.runs)


# ------------------------------------------------------------------------------------------ targets


def _slug(name: str) -> str:
    path = Path(name)
    base = path.parent.name if path.name == MODEL_DIR and path.parent.name else (path.name or name)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in (base if path.exists() else name))


def _check_attacks(task: Task, evals: EvalArgs) -> list[AttackSpec]:
    """The task's flags, radii (units) and suite, checked; the task's PGD specs."""
    from samat.common.resolve import attack_specs
    from samat.common.suites import resolve_suite

    task.check_args()
    specs = attack_specs(task, evals)
    resolve_suite(task, evals)
    return specs


def _suite_name(task: Task, evals: EvalArgs) -> str:
    from samat.common.suites import resolve_suite

    return resolve_suite(task, evals).name


def run_target(folder: str, ev: EvaluateArgs, evals: EvalArgs, task_args: Any) -> Target:
    """A finished run folder as a target: its task flags (explicit task flags of the same task on top), its
    data, split, subset and seed unless flags say otherwise, its saved model."""
    record = finished_run(folder)
    if ev.task is not None and ev.task != record.task:
        raise UsageError(f"run folder {folder!r} is a {record.task!r} run, not {ev.task!r}")
    explicit = non_default_fields(task_args) if task_args is not None and \
        isinstance(task_args, _task_args_type(record.task)) else {}
    task = task_from_record(record, explicit)
    known = {f.name for f in fields(RunArgs)}
    run = RunArgs(**{k: v for k, v in (record.config.get("run") or {}).items() if k in known})
    if ev.dataset is not None:  # another dataset: the run's split and columns do not apply to it
        run.dataset, run.dataset_config, run.eval_split, run.label_column = ev.dataset, None, None, None
    for name in ("dataset_config", "eval_split", "label_column", "max_eval_samples", "eval_batch_size", "seed"):
        if getattr(ev, name) is not None:
            setattr(run, name, getattr(ev, name))
    run.model = str(Path(folder) / MODEL_DIR)
    run.output_dir, run.log_with, run.resume, run.overwrite = str(folder), "none", False, False
    run.push_to_hub = False
    name = _slug(folder)
    return Target(label=name, task=task, run=run, method=record.method, method_resolved=record.method_resolved,
                  output=Path(folder) / EVALUATIONS_DIR / f"{_suite_name(task, evals)}.json",
                  run_dir=Path(folder), record=record)


def _task_args_type(task: str) -> type:
    from samat.common.registry import task_class

    return task_class(task).Args


def model_target(name: str, ev: EvaluateArgs, evals: EvalArgs, task_args: Any, on_gpu: bool) -> Target:
    """A ``--model`` as a target: ``--task`` with its flags, ``--dataset``, the task's defaults."""
    from samat.common.registry import task_class

    task_name = ev.task or "vision"
    cls = task_class(task_name)
    task = cls(task_args if task_args is not None else cls.Args())
    run = RunArgs(task=task_name, model=name, dataset=ev.dataset, dataset_config=ev.dataset_config,
                  eval_split=ev.eval_split, label_column=ev.label_column, max_eval_samples=ev.max_eval_samples,
                  eval_batch_size=ev.eval_batch_size, seed=ev.seed or 0, log_with="none", output_dir=ev.output,
                  cpu_threads=ev.cpu_threads)
    run, _, _ = resolve_defaults(run, evals, task.defaults, on_gpu=on_gpu)
    label = _slug(name)
    return Target(label=label, task=task, run=run, method=EXTERNAL_METHOD, method_resolved={},
                  output=Path(ev.output) / f"{label}-{_suite_name(task, evals)}.json")


def resolve_targets(ev: EvaluateArgs, evals: EvalArgs, task_args: Any, runs: list[str],
                    on_gpu: bool) -> list[Target]:
    """Every target, every flag checked against its task; ``UsageError`` before anything is built or written."""
    models = list(ev.model or [])
    if not runs and not models:
        raise UsageError("nothing to evaluate: give finished run folders and/or --model <hub id | timm:name | "
                         "folder> with --task and --dataset")
    # A run folder given as --model is evaluated as the run it is.
    runs = runs + [m for m in models if _run_task(m)]
    models = [m for m in models if not _run_task(m)]
    targets = [run_target(r, ev, evals, task_args) for r in runs]
    targets += [model_target(m, ev, evals, task_args, on_gpu) for m in models]
    seen: dict[Path, str] = {}
    for t in targets:
        t.specs = _check_attacks(t.task, evals)
        if t.output.exists() and not t.output.is_file():
            raise UsageError(f"{t.output} exists and is not a file; choose another --output")
        if t.output in seen:
            raise UsageError(f"{t.label} and {seen[t.output]} would both write {t.output}; evaluate them apart "
                             "or give --output")
        seen[t.output] = t.label
    return targets


# ---------------------------------------------------------------------------------------- evaluation


def evaluate_target(target: Target, built: Any, evals: EvalArgs, accelerator: Any) -> RunResults:
    """``experiment.evaluate`` on a built target; the record says how the model was trained, what was evaluated."""
    from accelerate.utils import set_seed

    from samat.common.experiment import evaluate

    set_seed(target.run.seed)
    started = time.perf_counter()
    results = evaluate(target.run, target.method, dict(target.method_resolved), evals, built.task, accelerator,
                       built, target.specs)
    results.cost = Cost(eval_wall_s=round(time.perf_counter() - started, 3))
    if target.record is not None:
        results.data["train_examples"] = target.record.data.get("train_examples")
        results.cost.optimizer_steps = target.record.cost.optimizer_steps
    else:
        results.data.pop("train_examples", None)
    results.config = {"evaluate": {"source": str(target.run_dir or target.run.model)}, "run": vars(target.run),
                      "eval": vars(evals), "task": vars(target.task.args)}
    results.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return results


def comparison_table(rows: list[tuple[str, RunResults]]) -> str:
    """One row per model: task, method, examples, headline metric clean and per (attack, eps), then the
    tasks' extra columns (e.g. TextAttack recipes)."""
    attacks = list(dict.fromkeys(f"{a} {e}" for _, r in rows for a, e, _ in r.robust()))
    extras = list(dict.fromkeys(c for _, r in rows for c in r.columns))
    header = ["model", "task", "method", "metric", "examples", "clean", *attacks, *extras]
    body = []
    for label, r in rows:
        robust = {f"{a} {e}": v for a, e, v in r.robust()}
        body.append([label, r.task, r.method, r.headline_metric, r.data.get("eval_examples"), r.clean,
                     *(robust.get(a) for a in attacks), *(r.columns.get(c) for c in extras)])
    return format_table(header, body)


def main(argv: Optional[Sequence[str]] = None) -> list[tuple[str, RunResults]]:
    """Parse, check, build every model, evaluate each, write the files, print the table. ``argv`` defaults to
    the command line."""
    setup_logging()
    probe_hub()  # before transformers/datasets are imported (the build imports them)
    from samat.common.experiment import build_for_evaluation, make_accelerator

    ev, evals, task_args, runs = parse(sys.argv[1:] if argv is None else argv)
    if ev.max_eval_samples is not None and ev.max_eval_samples < 0:
        raise UsageError(f"--max_eval_samples: {ev.max_eval_samples} must be >= 0")
    for flag in ("eval_batch_size", "cpu_threads"):
        if getattr(ev, flag) is not None and getattr(ev, flag) < 1:
            raise UsageError(f"--{flag}: {getattr(ev, flag)} must be >= 1")
    if evals.eval_steps < 1:
        raise UsageError(f"--eval_steps: {evals.eval_steps} must be >= 1")
    if evals.sharpness_examples is None:
        evals.sharpness_examples = 0  # a weight-space probe is not an attack: only when asked for
    accelerator = make_accelerator(RunArgs(output_dir=ev.output, log_with="none", cpu_threads=ev.cpu_threads))
    targets = resolve_targets(ev, evals, task_args, runs, on_gpu=accelerator.device.type != "cpu")

    built = []
    for t in targets:  # every model and dataset loads (classes checked) before the first attack
        from accelerate.utils import set_seed

        set_seed(t.run.seed)
        built.append(build_for_evaluation(t.run, t.task, accelerator))

    rows = []
    for t, b in zip(targets, built):
        logger.info("evaluating %s (%s, %s)", t.label, t.task.name, t.method)
        results = evaluate_target(t, b, evals, accelerator)
        if accelerator.is_main_process:
            results.write(t.output)
            if t.run_dir is not None:
                write_model_card(t.run_dir, t.record)
        rows.append((t.label, results))
    if accelerator.is_main_process:
        print(comparison_table(rows))
        for label, r in rows:
            problems = r.all_warnings()
            if problems:
                print(f"{label}: WARNING: " + "; WARNING: ".join(problems))
        print("evaluations: " + ", ".join(str(t.output) for t in targets))
    accelerator.wait_for_everyone()
    return rows


if __name__ == "__main__":
    main_guard(main)
