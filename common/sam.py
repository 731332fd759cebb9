"""Sharpness-Aware Minimization as an update rule around any torch optimizer.

SAM (Foret et al. 2021) minimises ``max_{||e|| <= rho} L(w + e)`` with one ascent step:

    e(w) = rho * g / ||g||                       (SAM)
    e(w) = rho * T^2 g / ||T g||,  T = |w| + eta  (ASAM, Kwon et al. 2021: the ball scales with the weights)

and then descends with the gradient taken at ``w + e(w)``. This module only moves the weights to ``w + e``
(:meth:`SAM.perturb`) and back (:meth:`SAM.restore`); the two forward/backward passes, no_sync, gradient
accumulation, clipping and the base optimizer's step stay in ``common/methods.py`` so that the optimizer
that ``accelerator.prepare`` returned is used unchanged: its state (momentum, Adam moments) is saved by
``accelerator.save_state`` like any other run's, and schedulers keep working.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

_TINY = 1e-12


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
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def perturb(self, grad_scale: float = 1.0, check_finite: Optional[bool] = None) -> bool:
        """Move every parameter with a gradient to ``w + e(w)``, using the gradients in ``.grad``.

        Args:
            grad_scale: the fp16 loss scale the stored gradients carry; they are divided by it first (the
                direction would not change, but ASAM mixes ``w`` and ``g``, and the inf/NaN test must see
                the true gradient).
            check_finite: test the gradient norm for inf/NaN and, if so, move nothing and return False.
                Default: only when ``grad_scale != 1`` (fp16), since the test costs a device sync per step.

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
        norm = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))
        if check_finite is None:
            check_finite = grad_scale != 1.0
        if check_finite and not torch.isfinite(norm):
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
        if self._saved:
            torch._foreach_copy_(list(self._saved), list(self._saved.values()))
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
