"""One projected gradient descent (PGD) for every perturbation space.

The same loop serves pixel space (``x`` in ``[0, 1]``, L-inf or L2 ball per image) and embedding space
(``x`` = token embeddings, a ball per token, padding masked so it never moves). What differs between the
spaces is carried by :class:`common.task.AttackSurface`; what is maximised is the caller's ``objective``
(the task loss, a TRADES KL term, SegPGD's reweighted loss), never a hard-coded cross-entropy.

Core step (Madry et al. 2018): ``delta <- project(delta + alpha * direction(grad))`` where ``direction`` is
``sign`` for L-inf and ``grad / ||grad||_2`` for L2, and ``project`` clips to the eps-ball and keeps
``x + delta`` inside ``bounds``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .task import AttackSurface

NORMS = ("linf", "l2")
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


def pgd(
    surface: AttackSurface,
    objective: Callable[[Tensor, int], Tensor],
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    random_init: bool = True,
    init: Optional[Tensor] = None,
) -> Tensor:
    """Maximise ``objective(surface.forward(delta), step)`` over ``delta`` in the eps-ball.

    Args:
        surface: where ``delta`` lives; ``surface.forward(delta)`` returns logits.
        objective: ``(logits, step) -> scalar`` to maximise, ``step`` in ``[0, steps)``. Sum or mean over the
            batch: with sign/normalised steps the scale does not matter, but a sum keeps per-example gradients
            independent of batch size.
        eps, alpha: radius and step size in the user's units; both are multiplied by ``surface.eps_scale``.
        steps: number of gradient steps; ``steps=1, alpha=eps`` with ``random_init=False`` is FGSM.
        norm: ``"linf"`` or ``"l2"``.
        random_init: start from a random point of the ball (Madry) instead of 0.
        init: explicit start (overrides ``random_init``); projected first. TRADES starts near 0.

    Returns:
        ``delta``, detached, shaped like ``surface.x``, inside the ball and the box, zero where masked.

    The caller chooses the model's mode (``with eval_mode(model)``) — the engine always attacks in eval
    mode. Only ``delta``'s gradient is taken (``torch.autograd.grad``), so parameters' ``.grad`` are untouched.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    eps, alpha = eps * surface.eps_scale, alpha * surface.eps_scale
    if eps == 0 or steps == 0:
        return torch.zeros_like(surface.x)
    if init is not None:
        delta = project(init.detach(), surface, eps, norm)
    elif random_init:
        delta = random_start(surface, eps, norm)
    else:
        delta = torch.zeros_like(surface.x)
    for step in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = objective(surface.forward(delta), step)
            (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = project(delta + alpha * ascent_direction(grad, surface, norm), surface, eps, norm)
    return delta.detach()
