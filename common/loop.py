"""The only training loop: Accelerate ``prepare``, any method, checkpoints, exact resume, evaluation.

Precision and process count come from ``accelerate launch`` / ``accelerate config``. One optimizer step
consumes ``gradient_accumulation_steps`` micro-batches and is done by ``common.methods.train_step``
(SAM needs the whole step's micro-batches at once, so the loop groups them instead of using
``accelerator.accumulate``).

Resuming is exact on CPU with a fixed seed: model, optimizer (momentum / Adam moments), scheduler, RNG states
and the data sampler are restored by ``accelerator.load_state``; the loop skips the batches already consumed
in the current epoch with ``skip_first_batches`` (the seeded sampler reproduces the epoch's order), and the
DataLoader has its own generator so creating an iterator never draws from the global RNG.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.logging import get_logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .checkpoint import (RESULTS_FILE, TrainState, check_output_dir, prepare_output_dir,
                         save_checkpoint)
from .config import EvalArgs, RunArgs, parse_eps_list, resolve_defaults
from .cost import PassCounter
from .evaluate import evaluate_all
from .methods import ResolvedMethod, StepContext, train_step
from .results import Cost, RunResults, versions
from .sharpness import measure_sharpness
from .suites import resolve_suite
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


def attack_specs(task: Task, evals: EvalArgs) -> list[AttackSpec]:
    """PGD-L-inf and PGD-L2 on the task loss at the requested radii, plus the task's own attacks."""
    objective = lambda logits, batch, step, steps: task.loss(logits, batch)  # noqa: E731
    specs = []
    for norm, values, default in (("linf", evals.eval_linf, task.default_eval_linf),
                                  ("l2", evals.eval_l2, task.default_eval_l2)):
        eps = parse_eps_list(values, default, pixel_space=task.pixel_space and norm == "linf",
                             flag=f"--eval_{norm}")
        if eps:
            specs.append(AttackSpec(f"pgd-{norm}", norm, eps, objective))
    return specs + task.extra_attacks(evals)


def _subset(dataset: Any, n: int, seed: int) -> Any:
    """The first ``n`` examples of a seeded shuffle (all when ``n`` is 0 or larger than the set)."""
    if not n or n >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    if hasattr(dataset, "select"):
        return dataset.select(sorted(order))
    return Subset(dataset, sorted(order))


def make_optimizer(model: nn.Module, run: RunArgs) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov off as in the SAM paper) or AdamW; no weight decay on biases and norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if run.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=run.lr, momentum=run.momentum)
    return torch.optim.AdamW(groups, lr=run.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, run: RunArgs, total_steps: int):
    from transformers import get_scheduler

    warmup = int(round(run.warmup_ratio * total_steps))
    return get_scheduler(run.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class StopRequest:
    """SIGTERM/SIGUSR1 (a scheduler's preemption notice) ask the loop to checkpoint after the current step
    and exit; ``--resume`` then continues exactly where it stopped."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum


class Preempted(SystemExit):
    pass


# ------------------------------------------------------------------------------------------------ run


@dataclass
class Prepared:
    """What :func:`build` hands to training and evaluation: prepared model, optimizer, loaders, scheduler."""

    data: TaskData
    train_set: Any
    eval_set: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: Any
    eval_loader: Any
    scheduler: Any
    total_steps: int


def run_experiment(run: RunArgs, method: ResolvedMethod, evals: EvalArgs, task: Task,
                   config_record: dict) -> RunResults:
    """Train ``task`` with ``method``, evaluate, write ``results.json``; returns the results record.

    The steps, in order: validate everything the user gave (before the output folder is touched), claim the
    folder, build, train, save the model, evaluate, write one record atomically."""
    accelerator = make_accelerator(run)
    output_dir = Path(run.output_dir)
    specs = resolve_run(run, evals, task, accelerator)
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
    built = build(run, task, accelerator)
    counter = PassCounter(built.model)
    state = TrainState(task=task.name)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = TrainState.read(resume_from)
        state.task = task.name
        logger.info("resumed from %s at step %d", resume_from, state.step)
    PassCounter.copy_counts(state, counter)  # a resumed run continues the checkpoint's counts
    start_trackers(accelerator, run, config_record)

    ctx = StepContext(accelerator=accelerator, model=built.model, optimizer=built.optimizer, task=task,
                      method=method, max_grad_norm=run.max_grad_norm)
    state = train(ctx, built.train_loader, built.train_set, built.scheduler, run, built.total_steps, state,
                  counter)
    save_checkpoint(accelerator, output_dir, state)
    counter.close()
    save_model(accelerator, task, built.model, output_dir)

    eval_started = time.perf_counter()
    results = evaluate(run, method, evals, task, accelerator, built, specs)
    results.config = config_record
    results.cost = Cost(train_wall_s=round(state.train_wall_s, 3),
                        eval_wall_s=round(time.perf_counter() - eval_started, 3),
                        optimizer_steps=state.step, train_examples=state.train_examples,
                        **{name: getattr(state, name) for name in PassCounter.FIELDS})
    finish(accelerator, run, results, output_dir, state.step)
    return results


def make_accelerator(run: RunArgs) -> Any:
    """The Accelerator (precision and processes come from ``accelerate launch``), seedable sampler, trackers
    logging into ``<output_dir>/logs``; torch's CPU threads set (see :func:`set_cpu_threads`)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    output_dir = Path(run.output_dir)
    accelerator = Accelerator(
        log_with=None if run.log_with == "none" else run.log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_cpu_threads(run.cpu_threads, accelerator)
    return accelerator


def resolve_run(run: RunArgs, evals: EvalArgs, task: Task, accelerator: Any) -> list[AttackSpec]:
    """Every check of what the user asked for, before the output folder is touched: the task's flags, the
    evaluation radii, the output folder itself; then the task's defaults fill what the user left open.
    Returns the evaluation attacks."""
    task.check_args()
    specs = attack_specs(task, evals)
    resolve_suite(task, evals)  # --eval_attacks and its budget flags, checked before any work
    check_output_dir(Path(run.output_dir), task.name)
    for note in resolve_defaults(run, evals, task.defaults, on_gpu=accelerator.device.type != "cpu"):
        logger.info(note)
    return specs


def build(run: RunArgs, task: Task, accelerator: Any) -> Prepared:
    """Data and model from the task, the seeded subsets and loaders, optimizer and schedule, all prepared."""
    with accelerator.main_process_first():
        data = task.build(run, accelerator)
    train_set = _subset(data.train_dataset, run.max_train_samples, run.seed)
    eval_set = _subset(data.eval_dataset, run.max_eval_samples, run.seed + 1)
    loader_generator = torch.Generator().manual_seed(run.seed)
    train_loader = DataLoader(train_set, batch_size=run.batch_size, shuffle=True, collate_fn=data.collate_fn,
                              num_workers=run.num_workers, generator=loader_generator)
    eval_loader = DataLoader(eval_set, batch_size=run.eval_batch_size, shuffle=False,
                             collate_fn=data.collate_fn, num_workers=run.num_workers)
    optimizer = make_optimizer(data.model, run)
    batches_per_epoch = math.ceil(len(train_set) / (run.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / run.gradient_accumulation_steps)
    total_steps = run.max_steps or max(1, math.ceil(run.epochs * steps_per_epoch))
    scheduler = make_scheduler(optimizer, run, total_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        data.model, optimizer, train_loader, eval_loader, scheduler)
    return Prepared(data, train_set, eval_set, model, optimizer, train_loader, eval_loader, scheduler,
                    total_steps)


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


def evaluate(run: RunArgs, method: ResolvedMethod, evals: EvalArgs, task: Task, accelerator: Any,
             built: Prepared, specs: list[AttackSpec]) -> RunResults:
    """Clean and robust metrics with sanity checks, the task's own evaluation and columns, sharpness."""
    evaluation = evaluate_all(built.model, task, built.eval_loader, accelerator, specs, evals.eval_steps,
                              suite=resolve_suite(task, evals))
    unwrapped = accelerator.unwrap_model(built.model)
    extra = dict(task.extra_evaluation(unwrapped, accelerator, run))
    warnings = list(extra.pop("warnings", []))
    evaluation["metrics"].update(extra)
    sharpness = measure_sharpness(unwrapped, task, built.eval_set, built.data.collate_fn, evals, accelerator)
    return RunResults.from_dict({
        **evaluation,
        "task": task.name,
        "method": method.method.name,
        "headline_metric": task.headline_metric,
        "method_resolved": method.describe(),
        "data": {**built.data.info, "train_examples": len(built.train_set), "eval_examples": len(built.eval_set)},
        "sharpness": sharpness,
        "columns": task.extra_columns(evaluation["metrics"]),
        "warnings": warnings,
        "device": _device_name(accelerator),
        "num_processes": accelerator.num_processes,
        "cpu_threads": torch.get_num_threads(),
        "mixed_precision": accelerator.mixed_precision,
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
        print(results.table())
        print(f"results: {output_dir / RESULTS_FILE}")
    accelerator.wait_for_everyone()


def train(ctx: StepContext, train_loader: Any, train_set: Any, scheduler: Any, run: RunArgs, total_steps: int,
          state: TrainState, counter: PassCounter) -> TrainState:
    """Optimizer steps from ``state.step`` to ``total_steps``, each over ``gradient_accumulation_steps``
    micro-batches (the epoch's last group may be shorter), with logging, periodic checkpoints and a
    checkpoint-and-exit on SIGTERM. Returns the final state."""
    accelerator, output_dir, k = ctx.accelerator, Path(run.output_dir), run.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_loader) / k)
    stop = StopRequest()
    started, wall0 = time.perf_counter(), state.train_wall_s
    progress = tqdm(total=total_steps, initial=state.step, desc=f"train {ctx.method.method.name}",
                    disable=not accelerator.is_local_main_process)
    losses: list[float] = []

    def snapshot() -> TrainState:
        state.train_wall_s = wall0 + time.perf_counter() - started
        PassCounter.copy_counts(counter, state)
        return state

    def optimizer_step(group: list[dict]) -> None:
        result = train_step(ctx, group)
        if not result.skipped:
            scheduler.step()
        if not math.isfinite(result.loss):
            logger.warning("non-finite training loss at step %d", state.step + 1)
        state.step += 1
        state.train_examples += sum(_batch_size(b) for b in group) * accelerator.num_processes
        losses.append(result.loss)
        progress.update(1)
        if state.step % run.logging_steps == 0:
            _log(accelerator, progress, sum(losses) / len(losses), scheduler, state.step)
            losses.clear()
        if state.step < total_steps and run.checkpoint_every and state.step % run.checkpoint_every == 0:
            save_checkpoint(accelerator, output_dir, snapshot())
        if state.step < total_steps and _stop_requested(accelerator, stop):
            save_checkpoint(accelerator, output_dir, snapshot())
            progress.close()
            logger.warning("stopped by signal %s at step %d; rerun with --resume to continue", stop.signal,
                           state.step)
            raise Preempted(143)

    ctx.model.train()
    while state.step < total_steps:
        epoch = state.step // steps_per_epoch
        train_loader.set_epoch(epoch)
        _set_dataset_epoch(train_set, epoch)
        skip = (state.step % steps_per_epoch) * k
        group: list[dict] = []
        for batch in accelerator.skip_first_batches(train_loader, skip) if skip else train_loader:
            group.append(batch)
            if len(group) == k:
                optimizer_step(group)
                group = []
                if state.step >= total_steps:
                    break
        if group and state.step < total_steps:  # the epoch's last, shorter accumulation group
            optimizer_step(group)
    progress.close()
    return snapshot()


def _set_dataset_epoch(dataset: Any, epoch: int) -> None:
    """Tell a dataset (through Subset wrappers) which epoch it serves, for epoch-seeded augmentation."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def _stop_requested(accelerator: Any, stop: StopRequest) -> bool:
    """True on every process as soon as any process got a stop signal (so all save the same step)."""
    if accelerator.num_processes == 1:
        return stop.signal is not None
    flag = torch.tensor([1.0 if stop.signal is not None else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _batch_size(batch: dict) -> int:
    first = next(v for v in batch.values() if isinstance(v, Tensor))
    return int(first.shape[0])


def _log(accelerator: Any, progress: tqdm, loss: float, scheduler: Any, step: int) -> None:
    lr = scheduler.get_last_lr()[0]
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)


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
