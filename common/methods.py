"""Training methods = a training objective × an update rule.

Objectives (what loss is minimised):
    clean   the task loss on clean inputs (ERM)
    pgd     the task loss on PGD-K adversarial inputs (Madry et al. 2018)
    fgsm    the task loss on FGSM inputs from a random start, step 1.25·eps (Wong et al. 2020, "fast AT")
    trades  CE(clean) + beta · KL(f(x) || f(x_adv)), x_adv maximising the KL (Zhang et al. 2019)

Update rules (how the gradient of that loss moves the weights):
    plain   one forward/backward, base optimizer step
    sam     gradient at w + rho·g/||g||, base optimizer step at w (Foret et al. 2021)
    asam    the same with the ball scaled by |w| + eta (Kwon et al. 2021)
    sam-every-k, looksam, ae-sam   SAM's second pass on only some steps (common/efficient_sam.py)

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

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import eval_mode, pgd
from .config import MethodArgs, parse_eps
from .errors import UsageError, lookup
from .efficient_sam import AESAM_DEFAULTS, EFFICIENT_UPDATES, LOOKSAM_ALPHA, SAM_INTERVAL
from .registry import METHODS, UPDATE_RULES, Method  # noqa: F401  (Method: part of this module's API)
from .sam import StepResult, plain_update, sam_update  # noqa: F401  (StepResult: part of this module's API)
from .task import Task


DEFAULT_RHO = {name: rule.defaults["rho"] for name, rule in UPDATE_RULES.items() if "rho" in rule.defaults}


@dataclass
class ResolvedMethod:
    """A method with every hyper-parameter decided (floats, not strings)."""

    method: Method
    rho: float = 0.0
    eta: float = 0.01
    sam_sync: str = "local"
    eps: float = 0.0
    alpha: float = 0.0
    steps: int = 0
    norm: str = "linf"
    trades_beta: float = 6.0
    clean_weight: float = 0.0
    sam_interval: int = SAM_INTERVAL
    looksam_alpha: float = LOOKSAM_ALPHA
    aesam_delta: float = AESAM_DEFAULTS["aesam_delta"]
    aesam_c_start: float = AESAM_DEFAULTS["aesam_c_start"]
    aesam_c_end: float = AESAM_DEFAULTS["aesam_c_end"]

    def describe(self) -> dict:
        """Only the hyper-parameters the method uses (for results.json and tables)."""
        out: dict[str, Any] = {"method": self.method.name}
        flags = self.method.flags
        if "rho" in flags:
            out["rho"] = self.rho
        if "sam_sync" in flags:
            out["sam_sync"] = self.sam_sync
        if self.method.update == "asam":
            out["asam_eta"] = self.eta
        for name in ("sam_interval", "looksam_alpha", "aesam_delta", "aesam_c_start", "aesam_c_end"):
            if name in flags:
                out[name] = getattr(self, name)
        if self.method.objective != "clean":
            out.update(eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm)
        if self.method.objective == "trades":
            out["trades_beta"] = self.trades_beta
        elif self.method.objective != "clean":
            out["at_clean_weight"] = self.clean_weight
        return out


def resolve_method(name: str, args: MethodArgs, task: Task, explicit: set[str]) -> ResolvedMethod:
    """Check the flags against the method and fill the task's defaults.

    ``explicit`` is the set of MethodArgs fields the user set; a flag the method does not read is an error
    rather than silently ignored.
    """
    method = lookup(METHODS, "method", name)
    unused = sorted(explicit - method.flags)
    if unused:
        raise UsageError(f"--{unused[0]} does not apply to --method {name} (it uses: "
                         f"{', '.join('--' + f for f in sorted(method.flags)) or 'no method flags'})")
    defaults = task.defaults
    norm = args.train_norm or defaults.train_norm
    resolved = ResolvedMethod(method=method, sam_sync=args.sam_sync, eta=args.asam_eta,
                              trades_beta=args.trades_beta, norm=norm)
    if "rho" in method.flags:
        resolved.rho = DEFAULT_RHO[method.update] if args.rho is None else args.rho
    for name in ("sam_interval", "looksam_alpha", "aesam_delta", "aesam_c_start", "aesam_c_end"):
        if getattr(args, name) is not None:  # else the paper's default, a field default of ResolvedMethod
            setattr(resolved, name, getattr(args, name))
    if "at_clean_weight" in method.flags:
        resolved.clean_weight = (defaults.at_clean_weight if args.at_clean_weight is None
                                 else args.at_clean_weight)
    if method.objective != "clean":
        eps_text = args.train_eps or defaults.train_eps(norm)
        resolved.eps = parse_eps(eps_text, pixel_space=task.pixel_space and norm == "linf", flag="--train_eps")
        resolved.steps = 1 if method.objective == "fgsm" else (args.train_steps or defaults.train_steps)
        if args.train_alpha:
            resolved.alpha = parse_eps(args.train_alpha, pixel_space=task.pixel_space and norm == "linf",
                                       flag="--train_alpha")
        elif method.objective == "fgsm":
            resolved.alpha = 1.25 * resolved.eps  # Wong et al. 2020
        else:
            # Madry's 2/255 steps for an 8/255 ball: alpha = eps/4 unless the task says otherwise.
            resolved.alpha = defaults.train_alpha_ratio * resolved.eps
    return resolved


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

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)


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


def _kl(logits_adv: Tensor, probs_clean: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean over examples (and pixels) of KL(p_clean || p_adv); class dim is 1. ``mask`` (logits' shape
    without the class dim) keeps only the positions that count, e.g. not ``ignore_index`` pixels."""
    log_q = F.log_softmax(logits_adv.float(), dim=1)
    kl = (probs_clean * (probs_clean.clamp_min(1e-12).log() - log_q)).sum(dim=1)
    if mask is None:
        return kl.mean()
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


OBJECTIVES = {"clean": CleanObjective(), "pgd": AdversarialObjective(), "fgsm": AdversarialObjective(),
              "trades": TradesObjective()}


# ----------------------------------------------------------------------------------------------------
# Updates


UPDATES = {"plain": plain_update, "sam": sam_update, "asam": sam_update, **EFFICIENT_UPDATES}


def train_step(ctx: StepContext, micro_batches: list[dict]) -> StepResult:
    """One optimizer step of ``ctx.method`` over ``micro_batches`` (gradient accumulation = their count)."""
    objective = OBJECTIVES[ctx.method.method.objective]
    return UPDATES[ctx.method.method.update](ctx, objective, micro_batches)
