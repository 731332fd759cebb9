"""Sharpness-Aware Minimization as an update rule around any torch optimizer.

SAM (Foret et al. 2021) minimises ``max_{||e|| <= rho} L(w + e)`` with one ascent step:

    e(w) = rho * g / ||g||                       (SAM)
    e(w) = rho * T^2 g / ||T g||,  T = |w| + eta  (ASAM, Kwon et al. 2021: the ball scales with the weights)

and then descends with the gradient taken at ``w + e(w)``. :class:`SAM` moves the weights to ``w + e``
(:meth:`SAM.perturb`) and back (:meth:`SAM.restore`); the functions below it run one optimizer step's passes
(no_sync, gradient accumulation, fp16 loss scale, BatchNorm, clipping) around the optimizer that
``accelerator.prepare`` returned, used unchanged: its state (momentum, Adam moments) is saved by
``accelerator.save_state`` like any other run's, and schedulers keep working. :func:`sam_update` is the
``sam`` and ``asam`` update rule (:data:`SAM_UPDATES`); the efficient variants (``common/efficient_sam.py``)
reuse :func:`regrad_at_ascent_point`. The passes they share (``StepContext``, ``backward_all``, ``descend``...)
are in ``common/step.py``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .step import (Objective, StepContext, StepResult, UpdateRule, all_processes, backward_all, descend,
                   fp32_forward, global_norm, loss_scale, params_with_grad)

_TINY = 1e-12


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view that writes through), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


class SAM:
    """Perturb the parameters of ``optimizer`` to the SAM (or ASAM) ascent point and back.

    Args:
        optimizer: the base optimizer (plain or Accelerate-wrapped); only its ``param_groups`` are read.
        rho: radius of the neighbourhood, >= 0 (paper: 0.05 to 0.5).
        adaptive: ASAM's scale-invariant ball.
        eta: ASAM's offset in ``T = |w| + eta``, keeps zero weights perturbable.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rho: float, adaptive: bool = False,
                 eta: float = 0.01):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.optimizer = optimizer
        self.rho = rho
        self.adaptive = adaptive
        self.eta = eta
        self._saved: dict[Tensor, Tensor] = {}

    def _params_with_grad(self) -> list[Tensor]:
        return params_with_grad(self.optimizer)

    @torch.no_grad()
    def perturb(self, grad_scale: float = 1.0, check_finite: Optional[bool] = None,
                agree: Optional[Callable[[Tensor], bool]] = None) -> bool:
        """Move every parameter with a gradient to ``w + e(w)``, using the gradients in ``.grad``.

        Args:
            grad_scale: the fp16 loss scale the stored gradients carry; they are divided by it first (the
                direction would not change, but ASAM mixes ``w`` and ``g``, and the inf/NaN test must see
                the true gradient).
            check_finite: test the gradient norm for inf/NaN and, if so, move nothing and return False.
                Default: only when ``grad_scale != 1`` (fp16), since the test costs a device sync per step.
            agree: turns this process's "the norm is finite" (0-dim bool tensor) into the decision of every
                process (:func:`samat.common.step.all_processes`). Under ``--sam_sync local`` each rank sees
                only its own gradient, and one rank that skipped while another went on to the descent
                pass's all-reduce would leave the collectives and the loss scales mismatched from then on.

        Uses ``torch._foreach_*`` kernels: a handful of launches for the whole model instead of several per
        tensor, which is what keeps a SAM step close to 2x an ERM step on a GPU.
        """
        if self._saved:
            raise RuntimeError("SAM.perturb called twice without restore()")
        params = self._params_with_grad()
        if not params:
            return True
        grads = [p.grad for p in params]
        if grad_scale != 1.0:
            grads = torch._foreach_div(grads, grad_scale)
        if self.adaptive:
            t = torch._foreach_add(torch._foreach_abs(params), self.eta)  # T = |w| + eta
            grads = torch._foreach_mul(grads, t)                          # T g
        # One norm over all parameters (not per tensor): SAM's ball is over the whole weight vector.
        norm = global_norm(grads)
        if check_finite is None:
            check_finite = grad_scale != 1.0
        if check_finite:
            finite = torch.isfinite(norm)
            if not (agree(finite) if agree is not None else bool(finite)):
                return False
        scale = self.rho / (norm + _TINY)
        step = torch._foreach_mul(grads, t) if self.adaptive else grads  # T (T g) = T^2 g for ASAM
        step = torch._foreach_mul(step, scale.to(params[0].device))
        # Keep a copy of w, not e: restoring by copy is exact, (w + e) - e is not in floating point.
        saved = [p.detach().clone() for p in params]
        torch._foreach_add_(params, step)
        self._saved = dict(zip(params, saved))
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved weights back exactly; keeps the current ``.grad`` (the descent gradient)."""
        params, saved = list(self._saved), list(self._saved.values())
        if params and any(_is_dtensor(p) for p in params):
            # FSDP2's sharded parameters: DTensor has no sharding rule for _foreach_copy_; each shard copies
            # its own saved shard (no gathering).
            torch._foreach_copy_([_local(p) for p in params], [_local(w) for w in saved])
        elif params:
            torch._foreach_copy_(params, saved)
        self._saved = {}


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Run a forward in train mode without touching BatchNorm running statistics.

    The second SAM pass (at ``w + e``) must normalise with batch statistics like the first, but must not
    pull the running mean/var towards the perturbed network's activations. Momentum 0 keeps the running
    stats (``running = (1 - 0) * running + 0 * batch``); ``num_batches_tracked`` is restored too, since a
    ``momentum=None`` (cumulative average) layer reads it.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(layers, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


# ----------------------------------------------------------------------------------------------------
# The SAM passes of one optimizer step (the shared ones are in common/step.py).


def regrad_at_ascent_point(ctx: StepContext, objective: Objective, micro_batches: list[dict], prepared: list,
                           sam: SAM) -> bool:
    """From the gradient at ``w`` in ``.grad``: move to ``w + e``, replace ``.grad`` by the all-reduced
    gradient there (in fp32 whatever the training precision; BatchNorm running stats untouched), move back to
    ``w`` exactly. Returns False, with nothing moved and ``.grad`` cleared, on an fp16 overflow in the first
    gradient (the loss scale backs off, as GradScaler would); the overflow decision is agreed by every
    process."""
    scaler = ctx.accelerator.scaler
    scale = loss_scale(ctx)
    moved = sam.perturb(grad_scale=scale, check_finite=scaler is not None,
                        agree=lambda finite: all_processes(ctx.accelerator, finite))
    ctx.optimizer.zero_grad(set_to_none=True)
    if not moved:
        if scaler is not None:
            scaler.update(scale * scaler.get_backoff_factor())
        return False
    # Pass 2 at w + e: the descent gradient, all-reduced; BatchNorm running stats keep pass 1's update. In
    # fp32 under bf16/fp16 training: autocast's per-op cast would round most of e away (fp32_forward).
    with frozen_batchnorm_stats(ctx.model), fp32_forward(ctx.unwrapped):
        backward_all(ctx, objective, micro_batches, prepared, sync_last=True)
    sam.restore()
    return True


def sam_update(ctx: StepContext, objective: Objective, micro_batches: list[dict]) -> StepResult:
    """SAM (or ASAM): the gradient at ``w`` sets ``e``, the gradient at ``w + e`` moves ``w``."""
    m = ctx.method
    sam = SAM(ctx.optimizer, rho=m.rho, adaptive=m.method.update == "asam", eta=m.eta)
    prepared = [objective.prepare(ctx, b) for b in micro_batches]
    # Pass 1 at w: the ascent gradient. Local (per-replica) unless --sam_sync global.
    loss = backward_all(ctx, objective, micro_batches, prepared, sync_last=m.sam_sync == "global")
    if not regrad_at_ascent_point(ctx, objective, micro_batches, prepared, sam):
        return StepResult(loss=loss, skipped=True)
    return StepResult(loss=loss, skipped=descend(ctx))


SAM_UPDATES: dict[str, UpdateRule] = {"sam": sam_update, "asam": sam_update}
