"""Efficient SAM: update rules that pay for SAM's second forward/backward pass on only some steps.

    sam-every-k  the SAM step on every k-th optimizer step, plain steps between ("SAM-k", the periodic
                 baseline of Liu et al. 2022). Passes per step: 1 + 1/k.
    looksam      LookSAM (Liu et al. 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization",
                 CVPR): on every k-th step a SAM step that also keeps the part of the SAM gradient g_s
                 orthogonal to the plain gradient g,  g_v = g_s - (<g_s, g> / ||g||^2) g;  between, one pass
                 and the descent direction  g + alpha * ||g|| * g_v / ||g_v||.  Passes: 1 + 1/k.
    ae-sam       AE-SAM (Jiang et al. 2023, "An Adaptive Policy to Employ Sharpness-Aware Minimization",
                 ICLR): the squared gradient norm ||g||^2 is modelled as Gaussian with EMA mean mu and
                 variance s^2 (decay delta); the SAM step is taken only when ||g||^2 >= mu + c_t * s (a sharp
                 region), a plain step otherwise; c_t moves linearly from c_start to c_end over the run.
                 Passes: 1 + the share of SAM steps (about half with the paper's c from 1 to -1).

Each is an update rule (:data:`EFFICIENT_UPDATES`, gathered in ``common/methods.py``'s ``UPDATES``) and
composes with every objective there: the SAM steps reuse :func:`samat.common.sam.regrad_at_ascent_point`
(BatchNorm running stats untouched at ``w + e``, exact restore, fp16 loss scale and overflow), gradient
accumulation sums the ascent and descent gradients over the step's micro-batches like SAM's, and clipping
applies to the final descent direction.

State (step counter, SAM-step count, LookSAM's cached direction, AE-SAM's EMAs) lives in the base optimizer's
``state`` under :data:`STATE_KEY`: ``torch.optim.Optimizer.state_dict`` keeps non-parameter keys as they are,
so ``accelerator.save_state``/``load_state`` checkpoint and restore it with the momentum, and ``--resume``
continues bit-identically without any extra file.

Multi-process: ``sam-every-k`` takes plain SAM steps (``--sam_sync`` as for ``sam``); its schedule is the step
counter in the optimizer state, the same on every process (all step together, and resume restores it).
``looksam`` and ``ae-sam`` all-reduce the first gradient (as ``--sam_sync global``): on their cheap steps it is
the descent gradient, and LookSAM's g_v and AE-SAM's decision must be the same on every replica (AE-SAM's
gradient norm is all-reduced too, so the branch is agreed, not merely computed alike). Every fp16 overflow
skip is agreed across processes (``common/sam.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .method_config import ResolvedMethod
from .sam import SAM, regrad_at_ascent_point, sam_update
from .step import (Objective, StepContext, StepResult, UpdateRule, backward_all, descend, global_norm,
                   loss_scale, plain_update)

STATE_KEY = "samat_efficient_sam"


def update_state(optimizer: Any) -> dict:
    """The efficient updates' state, a dict in the base optimizer's ``state`` (saved with it)."""
    base = optimizer
    while hasattr(base, "optimizer"):  # AcceleratedOptimizer and similar wrappers
        base = base.optimizer
    return base.state.setdefault(STATE_KEY, {"step": 0, "sam_steps": 0})


def _indexed_grads(optimizer: Any) -> tuple[list[int], list[Tensor]]:
    """Positions (in ``param_groups`` order) and gradients of the parameters that hold one."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index = [i for i, p in enumerate(params) if p.grad is not None]
    return index, [params[i].grad for i in index]


def _finish(state: dict, sam_step: bool, result: StepResult) -> StepResult:
    state["step"] += 1
    state["sam_steps"] += int(sam_step)
    return result


def every_k_update(ctx: StepContext, objective: Objective, micro_batches: list[dict]) -> StepResult:
    """SAM on steps 0, k, 2k, ... of the run, plain steps between."""
    state = update_state(ctx.optimizer)
    sam_step = state["step"] % ctx.method.sam_interval == 0
    return _finish(state, sam_step, (sam_update if sam_step else plain_update)(ctx, objective, micro_batches))


@torch.no_grad()
def _orthogonal_unit(g_s: list[Tensor], g: list[Tensor]) -> list[Tensor]:
    """``g_v / ||g_v||`` with ``g_v = g_s - (<g_s, g> / ||g||^2) g``, over the whole gradient vector.

    Stored as a unit vector: LookSAM only uses g_v's direction (its norm is divided out), and a unit vector
    does not depend on the fp16 loss scale the gradients carry."""
    dot = torch.stack([(a.float() * b.float()).sum() for a, b in zip(g_s, g)]).sum()
    coef = dot / global_norm(g).square().clamp_min(1e-30)
    g_v = torch._foreach_sub(g_s, torch._foreach_mul(g, coef.to(g[0].dtype)))
    return torch._foreach_div(g_v, global_norm(g_v).clamp_min(1e-30).to(g_v[0].dtype))


def looksam_update(ctx: StepContext, objective: Objective, micro_batches: list[dict]) -> StepResult:
    """LookSAM: SAM steps on 0, k, 2k, ... (and whenever no direction is cached), reusing g_v between."""
    m = ctx.method
    state = update_state(ctx.optimizer)
    prepared = [objective.prepare(ctx, b) for b in micro_batches]
    loss = backward_all(ctx, objective, micro_batches, prepared, sync_last=True)
    index, grads = _indexed_grads(ctx.optimizer)
    cached = state.get("looksam_u")
    if state["step"] % m.sam_interval != 0 and cached is not None and list(cached) == index:
        # Cheap step: g + alpha * ||g|| * u. The scale rides on ||g||, so an fp16 loss scale carries over.
        u = [cached[i] for i in index]
        if u[0].device != grads[0].device:  # resumed: the checkpoint's tensors come back on the CPU
            u = [t.to(g.device, g.dtype) for t, g in zip(u, grads)]
            state["looksam_u"] = dict(zip(index, u))
        torch._foreach_add_(grads, torch._foreach_mul(u, (m.looksam_alpha * global_norm(grads)).to(grads[0].dtype)))
        return _finish(state, False, StepResult(loss=loss, skipped=descend(ctx)))
    g = [t.detach().clone() for t in grads]  # g at w, for the projection once g_s is in .grad
    if not regrad_at_ascent_point(ctx, objective, micro_batches, prepared, SAM(ctx.optimizer, rho=m.rho)):
        return _finish(state, True, StepResult(loss=loss, skipped=True))
    _, g_s = _indexed_grads(ctx.optimizer)
    u = _orthogonal_unit(g_s, g)
    # An fp16 overflow in g_s makes u non-finite: keep the previous direction (the step itself is skipped).
    if ctx.accelerator.scaler is None or bool(torch.isfinite(global_norm(u))):
        state["looksam_u"] = dict(zip(index, u))
    return _finish(state, True, StepResult(loss=loss, skipped=descend(ctx)))


def aesam_threshold_c(method: ResolvedMethod, step: int, total_steps: int) -> float:
    """AE-SAM's ``c_t``: linear from ``aesam_c_start`` at step 0 to ``aesam_c_end`` at the last step."""
    start, end = method.aesam_c_start, method.aesam_c_end
    if start == end:  # also +-inf, where the interpolation would give nan
        return start
    if total_steps <= 0:  # a bare train_step with no run length (tests, benchmarks): the schedule's mean
        return (start + end) / 2
    return start + (end - start) * min(step / max(total_steps - 1, 1), 1.0)


def aesam_update(ctx: StepContext, objective: Objective, micro_batches: list[dict]) -> StepResult:
    """AE-SAM: one pass at ``w``; the EMAs of ||g||^2 decide whether to take the SAM pass too."""
    m = ctx.method
    state = update_state(ctx.optimizer)
    prepared = [objective.prepare(ctx, b) for b in micro_batches]
    loss = backward_all(ctx, objective, micro_batches, prepared, sync_last=True)
    _, grads = _indexed_grads(ctx.optimizer)
    # One host sync per step: the decision is a branch in Python. The true (unscaled) gradient's norm, of
    # the all-reduced gradient; its largest value over the processes (one float all-reduce), so that every
    # process takes the same branch (and keeps the same EMAs) even where their arithmetic differs in the
    # last bit.
    norm = global_norm(grads) if grads else torch.zeros((), device=getattr(ctx.accelerator, "device", "cpu"))
    if ctx.accelerator.num_processes > 1:
        norm = ctx.accelerator.reduce(norm.reshape(1), reduction="max")[0]
    sq = (norm.item() / loss_scale(ctx)) ** 2
    sam_step = False
    if math.isfinite(sq):  # an fp16 overflow leaves the EMAs alone; the plain step below is then skipped
        delta = m.aesam_delta
        mean = delta * state.get("aesam_mean", 0.0) + (1 - delta) * sq
        var = delta * state.get("aesam_var", 0.0) + (1 - delta) * (sq - mean) ** 2
        state["aesam_mean"], state["aesam_var"] = mean, var
        c = aesam_threshold_c(m, state["step"], ctx.total_steps)
        threshold = mean + c * math.sqrt(var) if math.isfinite(c) else c  # c = -inf: always SAM, +inf: never
        sam_step = sq >= threshold
    if sam_step and not regrad_at_ascent_point(ctx, objective, micro_batches, prepared,
                                               SAM(ctx.optimizer, rho=m.rho)):
        return _finish(state, True, StepResult(loss=loss, skipped=True))
    return _finish(state, sam_step, StepResult(loss=loss, skipped=descend(ctx)))


EFFICIENT_UPDATES: dict[str, UpdateRule] = {"sam-every-k": every_k_update, "looksam": looksam_update,
                                             "ae-sam": aesam_update}
