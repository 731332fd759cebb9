"""Training cost as exact pass counts: forward calls and backward passes through a model's output."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .results import PassCounts


class PassCounter:
    """Counts forward calls of a model and backward passes through its output (training cost), both as calls
    and as examples (rows of the logits): a doubled clean+adversarial batch (TRADES, ``--at_clean_weight``) is
    one call but twice the examples.

    A forward hook counts calls; a tensor hook on the output's logits counts every gradient that flows back
    through it (``loss.backward()`` and the attacks' ``autograd.grad`` alike). The counts carry the field names
    of :class:`samat.common.results.PassCounts`, which ``checkpoint.TrainState`` and ``results.Cost`` inherit,
    so a checkpoint saves and restores them with :meth:`copy_counts`.
    """

    FIELDS = PassCounts.names()

    def __init__(self, model: nn.Module):
        self.forward_passes = self.backward_passes = self.forward_examples = self.backward_examples = 0
        self.active = True
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self.active:
            return
        logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
        rows = int(logits.shape[0]) if isinstance(logits, Tensor) and logits.dim() > 0 else 0
        self.forward_passes += 1
        self.forward_examples += rows
        if isinstance(logits, Tensor) and logits.requires_grad:
            logits.register_hook(lambda grad: self._count_backward(rows))

    def _count_backward(self, rows: int) -> None:
        self.backward_passes += 1
        self.backward_examples += rows

    @classmethod
    def copy_counts(cls, source: Any, target: Any) -> None:
        """Copy the four counts from ``source`` to ``target`` (a counter or a ``TrainState``)."""
        for name in cls.FIELDS:
            setattr(target, name, getattr(source, name))

    def close(self) -> None:
        self.active = False
        self._handle.remove()
