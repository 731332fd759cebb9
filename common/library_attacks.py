"""AutoAttack's four attacks from ``pyautoattack`` (Croce & Hein's own code, packaged on PyPI).

Only pixel-space classifiers qualify: the library attacks a callable ``x -> logits`` with ``x`` ``(n, C, H, W)``
in ``[0, 1]`` and ``n`` any subset of the batch (it drops examples once fooled). samat's models normalise
inside, so eps is in pixels, as the library expects. Settings are the "standard" AutoAttack's
(``pyautoattack.AutoAttack._set_version("standard")``): 100 iterations, 9 target classes (fewer when the
model has fewer classes), Square with 5000 queries and ``p_init=0.8``.

The library re-seeds the global RNG inside ``perturb`` and FAB calls ``.backward()``; both are fenced off here
(:func:`torch.random.fork_rng`, parameters frozen) so an evaluation leaves no trace on training state.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .errors import UsageError

LIBRARY_ATTACKS = ("aa-apgd-ce", "aa-apgd-t", "aa-fab-t", "aa-square")
WHITE_BOX = ("aa-apgd-ce", "aa-apgd-t", "aa-fab-t")
_NORMS = {"linf": "Linf", "l2": "L2"}
_ITERATIONS = 100
_SQUARE_QUERIES = 5000
_log = logging.getLogger("samat.autoattack")


class _Classifier(nn.Module):
    """The library's model: ``x -> float logits (n, K)``."""

    def __init__(self, classify: Callable[[Tensor], Tensor]):
        super().__init__()
        self.classify = classify

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(x).float()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad for the duration, so library ``.backward()`` calls reach the input only
    (and leave every ``.grad`` as found); their flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _build(name: str, model: nn.Module, *, eps: float, norm: str, restarts: int, seed: int, classes: int,
           iterations: int, square_queries: int):
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from pyautoattack.fab_pt import FABAttack_PT
    from pyautoattack.square import SquareAttack

    lib_norm, targets = _NORMS[norm], min(9, classes - 1)
    if name == "aa-apgd-ce":
        return APGDAttack(model, n_iter=iterations, norm=lib_norm, n_restarts=restarts, eps=eps, seed=seed,
                          loss="ce", rho=0.75, logger=_log)
    if name == "aa-apgd-t":
        if classes < 4:  # its targeted DLR loss reads the 4th-largest logit
            raise UsageError(f"aa-apgd-t needs at least 4 classes; this model has {classes}")
        return APGDAttack_targeted(model, n_iter=iterations, norm=lib_norm, n_restarts=restarts, eps=eps,
                                   seed=seed, rho=0.75, n_target_classes=targets, logger=_log)
    if name == "aa-fab-t":
        return FABAttack_PT(model, norm=lib_norm, n_restarts=restarts, n_iter=iterations, eps=eps, seed=seed,
                            targeted=True, n_target_classes=targets)
    if name == "aa-square":
        return SquareAttack(model, p_init=0.8, n_queries=square_queries, eps=eps, norm=lib_norm,
                            n_restarts=restarts, seed=seed, resc_schedule=False)
    raise ValueError(f"unknown library attack {name!r}; choose one of: {', '.join(LIBRARY_ATTACKS)}")


def library_attack(name: str, classify: Callable[[Tensor], Tensor], model: nn.Module, x: Tensor, labels: Tensor,
                   *, eps: float, norm: str, restarts: int = 1, seed: int = 0,
                   iterations: int = _ITERATIONS, square_queries: int = _SQUARE_QUERIES) -> Tensor:
    """Run one of :data:`LIBRARY_ATTACKS` and return ``x_adv`` ``(B, C, H, W)`` in ``[0, 1]``.

    Args:
        classify: ``x -> logits (n, K)`` for pixels ``x`` in ``[0, 1]`` (the model in eval mode).
        model: the module behind ``classify``, frozen while the library runs.
        x: clean pixels ``(B, C, H, W)`` in ``[0, 1]``; ``labels``: ``(B,)`` int.
        eps: radius in pixels; ``norm``: ``"linf"`` or ``"l2"``.
        restarts: the library's ``n_restarts``; ``seed``: its seed (the global RNG is restored afterwards).
        iterations, square_queries: the standard 100 and 5000; tests and diagnostics lower them.

    Examples the attack does not fool come back unchanged (the library's convention); the caller decides
    per example whether the result beats the clean point.
    """
    if eps == 0:
        return x.detach().clone()
    wrapped = _Classifier(classify)
    with torch.no_grad():
        classes = wrapped(x[:1]).shape[1]
    attack = _build(name, wrapped, eps=eps, norm=norm, restarts=restarts, seed=seed, classes=classes,
                    iterations=iterations, square_queries=square_queries)
    attack.device = x.device
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), frozen(model):
        x_adv = attack.perturb(x.detach().float(), labels.detach())
    return x_adv.detach().to(x.dtype)
