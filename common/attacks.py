"""One projected gradient descent (PGD) for every perturbation space.

The same loop serves pixel space (``x`` in ``[0, 1]``, L-inf or L2 ball per image) and embedding space
(``x`` = token embeddings, a ball per token, padding masked so it never moves). What differs between the
spaces is carried by :class:`common.task.AttackSurface`; what is maximised is the caller's ``objective``
(the task loss, a TRADES KL term, SegPGD's reweighted loss), never a hard-coded cross-entropy.

Core step (Madry et al. 2018): ``delta <- project(delta + alpha * direction(grad))`` where ``direction`` is
``sign`` for L-inf and ``grad / ||grad||_2`` for L2, and ``project`` clips to the eps-ball and keeps
``x + delta`` inside ``bounds``. Options of the same loop, for evaluation: APGD's step-size schedule with
momentum (Croce & Hein 2020), random restarts, and a per-example ``score`` that keeps, per example, the
worst iterate found (as AutoAttack counts: any misclassifying iterate counts). Training calls it with the
defaults (one start, fixed steps, last iterate), exactly as before.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .task import AttackSurface

NORMS = ("linf", "l2")
SCHEDULES = ("pgd", "apgd")
APGD_MOMENTUM = 0.75  # weight of the new gradient step; 0.25 stays on the previous move
APGD_RHO = 0.75  # halve the step where the loss rose in at most this fraction of a window's steps
_TINY = 1e-12


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout, BatchNorm uses running stats) and restore every submodule's
    own ``training`` flag afterwards, even when only some submodules were in train mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training


def _lp_norm(t: Tensor, dims: tuple[int, ...], norm: str) -> Tensor:
    """Per-ball norm of ``t``, kept broadcastable to ``t``."""
    if norm == "linf":
        return t.abs().amax(dim=dims, keepdim=True)
    return t.pow(2).sum(dim=dims, keepdim=True).sqrt()


def project(delta: Tensor, surface: AttackSurface, eps: float, norm: str) -> Tensor:
    """Project ``delta`` onto the eps-ball (per ball, see ``AttackSurface.norm_dims``), zero it where
    ``mask`` is 0, and shift it so that ``x + delta`` stays in ``bounds``."""
    dims = surface.reduce_dims()
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        scale = (eps / _lp_norm(delta, dims, "l2").clamp_min(_TINY)).clamp(max=1.0)
        delta = delta * scale
    if surface.mask is not None:
        delta = delta * surface.mask
    if surface.bounds is not None:
        low, high = surface.bounds
        # Clamping x + delta into the box keeps delta inside the ball too: the box clamp only shrinks |delta|.
        delta = (surface.x + delta).clamp(low, high) - surface.x
    return delta


def random_start(surface: AttackSurface, eps: float, norm: str) -> Tensor:
    """A random point in the eps-ball: uniform per coordinate for L-inf; for L2 a Gaussian direction with
    a radius uniform in ``[0, eps]`` (as torchattacks' PGDL2)."""
    x = surface.x
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        dims = surface.reduce_dims()
        direction = torch.randn_like(x)
        direction = direction / _lp_norm(direction, dims, "l2").clamp_min(_TINY)
        radius_shape = [s if d not in dims else 1 for d, s in enumerate(x.shape)]
        radius = torch.rand(radius_shape, device=x.device, dtype=x.dtype) * eps
        delta = direction * radius
    return project(delta, surface, eps, norm)


def ascent_direction(grad: Tensor, surface: AttackSurface, norm: str) -> Tensor:
    """Steepest-ascent direction of unit norm in the given geometry."""
    if norm == "linf":
        return grad.sign()
    return grad / _lp_norm(grad, surface.reduce_dims(), "l2").clamp_min(_TINY)


@dataclass
class AttackResult:
    """What :func:`run_pgd` found.

    ``delta`` is shaped like ``surface.x``. With a ``score``, ``logits`` are the model's detached logits at
    ``delta`` and ``score`` their ``(B,)`` score, so the caller need not run the model again; else both None.
    """

    delta: Tensor
    logits: Optional[Tensor] = None
    score: Optional[Tensor] = None


def _rows(flags: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` flags viewed to broadcast over ``like``'s per-example dims."""
    return flags.view(-1, *([1] * (like.dim() - 1)))


class WorstIterate:
    """Per example, the point with the lowest ``score(logits)`` offered so far: the worst case for the model.

    ``score`` maps logits to ``(B,)``; lower means the attack did better (see
    :func:`common.attack_losses.example_score`: any misclassifying point beats every correct one). Points may
    be offered for a subset of the examples (``rows``, indices into the first offer's batch): the examples
    still attacked once the others are done.
    """

    def __init__(self, score: Callable[[Tensor], Tensor], done_below: Optional[float] = None):
        self.score_fn, self.done_below = score, done_below
        self.delta: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None
        self.score: Optional[Tensor] = None

    def offer(self, delta: Tensor, logits: Tensor, rows: Optional[Tensor] = None) -> None:
        delta, logits = delta.detach(), logits.detach()
        score = self.score_fn(logits).detach()
        if self.score is None:  # copies: later offers write into these, and the attack may still hold delta
            self.delta, self.logits, self.score = delta.clone(), logits.clone(), score.clone()
            return
        if rows is None:
            rows = torch.arange(len(self.score), device=score.device)
        better = score < self.score[rows]  # strict: on a tie the earlier point stays
        self.delta[rows] = torch.where(_rows(better, delta), delta, self.delta[rows])
        self.logits[rows] = torch.where(_rows(better, logits), logits, self.logits[rows])
        self.score[rows] = torch.where(better, score, self.score[rows])

    def done_rows(self, rows: Tensor) -> Tensor:
        """``(len(rows),)`` bool: has each of ``rows`` a point scoring below ``done_below``?"""
        if self.done_below is None or self.score is None:
            return torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        return self.score[rows] < self.done_below

    def done(self) -> bool:
        """Has every example a point scoring below ``done_below`` (e.g. misclassified)? Then no further
        iterate can change what is counted, and the attack may stop."""
        return (self.done_below is not None and self.score is not None
                and bool((self.score < self.done_below).all()))


# The problem restricted to some rows of the batch: ``rows -> (surface, objective, score)``.
Narrow = Callable[[Tensor], tuple[AttackSurface, Callable[[Tensor, int], Tensor], Callable[[Tensor], Tensor]]]


class _Active:
    """The examples an evaluation attack still works on: their ``rows`` in the batch and the problem
    restricted to them. With a ``narrow``, an example leaves as soon as ``worst`` counts it done (broken), so
    no later forward or backward pass is spent on it; every example's own trajectory is unchanged (per-example
    objectives, per-example steps)."""

    def __init__(self, surface: AttackSurface, objective, worst: Optional[WorstIterate],
                 narrow: Optional[Narrow]):
        self.surface, self.objective, self.worst, self.narrow = surface, objective, worst, narrow
        self.rows = torch.arange(len(surface.x), device=surface.x.device)

    def offer(self, delta: Tensor, logits: Tensor) -> None:
        if self.worst is not None:
            self.worst.offer(delta, logits, self.rows)

    def finished(self) -> bool:
        """Is every example done (nothing left to fool)?"""
        return self.worst is not None and bool(self.worst.done_rows(self.rows).all())

    def keep(self) -> Optional[Tensor]:
        """``(n,)`` bool of the active examples to keep, or None when no example leaves (or no ``narrow``)."""
        if self.narrow is None or self.worst is None:
            return None
        done = self.worst.done_rows(self.rows)
        if not done.any():
            return None
        keep = ~done
        self.rows = self.rows[keep]
        if len(self.rows):
            self.surface, self.objective, score = self.narrow(self.rows)
            self.worst.score_fn = score
        return keep


class _RowPeakOneBackward(torch.autograd.Function):
    """``x.float()`` going forward; going back, each example's gradient (row of the batch) divided by its
    largest magnitude before it is cast to ``x``'s dtype.

    For fp16 logits: the gradient of a confidently classified example's loss is far below fp16's smallest
    number (about 6e-8), so cast unscaled it flushes to zero and PGD stands still on exactly the examples it
    should push hardest, overestimating robustness. With the peak at 1 nothing underflows or overflows. The
    step does not change: each example's delta depends on its own loss only (attacks run in eval mode), and
    the step direction (sign, or gradient over its L2 norm per ball) is blind to a positive factor per example.
    A row whose gradient is all zero stays zero."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.dtype = x.dtype
        return x.float()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        peak = grad.abs().amax(dim=tuple(range(1, grad.dim())), keepdim=True)
        return (grad / torch.where(peak > 0, peak, torch.ones_like(peak))).to(ctx.dtype)


def _value_and_grad(surface: AttackSurface, objective: Callable[[Tensor, int], Tensor], delta: Tensor,
                    step: int) -> tuple[Tensor, Tensor, Tensor]:
    """Objective value (scalar or ``(B,)``) and logits at ``delta``, both detached, and the gradient of the
    objective's sum with respect to ``delta``. Under fp16 (logits in fp16) each example's gradient is
    rescaled on its way back so it cannot underflow (:class:`_RowPeakOneBackward`); only its direction is
    used, so the attack is unchanged by it."""
    delta = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = surface.forward(delta)
        value = objective(_RowPeakOneBackward.apply(logits) if logits.dtype == torch.float16 else logits, step)
        (grad,) = torch.autograd.grad(value.sum() if value.dim() else value, delta)
    return value.detach(), logits.detach(), grad


def _pgd_steps(active: _Active, delta: Tensor, eps: float, alpha: float, steps: int, norm: str) -> Tensor:
    """Fixed-step PGD (Madry et al.); every iterate but the last is offered to the worst-iterate record (the
    caller evaluates the last). Returns the last iterate of the examples still active."""
    for step in range(steps):
        _, logits, grad = _value_and_grad(active.surface, active.objective, delta, step)
        active.offer(delta, logits)
        if active.finished():
            break
        keep = active.keep()
        if keep is not None:
            delta, grad = delta[keep], grad[keep]
        with torch.no_grad():
            delta = project(delta + alpha * ascent_direction(grad, active.surface, norm), active.surface, eps,
                            norm)
    return delta


def apgd_checkpoints(steps: int) -> dict[int, int]:
    """``{iteration: window length}``: where APGD may halve its step size.

    Croce & Hein (2020): ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, in the
    integer form of their code: the first window is ``0.22 N`` iterations, each next one ``0.03 N`` shorter,
    never under ``0.06 N``.
    """
    window, shrink, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at = {}, window
    while at <= steps:
        out[at] = window
        window = max(window - shrink, shortest)
        at += window
    return out


def _apgd_steps(active: _Active, delta: Tensor, eps: float, steps: int, norm: str) -> Tensor:
    """APGD (Croce & Hein 2020, Alg. 1): step ``2 eps`` per example, momentum 0.75, and at each checkpoint
    the step is halved, and the iterate reset to the best point, for examples whose loss rose in fewer than
    75% of the window's steps or whose best loss has not moved since an unhalved checkpoint.

    ``objective`` must return per-example values ``(B,)``. Returns the best-loss point of the examples still
    active; every iterate is offered to the worst-iterate record.
    """
    surface = active.surface
    loss, logits, grad = _value_and_grad(surface, active.objective, delta, 0)
    if loss.shape != delta.shape[:1]:
        raise ValueError(f"APGD needs a per-example objective of shape {tuple(delta.shape[:1])}, "
                         f"got {tuple(loss.shape)}")
    active.offer(delta, logits)
    eta = _rows(torch.full_like(loss, 2.0 * eps), delta)
    best_loss, best_delta, best_grad = loss, delta, grad
    previous = delta
    increases = torch.zeros_like(loss)
    halved_last = torch.ones_like(loss, dtype=torch.bool)  # the "stalled" rule starts at the 2nd checkpoint
    best_at_last = best_loss
    checkpoints = apgd_checkpoints(steps)
    for i in range(steps):
        keep = active.keep()
        if keep is not None:  # the broken examples leave; every per-example state follows
            delta, previous, grad, eta, loss, increases = (t[keep] for t in (delta, previous, grad, eta, loss,
                                                                             increases))
            best_loss, best_delta, best_grad, halved_last, best_at_last = (
                t[keep] for t in (best_loss, best_delta, best_grad, halved_last, best_at_last))
            surface = active.surface
        with torch.no_grad():
            momentum = 1.0 if i == 0 else APGD_MOMENTUM
            z = project(delta + eta * ascent_direction(grad, surface, norm), surface, eps, norm)
            # The momentum step mixes the new point with the last move; project again onto ball and box.
            step = momentum * (z - delta) + (1 - momentum) * (delta - previous)
            previous, delta = delta, project(delta + step, surface, eps, norm)
        new_loss, logits, grad = _value_and_grad(surface, active.objective, delta, i)
        active.offer(delta, logits)
        if active.finished():
            return delta
        increases += (new_loss > loss).float()
        loss = new_loss
        improved = loss > best_loss
        best_loss = torch.where(improved, loss, best_loss)
        best_delta = torch.where(_rows(improved, delta), delta, best_delta)
        best_grad = torch.where(_rows(improved, grad), grad, best_grad)
        if i + 1 in checkpoints:
            oscillating = increases <= APGD_RHO * checkpoints[i + 1]
            stalled = ~halved_last & (best_at_last >= best_loss)
            halve = oscillating | stalled
            eta = torch.where(_rows(halve, eta), eta / 2, eta)
            delta = torch.where(_rows(halve, delta), best_delta, delta)
            grad = torch.where(_rows(halve, grad), best_grad, grad)
            halved_last, best_at_last, increases = halve, best_loss, torch.zeros_like(loss)
    return best_delta


def _start(surface: AttackSurface, eps: float, norm: str, init: Optional[Tensor], random_init: bool) -> Tensor:
    if init is not None:
        return project(init.detach(), surface, eps, norm)
    if random_init:
        return random_start(surface, eps, norm)
    return torch.zeros_like(surface.x)


def run_pgd(
    surface: AttackSurface,
    objective: Callable[[Tensor, int], Tensor],
    *,
    eps: float,
    steps: int,
    alpha: Optional[float] = None,
    norm: str = "linf",
    random_init: bool = True,
    init: Optional[Tensor] = None,
    restarts: int = 1,
    score: Optional[Callable[[Tensor], Tensor]] = None,
    schedule: str = "pgd",
    done_below: Optional[float] = None,
    starts: Optional[Sequence[Tensor]] = None,
    narrow: Optional[Narrow] = None,
) -> AttackResult:
    """Maximise ``objective(surface.forward(delta), step)`` over ``delta`` in the eps-ball.

    Args:
        surface: where ``delta`` lives; ``surface.forward(delta)`` returns logits.
        objective: ``(logits, step) -> value`` to maximise, a scalar or per-example ``(B,)`` (APGD needs
            ``(B,)``; the gradient is that of the sum). ``step`` counts from 0. With sign/normalised steps the
            scale does not matter, but a sum keeps per-example gradients independent of batch size.
        eps, alpha: radius and step size in the user's units; both are multiplied by ``surface.eps_scale``.
            ``alpha`` is needed by ``schedule="pgd"``; APGD sets its own (``2 eps``, then halved).
        steps: number of gradient steps; ``steps=1, alpha=eps`` with ``random_init=False`` is FGSM.
        norm: ``"linf"`` or ``"l2"``.
        random_init: start from a random point of the ball (Madry) instead of 0.
        init: explicit start of the first restart (overrides ``random_init``); projected first.
        restarts: independent runs; every one after the first starts at a random point. Needs ``score``.
        score: ``logits -> (B,)``, lower = worse for the model. When given, the result is, per example, the
            iterate of lowest score over all iterates (the last included) of all restarts. When None, the
            last iterate (PGD) or the best-loss point (APGD): what adversarial training uses.
        schedule: ``"pgd"`` (fixed step ``alpha``) or ``"apgd"`` (Croce & Hein's step-size schedule with
            momentum).
        done_below: with a ``score``, stop as soon as every example has a point scoring below this (with
            :func:`common.attack_losses.example_score`, 1.0: every example misclassified).
        starts: explicit start of each restart (overrides ``init`` and ``random_init``), shaped like
            ``surface.x``, already scaled by ``eps_scale``; projected first. Evaluation draws them for the whole
            batch and passes its rows, so an example's start does not depend on which others are attacked.
        narrow: with ``score`` and ``done_below``, ``rows -> (surface, objective, score)``, the same problem
            restricted to ``rows`` (indices into this batch). An example then leaves the attack as soon as it
            is done (and later restarts start only the others): the same per-example result for
            per-example objectives, without the passes on broken examples.

    The caller chooses the model's mode (``with eval_mode(model)``) — the engine always attacks in eval
    mode. Only ``delta``'s gradient is taken (``torch.autograd.grad``), so parameters' ``.grad`` are untouched.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if restarts < 1 or (restarts > 1 and score is None):
        raise ValueError(f"restarts={restarts}: need >= 1, and a score to choose between restarts")
    if schedule == "pgd" and alpha is None:
        raise ValueError("schedule 'pgd' needs a step size alpha")
    eps = eps * surface.eps_scale
    worst = WorstIterate(score, done_below) if score is not None else None
    if eps == 0 or steps == 0:
        delta = torch.zeros_like(surface.x)
        if worst is not None:
            with torch.no_grad():
                worst.offer(delta, surface.forward(delta))
    active = _Active(surface, objective, worst, narrow if done_below is not None else None)
    for restart in range(restarts if eps and steps else 0):
        if restart:
            if active.finished():
                break
            active.keep()  # later restarts start only the examples not yet done
        if starts is not None:
            delta = project(starts[restart][active.rows].detach(), active.surface, eps, norm)
        else:
            delta = _start(active.surface, eps, norm, init if restart == 0 else None, random_init or restart > 0)
        if schedule == "apgd":
            delta = _apgd_steps(active, delta, eps, steps, norm)
            continue
        delta = _pgd_steps(active, delta, eps, alpha * surface.eps_scale, steps, norm)
        if worst is not None and not active.finished():
            with torch.no_grad():
                active.offer(delta, active.surface.forward(delta))
    if worst is None:
        return AttackResult(delta.detach())
    return AttackResult(worst.delta, worst.logits, worst.score)


def pgd(surface: AttackSurface, objective: Callable[[Tensor, int], Tensor], **kwargs) -> Tensor:
    """:func:`run_pgd`'s ``delta``: detached, shaped like ``surface.x``, inside the ball and the box, zero
    where masked. The training-time entry point (methods, TRADES); keyword arguments as :func:`run_pgd`."""
    return run_pgd(surface, objective, **kwargs).delta
