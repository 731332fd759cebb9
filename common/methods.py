"""Training methods = a training objective × an update rule.

Objectives (what loss is minimised):
    clean   the task loss on clean inputs (ERM)
    pgd     the task loss on PGD-K adversarial inputs (Madry et al. 2018)
    fgsm    the task loss on FGSM inputs from a random start, step 1.25·eps (Wong et al. 2020, "fast AT")
    trades  CE(clean) + beta · KL(f(x) || f(x_adv)), x_adv maximising the KL (Zhang et al. 2019)

Update rules (how the gradient of that loss moves the weights):
    plain   one forward/backward, base optimizer step (common/step.py)
    sam     gradient at w + rho·g/||g||, base optimizer step at w (Foret et al. 2021; common/sam.py)
    asam    the same with the ball scaled by |w| + eta (Kwon et al. 2021; common/sam.py)
    sam-every-k, looksam, ae-sam   SAM's second pass on only some steps (common/efficient_sam.py)
    esam    SAM with a random subset of the weights perturbed, the second pass on the examples whose loss
            rises most (common/efficient_sam.py)
    saf, mesa   no second pass: a trajectory loss, KL to past or EMA outputs (common/saf.py)

The rules' names, summaries, flags and defaults are ``common/registry.py``'s ``UPDATE_RULES``; their
implementations are :data:`UPDATES` here, under the same names. A method's hyper-parameters are resolved in
``common/method_config.py``; one optimizer step's context and shared passes are in ``common/step.py``.

Adversarial inputs are made once per optimizer step at the current weights ``w``, in eval mode; ``sam-at``
uses the same ``x_adv`` for both SAM passes (re-attacking at ``w + e`` would double the cost of AT).

Gradient accumulation: an optimizer step covers ``K`` micro-batches. SAM perturbs and descends once per
optimizer step: the ascent direction ``e`` comes from the gradient summed over all ``K`` micro-batches of
the step (the "full-batch" choice: identical to SAM on one batch ``K`` times larger), then the descent
gradient is accumulated over the same ``K`` micro-batches at ``w + e``.

Multi-process (DDP): with ``--sam_sync local`` (default, as the original SAM's m-sharpness over per-device
batches) the first pass runs under ``accelerator.no_sync`` so each replica climbs along its own gradient;
with ``global`` the first gradient is all-reduced and every replica climbs to the same point. The second
(descent) gradient is always all-reduced.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .attacks import eval_mode, pgd
from .efficient_sam import EFFICIENT_UPDATES
# Re-exported: this module is where a caller finds everything about methods (the registry's table, the
# resolved hyper-parameters, the step's context and result).
from .method_config import DEFAULT_RHO, ResolvedMethod, resolve_method  # noqa: F401
from .registry import METHODS, UPDATE_RULES, Method  # noqa: F401
from .saf import TRAJECTORY_UPDATES
from .sam import SAM_UPDATES
from .step import Objective, StepContext, StepResult, UpdateRule, plain_update  # noqa: F401


# ----------------------------------------------------------------------------------------------------
# Objectives: prepare(ctx, batch) runs once per micro-batch at the current weights (the attack);
# loss(ctx, batch, prepared) is the differentiable training loss and may run twice (SAM).


def _attack_delta(ctx: StepContext, batch: dict, objective: Callable[[Tensor, int], Tensor],
                  *, random_init: bool = True, init: Optional[Tensor] = None) -> Tensor:
    m = ctx.method
    model = ctx.unwrapped
    with eval_mode(model):
        surface = ctx.task.surface(model, batch)
        return pgd(surface, objective, eps=m.eps, alpha=m.alpha, steps=m.steps, norm=m.norm,
                   random_init=random_init, init=init)


def _kl(logits_adv: Tensor, probs_clean: Tensor, mask: Optional[Tensor] = None, per_example: bool = False
        ) -> Tensor:
    """Mean over examples (and pixels) of KL(p_clean || p_adv); class dim is 1. ``mask`` (logits' shape
    without the class dim) keeps only the positions that count, e.g. not ``ignore_index`` pixels.
    ``per_example``: ``(B,)``, each example's mean over its own (counted) positions, instead."""
    log_q = F.log_softmax(logits_adv.float(), dim=1)
    kl = (probs_clean * (probs_clean.clamp_min(1e-12).log() - log_q)).sum(dim=1)
    if mask is None:
        return kl.flatten(1).mean(1) if per_example and kl.dim() > 1 else (kl if per_example else kl.mean())
    if per_example:
        return (kl * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def _clean_and_adversarial_logits(ctx: StepContext, batch: dict, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Logits at ``x`` and at ``x + delta`` from one forward over a doubled batch: DDP allows one forward
    per backward, and it halves kernel launches. (BatchNorm then sees clean and adversarial inputs together.)"""
    doubled = {k: torch.cat([v, v]) if isinstance(v, Tensor) else v for k, v in batch.items()}
    surface = ctx.task.surface(ctx.model, doubled)
    return surface.forward(torch.cat([torch.zeros_like(delta), delta])).chunk(2)


class CleanObjective:
    def prepare(self, ctx: StepContext, batch: dict) -> None:
        return None

    def loss(self, ctx: StepContext, batch: dict, prepared: None) -> Tensor:
        return ctx.task.loss(ctx.task.forward(ctx.model, batch), batch)

    def example_losses(self, ctx: StepContext, batch: dict, prepared: None) -> Tensor:
        """The loss per example ``(B,)`` (ESAM ranks examples by it; its mean is :meth:`loss`)."""
        return ctx.task.example_losses(ctx.task.forward(ctx.model, batch), batch)


class AdversarialObjective:
    """PGD-K (``random_init``) or FGSM-RS (``steps == 1``) adversarial training on the task loss, optionally
    mixed with the clean loss (``--at_clean_weight``)."""

    def prepare(self, ctx: StepContext, batch: dict) -> Tensor:
        return _attack_delta(ctx, batch, lambda logits, step: ctx.task.loss(logits, batch))

    def loss(self, ctx: StepContext, batch: dict, delta: Tensor) -> Tensor:
        w = ctx.method.clean_weight
        if w == 0:
            surface = ctx.task.surface(ctx.model, batch)
            return ctx.task.loss(surface.forward(delta), batch)
        clean, adv = _clean_and_adversarial_logits(ctx, batch, delta)
        return (1 - w) * ctx.task.loss(adv, batch) + w * ctx.task.loss(clean, batch)

    def example_losses(self, ctx: StepContext, batch: dict, delta: Tensor) -> Tensor:
        """:meth:`loss` per example ``(B,)``, from the same forward(s)."""
        w = ctx.method.clean_weight
        if w == 0:
            return ctx.task.example_losses(ctx.task.surface(ctx.model, batch).forward(delta), batch)
        clean, adv = _clean_and_adversarial_logits(ctx, batch, delta)
        return (1 - w) * ctx.task.example_losses(adv, batch) + w * ctx.task.example_losses(clean, batch)


class TradesObjective:
    """TRADES: CE(f(x), y) + beta · KL(f(x) || f(x + delta)), both halves from one forward."""

    def prepare(self, ctx: StepContext, batch: dict) -> Tensor:
        model = ctx.unwrapped
        with eval_mode(model), torch.no_grad():
            probs = F.softmax(ctx.task.forward(model, batch).float(), dim=1)
        surface_x = ctx.task.surface(model, batch).x
        # TRADES starts from a tiny Gaussian, not a uniform point of the ball: the KL is 0 with zero
        # gradient exactly at delta = 0.
        init = 0.001 * torch.randn_like(surface_x)
        mask = ctx.task.loss_mask(batch)
        return _attack_delta(ctx, batch, lambda logits, step: _kl(logits, probs, mask), random_init=False,
                             init=init)

    def loss(self, ctx: StepContext, batch: dict, delta: Tensor) -> Tensor:
        clean, adv = _clean_and_adversarial_logits(ctx, batch, delta)
        kl = _kl(adv, F.softmax(clean.float(), 1), ctx.task.loss_mask(batch))
        return ctx.task.loss(clean, batch) + ctx.method.trades_beta * kl

    def example_losses(self, ctx: StepContext, batch: dict, delta: Tensor) -> Tensor:
        """:meth:`loss` per example ``(B,)``."""
        clean, adv = _clean_and_adversarial_logits(ctx, batch, delta)
        kl = _kl(adv, F.softmax(clean.float(), 1), ctx.task.loss_mask(batch), per_example=True)
        return ctx.task.example_losses(clean, batch) + ctx.method.trades_beta * kl


OBJECTIVES: dict[str, Objective] = {"clean": CleanObjective(), "pgd": AdversarialObjective(),
                                    "fgsm": AdversarialObjective(), "trades": TradesObjective()}


# ----------------------------------------------------------------------------------------------------
# Updates


# Every update rule of the registry's UPDATE_RULES, by the same name; each family's module lists its own.
UPDATES: dict[str, UpdateRule] = {"plain": plain_update, **SAM_UPDATES, **EFFICIENT_UPDATES, **TRAJECTORY_UPDATES}


def train_step(ctx: StepContext, micro_batches: list[dict]) -> StepResult:
    """One optimizer step of ``ctx.method`` over ``micro_batches`` (gradient accumulation = their count)."""
    objective = OBJECTIVES[ctx.method.method.objective]
    return UPDATES[ctx.method.method.update](ctx, objective, micro_batches)
