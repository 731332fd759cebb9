"""Per-example attack objectives (CE, DLR, CW) and the per-example score that picks the worst iterate.

Every function takes logits ``(B, K)`` (classification) or ``(B, K, H, W)`` (segmentation; any trailing
position dims work), integer labels shaped like the logits without the class dim, and an optional boolean
``mask`` of the same shape (positions that count; segmentation: not ``ignore_index``). Losses are averaged
over the counted positions of each example, so each returns ``(B,)``: PGD ascends their sum, APGD's
step-size rule needs them per example.

- CE: cross-entropy of the true class.
- CW (Carlini & Wagner 2017): ``max_{k != y} z_k - z_y``, the margin; positive once misclassified.
- DLR (Croce & Hein 2020): the margin divided by ``z_pi1 - z_pi3`` (largest minus third-largest logit),
  invariant to shifting and scaling the logits, so saturated logits cannot hide the gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_TINY = 1e-12


def _flat(logits: Tensor, labels: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, P, K)`` float logits, ``(B, P)`` labels made safe to index with, ``(B, P)`` float weights."""
    batch, classes = logits.shape[:2]
    z = logits.float().movedim(1, -1).reshape(batch, -1, classes)
    valid = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    valid = valid.reshape(batch, -1)
    # Ignored positions carry labels such as 255: point them at class 0, their weight is 0 anyway.
    y = torch.where(valid, labels.reshape(batch, -1), torch.zeros_like(labels.reshape(batch, -1)))
    return z, y, valid.float()


def _mean(values: Tensor, weights: Tensor) -> Tensor:
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _true_and_best_other(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    true = z.gather(-1, y[..., None]).squeeze(-1)
    others = z.scatter(-1, y[..., None], float("-inf"))
    return true, others.amax(dim=-1)


def ce_loss(logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Per-example mean cross-entropy, ``(B,)``, in ``[0, inf)``."""
    z, y, w = _flat(logits, labels, mask)
    return _mean(F.cross_entropy(z.transpose(1, 2), y, reduction="none"), w)


def cw_loss(logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Per-example mean margin ``max_{k != y} z_k - z_y``, ``(B,)``; > 0 where misclassified."""
    z, y, w = _flat(logits, labels, mask)
    true, other = _true_and_best_other(z, y)
    return _mean(other - true, w)


def dlr_loss(logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Per-example mean DLR loss, ``(B,)``, in about ``[-1, 1]``.

    DLR needs a third-largest logit; with 2 classes it is undefined (Croce & Hein use K >= 3) and this
    falls back to the CW margin, which is what a binary DLR would rank by anyway.
    """
    if logits.shape[1] < 3:
        return cw_loss(logits, labels, mask)
    z, y, w = _flat(logits, labels, mask)
    true, other = _true_and_best_other(z, y)
    top = z.topk(3, dim=-1).values
    return _mean((other - true) / (top[..., 0] - top[..., 2] + _TINY), w)


LOSSES: dict[str, Callable[..., Tensor]] = {"ce": ce_loss, "cw": cw_loss, "dlr": dlr_loss}


def example_score(logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """How well the model does on each example, ``(B,)`` float; the attack keeps the iterate where it is lowest.

    The integer part counts correctly predicted positions (argmax, as the metrics count): classification 0
    or 1, segmentation the number of correct pixels. So any misclassifying iterate beats every correct one,
    and for segmentation the iterate with the fewest correct pixels wins. Ties are broken by a term in
    ``[0, 0.5]``, half the mean ``sigmoid(z_y - max_{k != y} z_k)``: the iterate closest to (or furthest
    past) the decision boundary, i.e. the highest margin loss.
    """
    z, y, w = _flat(logits, labels, mask)
    correct = ((z.argmax(dim=-1) == y).float() * w).sum(dim=1)
    true, other = _true_and_best_other(z, y)
    return correct + 0.5 * _mean(torch.sigmoid(true - other), w)


def correct_and_counted(logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(B,)`` correctly predicted positions and ``(B,)`` counted positions (1 and 1 for classification)."""
    z, y, w = _flat(logits, labels, mask)
    return ((z.argmax(dim=-1) == y).float() * w).sum(dim=1), w.sum(dim=1)
