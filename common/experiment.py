"""One run from flags to results.json: :func:`run_experiment` and its named steps (validate, claim the output
folder, build, train, save, evaluate, write). The optimizer-step loop itself is ``samat.common.loop``.

Precision and process count come from ``accelerate launch`` / ``accelerate config``. Resuming is exact on CPU
with a fixed seed: model, optimizer (momentum / Adam moments), scheduler, RNG states
and the data sampler are restored by ``accelerator.load_state``; the loop skips the batches already consumed
in the current epoch with ``skip_first_batches`` (the seeded sampler reproduces the epoch's order), and the
DataLoader has its own generator so creating an iterator never draws from the global RNG.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.logging import get_logger
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import RESULTS_FILE, TrainState, load_newest_readable, prepare_output_dir, save_checkpoint
from .config import EvalArgs, RunArgs
from .cost import PassCounter
from .data import LengthGroupedBatches, dataset_labels, eval_subset, example_lengths, train_subset
from .evaluate import evaluate_all
from .guard import DivergenceGuard, label_prior
from .guard import check_steps as guard_check_steps
from .loop import make_optimizer, make_scheduler, train
from .methods import StepContext
from .model_io import publish
from .registry import UPDATE_RULES
from .resolve import ResolvedRun
from .results import Cost, RunResults, baseline_columns, versions
from .saf import IndexedDataset, extra_memory, indexed_collate
from .sharpness import measure_sharpness
from .step import fp32_forward
from .suites import Suite, resolve_suite
from .task import AttackSpec, Task, TaskData

logger = get_logger("samat")


# ---------------------------------------------------------------------------------------------- setup


def set_cpu_threads(requested: Optional[int], accelerator: Any) -> int:
    """Set torch's intra-op CPU threads to ``requested``, or, when ``None`` on a single-process CPU run, to
    every core this process may use: ``accelerate launch`` without a config exports OMP_NUM_THREADS=1, which
    halved training speed on the 2-core machine. Returns the thread count in force."""
    if requested is None and accelerator.device.type == "cpu" and accelerator.num_processes == 1:
        requested = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested is not None and requested != torch.get_num_threads():
        logger.info("torch CPU threads: %d (was %d; --cpu_threads to choose)", requested, torch.get_num_threads())
        torch.set_num_threads(requested)
    return torch.get_num_threads()


@dataclass
class Evaluable:
    """What evaluation needs (:func:`build_for_evaluation`): the task as built (``TaskData.task``: it holds
    what the build learned, e.g. the tokenizer), the task's data, the evaluation subset and its loader, and the
    prepared model. ``train_examples``: the size of the training subset, when one was built."""

    task: Task
    data: TaskData
    eval_set: Any
    model: nn.Module
    eval_loader: Any
    train_examples: Optional[int] = None


@dataclass
class Prepared(Evaluable):
    """What :func:`build` hands to training and evaluation: besides :class:`Evaluable`, the training subset
    and its loader, the optimizer and the schedule, all prepared."""

    train_set: Any = None
    optimizer: Optional[torch.optim.Optimizer] = None
    train_loader: Any = None
    scheduler: Any = None
    total_steps: int = 0
    steps_per_epoch: int = 0  # optimizer steps per pass over the training subset (per process)


def run_experiment(resolved: ResolvedRun, task: Task) -> RunResults:
    """Train ``task`` as ``resolved`` says (:func:`samat.common.resolve.resolve_run` checked every flag before
    this is called), evaluate, write ``results.json``; returns the results record.

    The steps, in order: claim the folder, build, train, save the model, evaluate, write one record
    atomically."""
    run, method, evals, specs = resolved.run, resolved.method, resolved.evals, list(resolved.specs)
    config_record = resolved.config()
    accelerator = make_accelerator(run)
    output_dir = Path(run.output_dir)
    for note in resolved.notes:
        logger.info(note)
    if resolved.engine.sharded and accelerator.distributed_type.value.lower() != resolved.engine.sharded:
        logger.warning("the launch asked for %s, but Accelerate engaged %s (it shards on accelerators only): "
                       "this run is not sharded", resolved.engine.sharded, accelerator.distributed_type.value)
    if run.resume and (output_dir / RESULTS_FILE).is_file() and not run.overwrite:
        results = RunResults.read(output_dir / RESULTS_FILE)
        if accelerator.is_main_process:
            print(f"{output_dir} is finished; results.json:\n{results.table()}")
        return results
    resume_from = prepare_output_dir(run, output_dir, accelerator.is_main_process)
    if run.resume and resume_from is None:
        logger.info("--resume: no checkpoint in %s, starting from scratch", output_dir)
    accelerator.wait_for_everyone()
    from accelerate.utils import set_seed

    set_seed(run.seed)
    built = build(run, task, accelerator, indexed=UPDATE_RULES[method.method.update].needs_index)
    task = built.task  # from here on, the task as built
    # on the unwrapped model: the attacks call it directly, and a DDP wrapper's forward calls it too
    counter = PassCounter(accelerator.unwrap_model(built.model))
    state = TrainState(task=task.name)
    damaged: list[str] = []  # unreadable checkpoints passed over on --resume: warnings of the run
    if resume_from is not None:
        resume_from, loaded, damaged = load_newest_readable(accelerator, output_dir)
        for warning in damaged:
            logger.warning(warning)
        if loaded is not None:
            state = loaded
            state.task = task.name
            logger.info("resumed from %s at step %d", resume_from, state.step)
    PassCounter.copy_counts(state, counter)  # a resumed run continues the checkpoint's counts
    start_trackers(accelerator, run, config_record)

    ctx = StepContext(accelerator=accelerator, model=built.model, optimizer=built.optimizer, task=task,
                      method=method, max_grad_norm=run.max_grad_norm, total_steps=built.total_steps,
                      steps_per_epoch=built.steps_per_epoch)
    guard = make_guard(run, built, accelerator)
    state = train(ctx, built.train_loader, built.train_set, built.scheduler, run, built.total_steps, state,
                  counter, guard)
    save_checkpoint(accelerator, output_dir, state)
    counter.close()
    if guard:
        guard.close()
    save_model(accelerator, task, built.model, output_dir)

    eval_started = time.perf_counter()
    results = evaluate(run, method.method.name, method.describe(), evals, task, accelerator, built, specs,
                       resolved.suite)
    results.extra["engine"] = engine_record(resolved.engine, accelerator)
    held = extra_memory(built.optimizer, method.method.update)
    if held:  # SAF's stored outputs, MESA's EMA copy: the memory they pay instead of passes
        results.extra["extra_memory"] = held
    results.config = config_record
    results.warnings = damaged + results.warnings
    results.cost = Cost(train_wall_s=round(state.train_wall_s, 3),
                        eval_wall_s=round(time.perf_counter() - eval_started, 3),
                        optimizer_steps=state.step, train_examples=state.train_examples,
                        **{name: getattr(state, name) for name in PassCounter.FIELDS})
    finish(accelerator, run, results, output_dir, state.step)
    return results


def make_guard(run: RunArgs, built: Prepared, accelerator: Any) -> Optional[DivergenceGuard]:
    """The run's divergence guard (``None`` with ``--divergence_guard false``)."""
    if not run.divergence_guard:
        return None
    per_step = run.batch_size * run.gradient_accumulation_steps * accelerator.num_processes
    # the loss a model that learned only the label prior has, measured from the training labels
    prior = label_prior(dataset_labels(built.train_set), int(built.data.info.get("num_classes") or 0))
    return DivergenceGuard(accelerator.unwrap_model(built.model), lr=run.lr, warmup_ratio=run.warmup_ratio,
                           check_steps=guard_check_steps(built.total_steps, run.warmup_ratio, per_step),
                           prior=prior, poll_every=run.logging_steps, last_step=built.total_steps)


def engine_record(engine: Any, accelerator: Any) -> dict:
    """What results.json says of the distributed engine: what the launch asked for and what Accelerate
    engaged (on CPU, Accelerate runs an FSDP or DeepSpeed launch as DDP)."""
    return {"requested": engine.sharded or "none", "fsdp_version": engine.fsdp_version,
            "engaged": str(accelerator.distributed_type.value)}


def make_accelerator(run: RunArgs) -> Any:
    """The Accelerator (precision and processes come from ``accelerate launch``), seedable sampler, trackers
    logging into ``<output_dir>/logs``; torch's CPU threads set (see :func:`set_cpu_threads`)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    output_dir = Path(run.output_dir)
    accelerator = Accelerator(
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=run.find_unused_parameters)],
        log_with=None if run.log_with == "none" else run.log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_cpu_threads(run.cpu_threads, accelerator)
    return accelerator


def _task_data(run: RunArgs, task: Task, accelerator: Any) -> tuple[Task, TaskData, Any, DataLoader]:
    """The task as built, its data and model, the seeded evaluation subset and its (unprepared) loader."""
    with accelerator.main_process_first():
        data = task.build(run, accelerator)
    eval_set = eval_subset(data.eval_dataset, run)
    return data.task or task, data, eval_set, make_eval_loader(eval_set, run, data.collate_fn)


def make_eval_loader(eval_set: Any, run: RunArgs, collate_fn: Any) -> DataLoader:
    """The evaluation loader (clean pass, attacks, masking diagnostics). When the set can tell each example's
    length (:func:`common.data.example_lengths`, e.g. text), examples of similar length share a batch
    (:class:`common.data.LengthGroupedBatches`): the same examples, each evaluated once, and the same metric
    sums, with far less padding for the attacks to push through the model. What changes is which examples
    share a batch, hence each example's random attack start (drawn per batch) and the diagnostics' first
    examples. The sharpness probe and the task's own evaluation (TextAttack) read ``eval_set``, not this."""
    lengths = example_lengths(eval_set)
    if lengths is None:
        return DataLoader(eval_set, batch_size=run.eval_batch_size, shuffle=False, collate_fn=collate_fn,
                          num_workers=run.num_workers)
    return DataLoader(eval_set, batch_sampler=LengthGroupedBatches(lengths, run.eval_batch_size, run.seed + 1),
                      collate_fn=collate_fn, num_workers=run.num_workers)


def build_for_evaluation(run: RunArgs, task: Task, accelerator: Any) -> Evaluable:
    """Data, model and evaluation loader, prepared; no optimizer and no training loader (``samat evaluate``)."""
    built_task, data, eval_set, eval_loader = _task_data(run, task, accelerator)
    model, eval_loader = accelerator.prepare(data.model, eval_loader)
    return Evaluable(built_task, data, eval_set, model, eval_loader)


def build(run: RunArgs, task: Task, accelerator: Any, indexed: bool = False) -> Prepared:
    """Data and model from the task, the seeded subsets and loaders, optimizer and schedule, all prepared.
    ``indexed``: training batches also carry each example's position in the training set (``sample_index``,
    SAF's per-example memory; the same draws, so the run is otherwise unchanged)."""
    built_task, data, eval_set, eval_loader = _task_data(run, task, accelerator)
    train_set = train_subset(data.train_dataset, run)
    loader_generator = torch.Generator().manual_seed(run.seed)
    loader_set, collate = ((IndexedDataset(train_set), indexed_collate(data.collate_fn)) if indexed
                           else (train_set, data.collate_fn))
    train_loader = DataLoader(loader_set, batch_size=run.batch_size, shuffle=True, collate_fn=collate,
                              num_workers=run.num_workers, generator=loader_generator)
    optimizer = make_optimizer(data.model, run)
    batches_per_epoch = math.ceil(len(train_set) / (run.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / run.gradient_accumulation_steps)
    total_steps = run.max_steps or max(1, math.ceil(run.epochs * steps_per_epoch))
    scheduler = make_scheduler(optimizer, run, total_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        data.model, optimizer, train_loader, eval_loader, scheduler)
    return Prepared(built_task, data, eval_set, model, eval_loader, len(train_set), train_set, optimizer,
                    train_loader, scheduler, total_steps, steps_per_epoch)


def start_trackers(accelerator: Any, run: RunArgs, config_record: dict) -> None:
    if run.log_with == "none":
        return
    flat = {f"{group}/{k_}": (v if isinstance(v, (int, float, str, bool)) else str(v))
            for group, values in config_record.items() for k_, v in values.items()}
    accelerator.init_trackers("samat", config=flat)


def save_model(accelerator: Any, task: Task, model: nn.Module, output_dir: Path) -> None:
    """The unwrapped trained model into ``<output_dir>/model`` in the task's own format (main process)."""
    if accelerator.is_main_process:
        (output_dir / "model").mkdir(parents=True, exist_ok=True)
        task.save_model(accelerator.unwrap_model(model), str(output_dir / "model"))


def evaluate(run: RunArgs, method: str, method_resolved: dict, evals: EvalArgs, task: Task, accelerator: Any,
             built: Evaluable, specs: list[AttackSpec], suite: Optional[Suite] = None) -> RunResults:
    """Clean and robust metrics with sanity checks, the task's own evaluation and columns, sharpness.
    ``method``/``method_resolved``: how the model was trained (the method's name and its hyper-parameters).

    In fp32 unless ``--eval_precision train``: Accelerate's autocast comes off the model's forward (for good:
    training is over), so the clean pass, every attack, the task's own evaluation and the sharpness probe see
    the fp32 weights and inputs whatever the training precision."""
    precision = evals.eval_precision
    if precision == "fp32":
        accelerator.unwrap_model(built.model, keep_fp32_wrapper=False)  # in place: the forward without autocast
    evaluation = evaluate_all(built.model, task, built.eval_loader, accelerator, specs, evals.eval_steps,
                              suite=resolve_suite(task, evals) if suite is None else suite,
                              attack_collapsed=evals.attack_collapsed, precision=precision)
    unwrapped = accelerator.unwrap_model(built.model)
    # A collapsed model's evaluation stops after the clean pass: no task attacks (TextAttack), no sharpness.
    stopped = evaluation.get("attacks_skipped") is not None
    extra = {} if stopped else dict(task.extra_evaluation(unwrapped, accelerator, run))
    warnings = list(extra.pop("warnings", []))
    evaluation["metrics"].update(extra)
    sharpness = None
    if not stopped:
        with fp32_forward(unwrapped):  # always fp32: a rho-sized weight perturbation does not survive a bf16 cast
            sharpness = measure_sharpness(unwrapped, task, built.eval_set, built.data.collate_fn, evals,
                                          accelerator)
    return RunResults.from_dict({
        **evaluation,
        "task": task.name,
        "method": method,
        "headline_metric": task.headline_metric,
        "method_resolved": method_resolved,
        "data": {**built.data.info, "train_examples": built.train_examples, "eval_examples": len(built.eval_set)},
        "sharpness": sharpness,
        "columns": {**baseline_columns(evaluation.get("majority_baseline")),
                    **task.extra_columns(evaluation["metrics"])},
        "warnings": warnings,
        "device": _device_name(accelerator),
        "num_processes": accelerator.num_processes,
        "cpu_threads": torch.get_num_threads(),
        "mixed_precision": accelerator.mixed_precision,
        "eval_precision": "fp32" if precision == "fp32" or accelerator.mixed_precision == "no"
        else accelerator.mixed_precision,
        "versions": versions(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "schema_version": 1,
    })


def finish(accelerator: Any, run: RunArgs, results: RunResults, output_dir: Path, step: int) -> None:
    """Log to the trackers, write results.json (main process, atomically), print the table."""
    if run.log_with != "none":
        accelerator.log(_flat_metrics(results), step=step)
        accelerator.end_training()
    if accelerator.is_main_process:
        results.write(output_dir / RESULTS_FILE)
        publish(run, results)  # the model card from these results; --push_to_hub
        print(results.table())
        print(f"results: {output_dir / RESULTS_FILE}")
    accelerator.wait_for_everyone()


def _flat_metrics(results: RunResults) -> dict[str, float]:
    """Tracker scalars: clean metrics, the headline metric per attack and radius, the task's columns."""
    out = {f"eval/clean/{k}": v for k, v in results.metrics["clean"].items() if isinstance(v, float)}
    out.update({f"eval/{attack}/{label}": value for attack, label, value in results.robust()})
    out.update({f"eval/{name}": value for name, value in results.columns.items()})
    return out


def _device_name(accelerator: Any) -> str:
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_name(accelerator.device)
    return accelerator.device.type
