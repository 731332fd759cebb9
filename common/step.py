"""One optimizer step: what an update rule is given (:class:`StepContext`), what it returns (:class:`StepResult`),
and the passes every update rule is built from.

An update rule is ``update(ctx, objective, micro_batches) -> StepResult``. ``objective`` (an
:class:`Objective` of ``common/methods.py``) has ``prepare(ctx, batch)``, the attack, run once per micro-batch at
the current weights ``w``, and ``loss(ctx, batch, prepared)``, the differentiable training loss, which may run
twice (SAM). The rules live by family: ``plain`` here (:func:`plain_update`, one pass), ``sam``/``asam`` in
``common/sam.py``, the efficient SAM rules in ``common/efficient_sam.py``; ``common/methods.py`` gathers them
in ``UPDATES`` under the names of ``common/registry.py``'s ``UPDATE_RULES``.

This module imports none of those, so they all import it and no import cycle runs between them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional, Protocol

import torch
from torch import Tensor, nn

from .method_config import ResolvedMethod
from .task import Task


@dataclass
class StepContext:
    """What an update needs for one optimizer step."""

    accelerator: Any
    model: nn.Module           # as prepared (possibly DDP-wrapped, autocast-wrapped)
    optimizer: Any             # as prepared
    task: Task
    method: ResolvedMethod
    max_grad_norm: float = 0.0
    total_steps: int = 0       # optimizer steps of the whole run (AE-SAM's threshold schedule reads it)
    steps_per_epoch: int = 0   # optimizer steps per epoch, 0 unknown (MESA's start epoch reads it)

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)


@dataclass
class StepResult:
    loss: Tensor         # 0-dim float32, on the device: training loss at w (mean over the step's micro-batches);
                         # reading it (float(), .item()) waits for the device, so the loop reads it when it logs
    skipped: bool        # fp16 overflow: no weight update happened


class Objective(Protocol):
    """A training objective (clean, PGD, FGSM, TRADES: ``common/methods.py``)."""

    def prepare(self, ctx: StepContext, batch: dict) -> Any:
        """Once per micro-batch at ``w`` (eval mode): e.g. the adversarial ``delta``; ``None`` for clean."""

    def loss(self, ctx: StepContext, batch: dict, prepared: Any) -> Tensor:
        """The differentiable scalar training loss of ``batch`` at the current weights. (The objectives of
        ``common/methods.py`` also have ``example_losses(ctx, batch, prepared)``, the same loss per example
        ``(B,)``, which ESAM ranks examples by.)"""


UpdateRule = Callable[[StepContext, Objective, list[dict]], StepResult]


def params_with_grad(optimizer: Any) -> list[Tensor]:
    """The parameters of ``optimizer`` that hold a gradient, in ``param_groups`` order."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def global_norm(tensors: list[Tensor]) -> Tensor:
    """The L2 norm of the concatenation of ``tensors`` (0-dim float32 tensor, on their device)."""
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(tensors)]))


def all_processes(accelerator: Any, flag: Tensor) -> bool:
    """True on every process iff ``flag`` (a 0-dim bool tensor) is true on every process.

    Every branch of a step that decides whether a collective runs (skip on an fp16 overflow, the guard's stop)
    goes through here first: a rank that branched alone would wait forever in an all-reduce the others never
    enter, or pair it with the wrong one. One all-reduce under several processes; none in a single one."""
    if accelerator.num_processes == 1:
        return bool(flag)
    votes = accelerator.reduce(flag.to(torch.float32).reshape(1), reduction="sum")  # on the flag's device
    return bool(votes.item() == accelerator.num_processes)


@contextlib.contextmanager
def fp32_forward(model: nn.Module) -> Iterator[None]:
    """Forwards of ``model`` (the unwrapped module, DDP's inner one) without autocast, in fp32.

    Accelerate's mixed precision wraps ``model.forward`` in autocast, which casts each fp32 weight to bf16/fp16
    per op. A weight perturbation ``e`` of SAM's size mostly does not survive that cast: measured on PreAct
    ResNet-18 at rho 0.05, ``bf16(w + e) - bf16(w)`` has cosine 0.60 with ``e`` and 1.66x its norm
    (bench/bf16_sam_fidelity.py). Inside this context the forward is the one Accelerate saved before wrapping
    it (``_original_forward``) and any outer autocast is off, so the pass sees ``w + e`` exactly. TF32 is off
    inside too (cuDNN convolutions use it by default): its 10-bit mantissa would round ``w + e`` per op again,
    about 8 times less than bf16 but enough to matter at rho 0.05."""
    original = model.__dict__.get("_original_forward")
    patched = model.__dict__.get("forward")
    device_type = next(model.parameters()).device.type
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if original is not None:
        model.forward = original
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if original is not None:
            model.forward = patched


def sync_context(ctx: StepContext, sync: bool) -> ContextManager:
    """Nothing when ``sync``, else ``accelerator.no_sync``: the backward inside keeps its gradient local to
    this replica (DDP skips the all-reduce)."""
    return contextlib.nullcontext() if sync else ctx.accelerator.no_sync(ctx.model)


def backward_all(ctx: StepContext, objective: Objective, micro_batches: list[dict], prepared: list,
                 sync_last: bool) -> Tensor:
    """Accumulate ``sum_i loss_i / K`` into ``.grad``; all-reduce (DDP) only on the last micro-batch and
    only if ``sync_last``. Returns the mean loss, a 0-dim float32 tensor on the device (no host sync)."""
    total: Optional[Tensor] = None
    k = len(micro_batches)
    for i, (batch, prep) in enumerate(zip(micro_batches, prepared)):
        with sync_context(ctx, sync_last and i == k - 1):
            loss = objective.loss(ctx, batch, prep) / k
            ctx.accelerator.backward(loss)
        loss = loss.detach().float()
        total = loss if total is None else total + loss
    return total


def descend(ctx: StepContext) -> bool:
    """Clip the descent gradient, step the base optimizer, clear grads. True if the step was skipped."""
    if ctx.max_grad_norm > 0:
        ctx.accelerator.clip_grad_norm_(ctx.model.parameters(), ctx.max_grad_norm)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return bool(getattr(ctx.optimizer, "step_was_skipped", False))


def loss_scale(ctx: StepContext) -> float:
    """The fp16 loss scale the gradients in ``.grad`` carry (1 without a GradScaler)."""
    scaler = ctx.accelerator.scaler
    return float(scaler.get_scale()) if scaler is not None else 1.0


def plain_update(ctx: StepContext, objective: Objective, micro_batches: list[dict]) -> StepResult:
    """The ``plain`` update rule: one forward/backward per micro-batch at ``w``, base optimizer step (ERM,
    PGD-AT, TRADES...)."""
    prepared = [objective.prepare(ctx, b) for b in micro_batches]
    loss = backward_all(ctx, objective, micro_batches, prepared, sync_last=True)
    return StepResult(loss=loss, skipped=descend(ctx))
