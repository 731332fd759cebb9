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
                 Passes: 1 + the share of SAM steps (about half with the paper's c from 1 to -1; samat's
                 default, c from 1 to -0.5, takes about 0.28 on the vision cpu protocol: common/registry.py).
    esam         ESAM (Du et al. 2022, "Efficient Sharpness-aware Minimization for Improved Training of Neural
                 Networks", ICLR), on every step: SWP, the ascent  e = rho/beta * g_m / ||g_m||  with g_m the
                 gradient of a random subset of the parameter tensors (each kept with probability beta); SDS,
                 a no-grad forward at w + e gives each example's loss increase l_i(w + e) - l_i(w), and the
                 descent gradient at w + e is that of the gamma * B examples where it is largest.
                 Passes, in examples: forward (2 + gamma) B, backward (1 + gamma) B; gamma = 1 skips the
                 ranking forward and is SAM's 2 B and 2 B (and with beta = 1, SAM's step).

Each is an update rule (:data:`EFFICIENT_UPDATES`, gathered in ``common/methods.py``'s ``UPDATES``) and
composes with every objective there: the SAM steps reuse :func:`samat.common.sam.regrad_at_ascent_point`
(BatchNorm running stats untouched at ``w + e``, exact restore, fp16 loss scale and overflow), gradient
accumulation sums the ascent and descent gradients over the step's micro-batches like SAM's, and clipping
applies to the final descent direction.

State (step counter, SAM-step count, LookSAM's cached direction, AE-SAM's EMAs) lives in the base optimizer's
``state`` under :data:`STATE_KEY`: ``torch.optim.Optimizer.state_dict`` keeps non-parameter keys as they are,
so ``accelerator.save_state``/``load_state`` checkpoint and restore it with the momentum, and ``--resume``
continues bit-identically without any extra file.

ESAM follows the authors' code (dydjw9/Efficient_SAM, ``utils/Esam.py``) where it is explicit: the mask is per
parameter *tensor* (their ``requires_grad`` switch; the paper's formula writes a per-coordinate mask), the norm is
that of the kept tensors' gradient, and the descent gradient is the mean loss of the selected examples. Where
samat differs: it selects exactly ``max(1, floor(gamma * B))`` examples per micro-batch (their strict ``>`` of
the k-th largest keeps one fewer), skips the ranking forward at gamma = 1 (they run it and keep all), and draws
this step's mask at this step (theirs is drawn at the end of the previous one, all tensors kept on the first),
from a generator seeded by the optimizer state, so ``--resume`` draws the same masks. Like theirs, the first
backward computes no weight gradient for the dropped tensors (in one process; under DDP it computes them and
drops them after), a saving that the pass counts, whole passes in examples, do not show.

Multi-process: ``sam-every-k`` takes plain SAM steps (``--sam_sync`` as for ``sam``); its schedule is the step
counter in the optimizer state, the same on every process (all step together, and resume restores it).
``esam`` is SAM's step (``--sam_sync`` likewise; each process ranks and selects its own examples, the same number
on each). ``looksam`` and ``ae-sam`` all-reduce the first gradient (as ``--sam_sync global``): on their cheap steps
it is the descent gradient, and LookSAM's g_v and AE-SAM's decision must be the same on every replica (AE-SAM's
gradient norm is all-reduced too, so the branch is agreed, not merely computed alike). Every fp16 overflow skip
is agreed across processes (``common/sam.py``).
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import Tensor

from .method_config import ResolvedMethod
from .sam import SAM, regrad_at_ascent_point, sam_update
from .errors import UsageError
from .step import (Objective, StepContext, StepResult, UpdateRule, backward_all, descend, global_norm,
                   loss_scale, plain_update, sync_context)

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


# ------------------------------------------------------------------------------------------------- ESAM


def _rows(batch: dict) -> int:
    return int(next(v for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0).shape[0])


def _subset(value: Any, index: Tensor, rows: int) -> Any:
    """``value`` restricted to the examples ``index`` when it is a per-example tensor (first dim ``rows``): a
    batch's inputs and labels, an adversarial ``delta``; anything else as it is."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value[index.to(value.device)]
    return value


def sds_select(increase: Tensor, gamma: float) -> Tensor:
    """SDS: the positions ``(k,)`` int64, ascending, of the ``k = max(1, floor(gamma * B))`` largest entries of
    ``increase`` ``(B,)`` (each example's loss at ``w + e`` minus at ``w``)."""
    k = max(1, int(gamma * increase.shape[0] + 1e-9))  # + 1e-9: 0.7 * 10 is 6.999... in floating point
    return torch.topk(increase.float(), k, sorted=False).indices.sort().values


# ESAM's pass 1 leaves the dropped tensors out of autograd (no weight gradient computed for them); False computes
# every gradient and drops the masked ones afterwards, the same step (a switch for the equality test).
SKIP_DROPPED_GRADS = True


def swp_keep(optimizer: Any, state: dict, beta: float) -> list[bool]:
    """SWP: for each trainable parameter (``requires_grad``, ``param_groups`` order), whether its tensor is
    perturbed this step, each kept with probability ``beta``. Drawn from a generator seeded by the run's torch
    seed (kept in ``state``) and the step counter: a resumed run draws the same masks, and the draw reads no
    tensor (no device sync) and leaves torch's random streams alone."""
    n = sum(p.requires_grad for group in optimizer.param_groups for p in group["params"])
    if beta >= 1:
        return [True] * n
    seed = state.setdefault("esam_seed", torch.initial_seed())
    draw = random.Random(seed * 1_000_003 + state["step"])
    return [draw.random() < beta for _ in range(n)]


class _SelectedExamples:
    """``objective`` at ``w + e`` on the SDS subset of each micro-batch: ``prepared`` is ``(the objective's
    prepared value, the examples' losses at w (B,))``; ``loss`` ranks the examples with one no-grad forward at
    the current (perturbed) weights, then returns the objective's loss on the selected ones."""

    def __init__(self, objective: Objective, gamma: float):
        self.objective, self.gamma = objective, gamma

    def loss(self, ctx: StepContext, batch: dict, prepared: tuple) -> Tensor:
        inner, before = prepared
        with torch.no_grad():
            after = self.objective.example_losses(ctx, batch, inner)
        index = sds_select(after.float() - before, self.gamma)
        rows = _rows(batch)
        chosen = {k: _subset(v, index, rows) for k, v in batch.items()}
        return self.objective.loss(ctx, chosen, _subset(inner, index, rows))


def esam_update(ctx: StepContext, objective: Objective, micro_batches: list[dict]) -> StepResult:
    """ESAM: SAM's two passes, the ascent over a random subset of the parameter tensors (SWP), the descent
    gradient on the examples whose loss rises most at ``w + e`` (SDS)."""
    m, k = ctx.method, len(micro_batches)
    state = update_state(ctx.optimizer)
    select = m.esam_gamma < 1
    if select and not hasattr(objective, "example_losses"):
        raise UsageError("esam: the training objective gives no per-example loss (example_losses) to select "
                         "examples by; use --esam_gamma 1 (stochastic weight perturbation only)")
    prepared = [objective.prepare(ctx, b) for b in micro_batches]
    # SWP: the ascent (norm included) is over the kept tensors only. The dropped ones are switched out of
    # autograd for pass 1, as in the authors' code, so their weight gradients are never computed (the step is
    # the same; tests/test_esam.py). Only in one process: DDP's reducer expects every parameter's gradient.
    trainable = [p for group in ctx.optimizer.param_groups for p in group["params"] if p.requires_grad]
    keep = swp_keep(ctx.optimizer, state, m.esam_beta)
    dropped = [p for p, kept in zip(trainable, keep) if not kept]
    switched = dropped if SKIP_DROPPED_GRADS and any(keep) and ctx.accelerator.num_processes == 1 else []
    for p in switched:
        p.requires_grad_(False)
    try:
        # Pass 1 at w: the ascent gradient (local unless --sam_sync global), and with SDS each example's loss.
        before, total = [], None
        for i, (batch, prep) in enumerate(zip(micro_batches, prepared)):
            with sync_context(ctx, m.sam_sync == "global" and i == k - 1):
                if select:
                    losses = objective.example_losses(ctx, batch, prep)
                    before.append(losses.detach().float())
                    loss = losses.mean() / k
                else:
                    loss = objective.loss(ctx, batch, prep) / k
                ctx.accelerator.backward(loss)
            total = loss.detach().float() if total is None else total + loss.detach().float()
    finally:
        for p in switched:
            p.requires_grad_(True)
    for p in dropped:
        p.grad = None
    second = _SelectedExamples(objective, m.esam_gamma) if select else objective
    second_prepared = list(zip(prepared, before)) if select else prepared
    if not regrad_at_ascent_point(ctx, second, micro_batches, second_prepared,
                                  SAM(ctx.optimizer, rho=m.rho / m.esam_beta)):
        return _finish(state, True, StepResult(loss=total, skipped=True))
    return _finish(state, True, StepResult(loss=total, skipped=descend(ctx)))


EFFICIENT_UPDATES: dict[str, UpdateRule] = {"sam-every-k": every_k_update, "looksam": looksam_update,
                                             "ae-sam": aesam_update, "esam": esam_update}
