"""Classification accuracy as summable per-example statistics (see ``Task.example_stats``)."""

from __future__ import annotations

import torch
from torch import Tensor


def accuracy_stats(logits: Tensor, labels: Tensor) -> Tensor:
    """``(B, 2)`` float: ``[correct, 1]`` per example, so the sum over examples is ``[#correct, #examples]``.

    ``logits``: ``(B, K)``; ``labels``: ``(B,)`` int in ``[0, K)``.
    """
    correct = (logits.argmax(dim=1) == labels).float()
    return torch.stack([correct, torch.ones_like(correct)], dim=1)


def accuracy_from_stats(summed: Tensor) -> dict[str, float]:
    """``{"accuracy": #correct / #examples, "examples": #examples}`` from summed :func:`accuracy_stats`."""
    correct, total = summed.tolist()
    return {"accuracy": correct / max(total, 1.0), "examples": int(total)}
