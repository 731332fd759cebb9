"""The optimizer-step loop: what is stepped (optimizer, schedule) and how (groups of micro-batches,
logging, periodic checkpoints, preemption, the divergence guard).

One optimizer step consumes ``gradient_accumulation_steps`` micro-batches and is done by
``samat.common.methods.train_step`` (SAM needs the whole step's micro-batches at once, so the loop groups them
instead of using ``accelerator.accumulate``). Resuming is exact: the loop skips the batches already consumed in
the current epoch with ``skip_first_batches`` (the seeded sampler reproduces the epoch's order).
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.logging import get_logger
from torch import Tensor, nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from .checkpoint import TrainState, save_checkpoint
from .config import RunArgs
from .cost import PassCounter
from .guard import DivergenceGuard, TrainingFailed
from .methods import StepContext, train_step

logger = get_logger("samat")


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


def train(ctx: StepContext, train_loader: Any, train_set: Any, scheduler: Any, run: RunArgs, total_steps: int,
          state: TrainState, counter: PassCounter, guard: Optional[DivergenceGuard] = None) -> TrainState:
    """Optimizer steps from ``state.step`` to ``total_steps``, each over ``gradient_accumulation_steps``
    micro-batches (the epoch's last group may be shorter), with logging, periodic checkpoints, a
    checkpoint-and-exit on SIGTERM, and :class:`TrainingFailed` when ``guard`` sees training fail. Returns
    the final state."""
    accelerator, output_dir, k = ctx.accelerator, Path(run.output_dir), run.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_loader) / k)
    stop = StopRequest()
    started, wall0 = time.perf_counter(), state.train_wall_s
    progress = tqdm(total=total_steps, initial=state.step, desc=f"train {ctx.method.method.name}",
                    disable=not accelerator.is_local_main_process)
    losses: list[Tensor] = []  # device tensors, read (one host sync) when logged

    def snapshot() -> TrainState:
        state.train_wall_s = wall0 + time.perf_counter() - started
        PassCounter.copy_counts(counter, state)
        return state

    def optimizer_step(group: list[dict]) -> None:
        result = train_step(ctx, group)
        if not result.skipped:
            scheduler.step()
        state.step += 1
        labels = _step_labels(group) if guard is not None and guard.prior is not None else None
        failure = guard.failure(state.step, result.loss, result.skipped, labels) if guard else None
        # one agreement per step for both ways out, so that every process leaves at the same step
        failed, stopping = _any_process(accelerator, failure is not None,
                                        state.step < total_steps and stop.signal is not None)
        if failed:
            progress.close()
            raise TrainingFailed(failure or "training failed on another process (see its log)")
        state.train_examples += sum(_batch_size(b) for b in group) * accelerator.num_processes
        losses.append(result.loss)
        progress.update(1)
        if state.step % run.logging_steps == 0:
            _log(accelerator, progress, float(torch.stack(losses).mean()), scheduler, state.step)
            losses.clear()
        if state.step < total_steps and run.checkpoint_every and state.step % run.checkpoint_every == 0:
            save_checkpoint(accelerator, output_dir, snapshot())
        if stopping:
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


def _any_process(accelerator: Any, *flags: bool) -> tuple[bool, ...]:
    """Each flag true on every process as soon as it is true on any (a stop signal, a failed run), so that all
    processes save the same step or stop together instead of one waiting forever in a collective. One
    all-reduce for all the flags under several processes; none in a single one."""
    if accelerator.num_processes == 1:
        return tuple(flags)
    value = torch.tensor([1.0 if f else 0.0 for f in flags], device=accelerator.device)
    return tuple(bool(v > 0) for v in accelerator.reduce(value, reduction="sum").tolist())


def _step_labels(group: list[dict]) -> Optional[Tensor]:
    """The class labels of one optimizer step's micro-batches, flattened (the guard prices the prior on
    them); ``None`` when a batch has none."""
    if not all(isinstance(b.get("labels"), Tensor) for b in group):
        return None
    return torch.cat([b["labels"].detach().flatten() for b in group])


def _batch_size(batch: dict) -> int:
    first = next(v for v in batch.values() if isinstance(v, Tensor))
    return int(first.shape[0])


def _log(accelerator: Any, progress: tqdm, loss: float, scheduler: Any, step: int) -> None:
    lr = scheduler.get_last_lr()[0]
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)
