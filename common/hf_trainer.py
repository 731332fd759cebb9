"""A ``transformers.Trainer`` that trains with SAM/ASAM and samat's embedding-space adversarial training.

A user's Trainer script changes two lines::

    from samat import SAMTrainer                                   # 1
    trainer = SAMTrainer(model=model, args=training_args, ...)     # 2: was Trainer(...); SAM, rho 0.05

``samat_args=SAMArguments(method="sam-at", rho=0.05, train_eps="0.02")`` picks another method (``asam``,
``pgd-at``, ``fgsm-at``, ``trades``, ``sam-at``; the AT methods perturb the token embeddings of batches with
``input_ids``, with the text task's radii). Everything else is the Trainer's own: its optimizer and schedule,
mixed precision (fp16 GradScaler, bf16), clipping (``max_grad_norm``), logging, checkpoints, ``push_to_hub``.

Only :meth:`SAMTrainer.training_step` changes, and it is built from the engine's passes (``common/methods.py``'s
objectives, ``common/step.py``'s ``backward_all``, ``common/sam.py``'s ``regrad_at_ascent_point``): the
gradient it leaves in ``.grad`` is the one samat's own loop would descend with, and the Trainer steps.

Gradient accumulation is **per micro-batch**: the Trainer hands ``training_step`` one micro-batch at a time,
so each micro-batch ascends along its own gradient (m-sharpness with m = the micro-batch size, as SAM under
DDP with ``--sam_sync local``), and the K descent gradients are averaged. samat's loop instead ascends once
along the gradient of all K micro-batches; the two agree when K = 1. (``samat.step`` and ``samat.SAM`` follow
samat's loop.) The efficient SAM rules choose the descent themselves and are not offered here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import Trainer

from .api import SAMArguments, resolve, task_for
from .errors import UsageError
from .sam import SAM as Perturbation
from .sam import regrad_at_ascent_point
from .step import StepContext, backward_all

# The update rules a Trainer step can run: the Trainer steps the optimizer itself.
TRAINER_UPDATES = ("plain", "sam", "asam")


class SAMTrainer(Trainer):
    """``transformers.Trainer`` with a samat method (default SAM, rho 0.05); see the module docstring.

    Args:
        *args, **kwargs: as ``transformers.Trainer``.
        samat_args: the method and its hyper-parameters (:class:`samat.SAMArguments`).
    """

    def __init__(self, *args: Any, samat_args: Optional[SAMArguments] = None, **kwargs: Any):
        from .errors import lookup
        from .registry import METHODS

        self.samat_args = samat_args or SAMArguments()
        update = lookup(METHODS, "method", self.samat_args.method).update
        if update not in TRAINER_UPDATES:
            raise UsageError(f"SAMTrainer runs {', '.join(m for m, v in METHODS.items() if v.update in TRAINER_UPDATES)}"
                             f"; {self.samat_args.method!r} decides per step whether to take SAM's second pass: use "
                             "samat.SAM or samat.step in your own loop")
        super().__init__(*args, **kwargs)
        self._samat: Optional[tuple] = None  # (task, resolved method), from the first batch

    def _task_and_method(self, model: nn.Module, inputs: dict) -> tuple:
        if self._samat is None:
            task = task_for(inputs, self.accelerator.unwrap_model(model), self.samat_args.method)
            self._samat = (task, resolve(self.samat_args, task))
        return self._samat

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any = None) -> Tensor:
        """One micro-batch: leave ``(1/K) * g`` added to ``.grad``, where ``g`` is the samat method's descent
        gradient of this micro-batch (at ``w + e`` for SAM). Returns the loss at ``w`` divided by K, as the
        Trainer's own step does for its logs."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        from .methods import OBJECTIVES

        task, method = self._task_and_method(model, inputs)
        # The passes clear .grad between them; AcceleratedOptimizer.zero_grad does nothing inside an
        # accumulation (sync_gradients False), so they get the base optimizer (the Trainer steps its own).
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        ctx = StepContext(accelerator=self.accelerator, model=model, optimizer=base, task=task, method=method)
        k = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        params = [p for group in base.param_groups for p in group["params"]]
        # The earlier micro-batches' gradients step aside: SAM's ascent must see this micro-batch's alone.
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        objective = OBJECTIVES[method.method.objective]
        prepared = [objective.prepare(ctx, inputs)]
        loss = backward_all(ctx, objective, [inputs], prepared, sync_last=method.sam_sync == "global"
                            or method.method.update == "plain")
        if method.method.update != "plain":
            perturbation = Perturbation(base, rho=method.rho, adaptive=method.method.update == "asam",
                                        eta=method.eta)
            if not regrad_at_ascent_point(ctx, objective, [inputs], prepared, perturbation):
                # fp16 overflow: no gradient at all this step (the scale has backed off); the Trainer's
                # optimizer step then finds nothing to apply.
                return (loss / k).detach().to(self.args.device)
        with torch.no_grad():
            for p, before in zip(params, earlier):
                if p.grad is not None and k > 1:
                    p.grad.div_(k)
                if before is not None:
                    p.grad = before if p.grad is None else p.grad.add_(before)
        return (loss / k).detach().to(self.args.device)
