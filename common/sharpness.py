"""Weight-space sharpness: how much can the loss rise within a rho-ball around the trained weights?

This is the quantity SAM minimises, measured after training on any model, so that a model's *weight-space*
flatness can be set next to its *input-space* robust accuracy (the duality of Zhang et al., ICML 2024).

Estimator (``estimate_sharpness``)::

    sharpness(w; rho) = max_{ ||T_w^{-1} e||_2 <= rho }  L_S(w + e)  -  L_S(w)

- ``L_S`` is the task's training loss (``task.loss(task.forward(model, batch), batch)``) averaged over a
  **fixed** evaluation subset ``S`` (the ``batches`` argument, weighted by batch size). One perturbation
  ``e`` serves the whole subset, so this is the "full-batch" sharpness with ``m = |S|`` (Foret et al.'s
  m-sharpness with m = the subset size), not the per-mini-batch form SAM trains with.
- ``T_w = I`` for plain SAM sharpness (an L2 ball of radius ``rho`` over all trainable parameters
  together). ``T_w = diag(|w| + eta)`` for the adaptive (ASAM, Kwon et al. 2021) form: the ball is
  stretched elementwise by the weights' magnitude, which makes the number invariant to rescalings of the
  weights that leave the function unchanged (e.g. a ReLU layer scaled by c and the next by 1/c).
- The max is found by projected gradient *ascent* in the scaled coordinates ``z = T_w^{-1} e``:
  step 1 is SAM's own first-order solution ``z = rho * T g / ||T g||`` (``g = grad L_S``; at an exact
  stationary point, where ``g = 0``, a fixed seeded random direction instead), each later step moves ``z``
  by ``rho / 2`` along the normalised ascent direction and projects it back into the ball.
  The best (highest-loss) iterate is kept, so the result is a lower bound on the true maximum that never
  falls below the one-step (SAM) estimate and grows with ``steps``.
- Runs in **eval mode**: BatchNorm uses its running statistics and dropout is off, so ``L_S`` is a
  deterministic function of the weights alone (in train mode the loss would also move with batch
  statistics and dropout masks, and the BatchNorm running buffers would be overwritten by the probe).
  It also matches the mode in which clean and robust accuracy are measured.

Cost: ``(1 + steps)`` forward and backward passes over ``S`` per (form, rho), plus one forward pass for
``L_S(w)`` shared by a whole :func:`sharpness_report`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from .attacks import eval_mode
from .config import parse_eps

_TINY = 1e-12


def _batch_size(batch: dict) -> int:
    """Number of examples in a batch dict: the leading dim of its first tensor (1 if it has none)."""
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def collect_batches(batches: Iterable[dict], max_examples: int,
                    device: Optional[torch.device | str] = None) -> list[dict]:
    """The first ``max_examples`` examples of ``batches`` (any iterable of batch dicts, e.g. an eval
    DataLoader without shuffling), as a list of batch dicts with tensors on ``device``: the fixed subset
    ``S`` of the estimator. The last batch is cut so that exactly ``min(max_examples, available)`` examples
    are kept; non-tensor values are kept as they are."""
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples!r}")
    out: list[dict] = []
    left = max_examples
    for batch in batches:
        n = min(_batch_size(batch), left)
        out.append({k: (v[:n].to(device) if device is not None else v[:n])
                    if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in batch.items()})
        left -= n
        if left == 0:
            break
    return out


def _subset_loss(model: nn.Module, task: Any, batches: Sequence[dict], params: list[nn.Parameter],
                 with_grad: bool) -> tuple[float, Optional[list[Tensor]]]:
    """``L_S`` (example-weighted mean of the per-batch task losses) and, if ``with_grad``, its gradient
    with respect to ``params`` (taken with ``autograd.grad``, so no ``.grad`` field is touched)."""
    total = sum(_batch_size(b) for b in batches)
    loss_sum = 0.0
    grads: Optional[list[Tensor]] = [torch.zeros_like(p) for p in params] if with_grad else None
    for batch in batches:
        weight = _batch_size(batch) / total
        with torch.set_grad_enabled(with_grad):
            loss = task.loss(task.forward(model, batch), batch)
            if with_grad:
                batch_grads = torch.autograd.grad(loss * weight, params, allow_unused=True)
                for acc, g in zip(grads, batch_grads):  # type: ignore[arg-type]
                    if g is not None:
                        acc.add_(g)
        loss_sum += float(loss.detach()) * weight
    return loss_sum, grads


def _scale(params: list[nn.Parameter], originals: list[Tensor], adaptive: bool, eta: float) -> list[Tensor]:
    """The diagonal of ``T_w``: ``|w| + eta`` per element (adaptive) or ones."""
    if adaptive:
        return [w.abs() + eta for w in originals]
    return [torch.ones_like(p) for p in params]


def estimate_sharpness(
    model: nn.Module,
    task: Any,
    batches: Sequence[dict],
    rho: float,
    steps: int = 5,
    adaptive: bool = False,
    eta: float = 0.01,
    base_loss: Optional[float] = None,
) -> dict[str, Any]:
    """Worst-case loss increase within a rho-ball around ``model``'s weights (see the module docstring).

    Args:
        model: the trained model, **unwrapped** (not DDP: the probe takes gradients on one process only).
            All parameters with ``requires_grad`` are perturbed.
        task: a :class:`common.task.Task` (``forward(model, batch) -> logits``, ``loss(logits, batch) ->
            scalar``); any object with those two methods works.
        batches: the fixed evaluation subset, batch dicts already on the model's device. Use the same
            subset for every model that is to be compared.
        rho: ball radius, ``>= 0``; in weight units for SAM, in units of ``|w| + eta`` for ``adaptive``.
        steps: ascent steps, ``>= 1``; ``1`` is the one-step SAM estimate.
        adaptive: ASAM's elementwise-scaled ball ``||e / (|w| + eta)||_2 <= rho``.
        eta: ASAM's ``eta`` (keeps zero weights perturbable), ``>= 0``.
        base_loss: ``L_S(w)`` if the caller already has it (saves one pass).

    Returns:
        ``{"rho", "adaptive", "eta", "steps", "num_examples", "loss": L_S(w), "perturbed_loss":
        L_S(w + e*), "sharpness": perturbed_loss - loss (>= 0), "perturbation_norm": ||e*||_2}``.
        At ``rho == 0`` no ascent runs and ``sharpness`` is exactly 0.

    The model's weights (bit for bit), every submodule's ``training`` flag, each parameter's ``.grad``
    and ``requires_grad`` are as before the call, also when it raises.
    """
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if not batches:
        raise ValueError("batches is empty: the estimate needs a fixed, non-empty evaluation subset")
    params = [p for p in model.parameters() if p.requires_grad]
    result: dict[str, Any] = {"rho": float(rho), "adaptive": bool(adaptive), "eta": float(eta),
                              "steps": int(steps), "num_examples": sum(_batch_size(b) for b in batches)}
    with eval_mode(model):
        if base_loss is None:
            base_loss, _ = _subset_loss(model, task, batches, params, with_grad=False)
        if rho == 0 or not params:
            return {**result, "loss": base_loss, "perturbed_loss": base_loss, "sharpness": 0.0,
                    "perturbation_norm": 0.0}
        originals = [p.detach().clone() for p in params]
        scale = _scale(params, originals, adaptive, eta)
        best_loss, best_norm = base_loss, 0.0
        z = [torch.zeros_like(p) for p in params]  # the perturbation in scaled coordinates: e = T z
        try:
            _, grads = _subset_loss(model, task, batches, params, with_grad=True)
            for step in range(steps):
                # Ascent direction in z: d/dz L(w + T z) = T g; normalised so the step length is rho-relative.
                tg = [t * g for t, g in zip(scale, grads)]  # type: ignore[arg-type]
                tg_norm = torch.sqrt(sum((v.double() ** 2).sum() for v in tg)).item()
                if tg_norm < _TINY:
                    if step > 0:  # a stationary point of the perturbed loss: nothing left to climb
                        break
                    # At an exact minimum g = 0 has no direction; start from a fixed pseudo-random one
                    # (seeded, so the estimate stays deterministic) and let the ascent steps turn it.
                    gen = torch.Generator().manual_seed(0)
                    tg = [torch.randn(p.shape, generator=gen).to(p) for p in params]
                    tg_norm = torch.sqrt(sum((v.double() ** 2).sum() for v in tg)).item()
                step_size = rho if step == 0 else rho / 2
                z = [zi + (step_size / tg_norm) * v for zi, v in zip(z, tg)]
                z_norm = torch.sqrt(sum((zi.double() ** 2).sum() for zi in z)).item()
                if z_norm > rho:  # project back onto the ball
                    z = [zi * (rho / z_norm) for zi in z]
                with torch.no_grad():
                    for p, w, t, zi in zip(params, originals, scale, z):
                        p.copy_(w + t * zi)
                # The last iterate needs no gradient, only its loss.
                last = step == steps - 1
                loss, grads = _subset_loss(model, task, batches, params, with_grad=not last)
                if loss > best_loss:
                    e_norm = torch.sqrt(sum(((t * zi).double() ** 2).sum() for t, zi in zip(scale, z))).item()
                    best_loss, best_norm = loss, e_norm
        finally:
            with torch.no_grad():
                for p, w in zip(params, originals):
                    p.copy_(w)
    return {**result, "loss": base_loss, "perturbed_loss": best_loss, "sharpness": best_loss - base_loss,
            "perturbation_norm": best_norm}


def sharpness_report(
    model: nn.Module,
    task: Any,
    batches: Sequence[dict],
    rhos: Iterable[float] = (0.05, 0.1),
    adaptive_rhos: Iterable[float] = (0.5, 1.0),
    steps: int = 5,
    eta: float = 0.01,
) -> dict[str, Any]:
    """Sharpness at several radii, SAM and ASAM form, shaped for ``results.json["sharpness"]``.

    Returns::

        {"estimator": "...one line...", "steps": 5, "eta": 0.01, "num_examples": N, "loss": L_S(w),
         "sam":  {"0.05": {"perturbed_loss": .., "sharpness": .., "perturbation_norm": ..}, ...},
         "asam": {"0.5": {...}, ...}}

    Keys under ``"sam"``/``"asam"`` are the radii as ``str(float)``. Radii are the same for every run of a
    sweep (they are probes, not the training rho), so that numbers are comparable across models; the
    ASAM defaults are 10x the SAM ones, as in Kwon et al. (their ball is relative to ``|w|``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with eval_mode(model):
        base_loss, _ = _subset_loss(model, task, batches, params, with_grad=False)
    report: dict[str, Any] = {
        "estimator": "max loss increase over ||e/T||_2<=rho (T=1: sam, T=|w|+eta: asam), projected ascent "
                     "on a fixed eval subset, eval mode",
        "steps": int(steps), "eta": float(eta), "num_examples": sum(_batch_size(b) for b in batches),
        "loss": base_loss, "sam": {}, "asam": {},
    }
    for kind, radii in (("sam", rhos), ("asam", adaptive_rhos)):
        for rho in radii:
            est = estimate_sharpness(model, task, batches, float(rho), steps=steps, adaptive=kind == "asam",
                                     eta=eta, base_loss=base_loss)
            report[kind][str(float(rho))] = {k: est[k] for k in ("perturbed_loss", "sharpness",
                                                                  "perturbation_norm")}
    return report


def measure_sharpness(model: nn.Module, task: Any, eval_set: Any, collate_fn: Any, evals: Any,
                      accelerator: Any) -> Optional[dict]:
    """Weight-space sharpness (:func:`sharpness_report`) on the first ``--sharpness_examples`` evaluation examples,
    on the main process (the probe perturbs one replica's weights), in eval mode. ``None`` when skipped."""
    if not evals.sharpness_examples:
        return None
    report = None
    if accelerator.is_main_process:
        n = min(evals.sharpness_examples, len(eval_set))
        loader = DataLoader(Subset(eval_set, range(n)), batch_size=64, shuffle=False, collate_fn=collate_fn)
        batches = [{k: v.to(accelerator.device) if isinstance(v, Tensor) else v for k, v in b.items()}
                   for b in loader]
        rhos = [parse_eps(r, pixel_space=False, flag="--sharpness_rho") for r in evals.sharpness_rho]
        asam = [parse_eps(r, pixel_space=False, flag="--sharpness_asam_rho") for r in evals.sharpness_asam_rho]
        # No autocast here: sharpness is a small difference of losses, and a weight perturbation of radius rho
        # does not survive a per-op bf16 cast (README, "Precision and processes"); the run's evaluation calls
        # this inside common.step.fp32_forward, whatever --eval_precision says.
        report = sharpness_report(model, task, batches, rhos=rhos, adaptive_rhos=asam,
                                  steps=evals.sharpness_steps)
    accelerator.wait_for_everyone()
    return report
