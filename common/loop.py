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

import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.logging import get_logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .config import EvalArgs, RunArgs, parse_eps_list, resolve_defaults
from .errors import UsageError
from .evaluate import evaluate_all
from .methods import ResolvedMethod, StepContext, train_step
from .files import write_json_atomic
from .results import metrics_table, versions
from .task import AttackSpec, Task

logger = get_logger("samat")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
KEEP_CHECKPOINTS = 2


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


class PassCounter:
    """Counts forward calls of a model and backward passes through its output (training cost), both as calls
    and as examples (rows of the logits): a doubled clean+adversarial batch (TRADES, ``--at_clean_weight``) is
    one call but twice the examples.

    A forward hook counts calls; a tensor hook on the output's logits counts every gradient that flows back
    through it (``loss.backward()`` and the attacks' ``autograd.grad`` alike). The counts carry
    :class:`TrainState`'s field names, so a checkpoint saves and restores them with :meth:`copy_counts`.
    """

    FIELDS = ("forward_passes", "backward_passes", "forward_examples", "backward_examples")

    def __init__(self, model: nn.Module):
        self.forward_passes = self.backward_passes = self.forward_examples = self.backward_examples = 0
        self.active = True
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self.active:
            return
        logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
        rows = int(logits.shape[0]) if isinstance(logits, Tensor) and logits.dim() > 0 else 0
        self.forward_passes += 1
        self.forward_examples += rows
        if isinstance(logits, Tensor) and logits.requires_grad:
            logits.register_hook(lambda grad: self._count_backward(rows))

    def _count_backward(self, rows: int) -> None:
        self.backward_passes += 1
        self.backward_examples += rows

    @classmethod
    def copy_counts(cls, source: Any, target: Any) -> None:
        """Copy the four counts from ``source`` to ``target`` (a counter or a :class:`TrainState`)."""
        for name in cls.FIELDS:
            setattr(target, name, getattr(source, name))

    def close(self) -> None:
        self.active = False
        self._handle.remove()


@dataclass
class TrainState:
    """What a checkpoint records besides Accelerate's state (``trainer_state.json``)."""

    step: int = 0
    train_wall_s: float = 0.0
    forward_passes: int = 0
    backward_passes: int = 0
    forward_examples: int = 0   # examples through the forward pass (a doubled batch counts twice)
    backward_examples: int = 0
    train_examples: int = 0


# ----------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (their state file is written last), oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator: Any, output_dir: Path, state: TrainState) -> None:
    path = output_dir / CHECKPOINTS / f"step_{state.step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        write_json_atomic(path / STATE_FILE, asdict(state))
        for old in list_checkpoints(output_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def prepare_output_dir(run: RunArgs, output_dir: Path, is_main: bool) -> Optional[Path]:
    """Decide between fresh start, resume and refusal. Returns the checkpoint to resume from, if any."""
    results = output_dir / "results.json"
    checkpoints = list_checkpoints(output_dir)
    if run.overwrite:
        if is_main:
            shutil.rmtree(output_dir / CHECKPOINTS, ignore_errors=True)
            results.unlink(missing_ok=True)
        return None
    if results.exists() and not run.resume:
        raise UsageError(f"--output_dir {output_dir} holds a finished run (results.json); pass --overwrite to "
                         "start over or choose another --output_dir")
    if checkpoints and not run.resume:
        raise UsageError(f"--output_dir {output_dir} holds checkpoints; pass --resume to continue or "
                         "--overwrite to start over")
    if run.resume and not checkpoints:
        logger.info("--resume: no checkpoint in %s, starting from scratch", output_dir)
    return checkpoints[-1] if run.resume and checkpoints else None


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


def run_experiment(run: RunArgs, method: ResolvedMethod, evals: EvalArgs, task: Task,
                   config_record: dict) -> dict:
    """Train ``task`` with ``method``, evaluate, write ``results.json``; returns the results dict."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    output_dir = Path(run.output_dir)
    trackers = None if run.log_with == "none" else run.log_with
    accelerator = Accelerator(
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_cpu_threads(run.cpu_threads, accelerator)
    specs = attack_specs(task, evals)  # parse eval eps first: a bad radius fails before any work
    results_path = output_dir / "results.json"
    if run.resume and results_path.exists() and not run.overwrite:
        results = json.loads(results_path.read_text())
        if accelerator.is_main_process:
            print(f"{output_dir} is finished; results.json:\n{metrics_table(results)}")
        return results
    resume_from = prepare_output_dir(run, output_dir, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    for note in resolve_defaults(run, evals, task.defaults, on_gpu=accelerator.device.type != "cpu"):
        logger.info(note)
    set_seed(run.seed)

    with accelerator.main_process_first():
        data = task.build(run, accelerator)
    train_set = _subset(data.train_dataset, run.max_train_samples, run.seed)
    eval_set = _subset(data.eval_dataset, run.max_eval_samples, run.seed + 1)
    loader_generator = torch.Generator().manual_seed(run.seed)
    train_loader = DataLoader(train_set, batch_size=run.batch_size, shuffle=True, collate_fn=data.collate_fn,
                              num_workers=run.num_workers, generator=loader_generator)
    eval_loader = DataLoader(eval_set, batch_size=run.eval_batch_size, shuffle=False,
                             collate_fn=data.collate_fn, num_workers=run.num_workers)
    model = data.model
    counter = PassCounter(model)
    optimizer = make_optimizer(model, run)
    batches_per_epoch = math.ceil(len(train_set) / (run.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / run.gradient_accumulation_steps)
    total_steps = run.max_steps or max(1, math.ceil(run.epochs * steps_per_epoch))
    scheduler = make_scheduler(optimizer, run, total_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)

    state = TrainState()
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = TrainState(**json.loads((resume_from / STATE_FILE).read_text()))
        logger.info("resumed from %s at step %d", resume_from, state.step)
    PassCounter.copy_counts(state, counter)  # a resumed run continues the checkpoint's counts

    if trackers:
        flat = {f"{group}/{k_}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                for group, values in config_record.items() for k_, v in values.items()}
        accelerator.init_trackers("samat", config=flat)

    ctx = StepContext(accelerator=accelerator, model=model, optimizer=optimizer, task=task, method=method,
                      max_grad_norm=run.max_grad_norm)
    state = train(ctx, train_loader, train_set, scheduler, run, total_steps, state, counter)
    save_checkpoint(accelerator, output_dir, state)
    counter.close()

    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        (output_dir / "model").mkdir(parents=True, exist_ok=True)
        task.save_model(unwrapped, str(output_dir / "model"))

    eval_started = time.perf_counter()
    evaluation = evaluate_all(model, task, eval_loader, accelerator, specs, evals.eval_steps)
    extra = task.extra_evaluation(unwrapped, accelerator, run)
    evaluation["metrics"].update(extra)
    sharpness = measure_sharpness(unwrapped, task, eval_set, data.collate_fn, evals, accelerator)
    eval_wall = time.perf_counter() - eval_started  # clean + attacks + task extras + sharpness

    results = {
        "task": task.name,
        "method": method.method.name,
        "headline_metric": task.headline_metric,
        "config": config_record,
        "method_resolved": method.describe(),
        "data": {**data.info, "train_examples": len(train_set), "eval_examples": len(eval_set)},
        **evaluation,
        "sharpness": sharpness,
        "cost": {
            "train_wall_s": round(state.train_wall_s, 3),
            "eval_wall_s": round(eval_wall, 3),
            "optimizer_steps": state.step,
            "forward_passes": state.forward_passes,
            "backward_passes": state.backward_passes,
            "forward_examples": state.forward_examples,
            "backward_examples": state.backward_examples,
            "train_examples": state.train_examples,
        },
        "device": _device_name(accelerator),
        "num_processes": accelerator.num_processes,
        "cpu_threads": torch.get_num_threads(),
        "mixed_precision": accelerator.mixed_precision,
        "versions": versions(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if trackers:
        accelerator.log(_flat_metrics(results), step=state.step)
        accelerator.end_training()
    if accelerator.is_main_process:
        write_json_atomic(results_path, results)
        print(metrics_table(results))
        print(f"results: {results_path}")
    accelerator.wait_for_everyone()
    return results


def measure_sharpness(model: nn.Module, task: Task, eval_set: Any, collate_fn: Any, evals: EvalArgs,
                      accelerator: Any) -> Optional[dict]:
    """Weight-space sharpness (``common.sharpness``) on the first ``--sharpness_examples`` evaluation examples,
    on the main process (the probe perturbs one replica's weights), in eval mode. ``None`` when skipped."""
    if not evals.sharpness_examples:
        return None
    from .config import parse_eps
    from .sharpness import sharpness_report

    report = None
    if accelerator.is_main_process:
        n = min(evals.sharpness_examples, len(eval_set))
        loader = DataLoader(Subset(eval_set, range(n)), batch_size=64, shuffle=False, collate_fn=collate_fn)
        batches = [{k: v.to(accelerator.device) if isinstance(v, Tensor) else v for k, v in b.items()}
                   for b in loader]
        rhos = [parse_eps(r, pixel_space=False, flag="--sharpness_rho") for r in evals.sharpness_rho]
        asam = [parse_eps(r, pixel_space=False, flag="--sharpness_asam_rho") for r in evals.sharpness_asam_rho]
        # No extra autocast here: sharpness is a small difference of losses. (Under mixed precision the
        # prepared model's forward still autocasts; compare sharpness across runs of the same precision.)
        report = sharpness_report(model, task, batches, rhos=rhos, adaptive_rhos=asam,
                                  steps=evals.sharpness_steps)
    accelerator.wait_for_everyone()
    return report


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


def _flat_metrics(results: dict) -> dict[str, float]:
    out = {f"eval/clean/{k}": v for k, v in results["metrics"]["clean"].items() if isinstance(v, float)}
    for attack, by_eps in results["metrics"]["robust"].items():
        for label, metrics in by_eps.items():
            out[f"eval/{attack}/{label}"] = metrics[results["headline_metric"]]
    for recipe, m in (results["metrics"].get("textattack") or {}).items():
        if isinstance(m, dict) and isinstance(m.get("accuracy_under_attack"), float):
            out[f"eval/textattack/{recipe}"] = m["accuracy_under_attack"]
    return out


def _device_name(accelerator: Any) -> str:
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_name(accelerator.device)
    return accelerator.device.type
