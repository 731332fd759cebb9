"""What every single-label classification task shares (vision, text): cross-entropy and accuracy."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .metrics import accuracy_from_stats, accuracy_stats
from .task import Task


class ClassificationTask(Task):
    """A :class:`Task` whose model maps a batch to logits ``(B, K)`` and whose labels are ``batch["labels"]``
    ``(B,)`` int in ``[0, K)``; the headline metric is accuracy, from summed per-example statistics."""

    single_label = True

    def loss(self, logits: Tensor, batch: dict) -> Tensor:
        """Mean cross-entropy over the batch, in fp32 (logits may come from an autocast forward)."""
        return F.cross_entropy(logits.float(), batch["labels"])

    def example_losses(self, logits: Tensor, batch: dict) -> Tensor:
        """Cross-entropy per example ``(B,)``, in fp32."""
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none")

    def example_stats(self, logits: Tensor, batch: dict) -> Tensor:
        return accuracy_stats(logits, batch["labels"])

    def compute_metrics(self, summed_stats: Tensor) -> dict[str, float]:
        return accuracy_from_stats(summed_stats)
