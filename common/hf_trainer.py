"""A ``transformers.Trainer`` that trains with SAM/ASAM and samat's embedding-space adversarial training.

A user's Trainer script changes two lines::

    from samat import SAMTrainer                                   # 1
    trainer = SAMTrainer(model=model, args=training_args, ...)     # 2: was Trainer(...); SAM, rho 0.05

``samat_args=SAMArguments(method="sam-at", rho=0.05, train_eps="0.02")`` picks another method (``asam``, the
efficient SAM rules ``sam-every-k``, ``looksam``, ``ae-sam``, ``pgd-at``, ``fgsm-at``, ``trades``, ``sam-at``
and the efficient rules' ``-at`` forms; the AT methods perturb the token embeddings of batches with
``input_ids``, with the text task's radii). Everything else is the Trainer's own: its optimizer and schedule,
mixed precision (fp16 GradScaler, bf16), clipping (``max_grad_norm``), logging, checkpoints, ``push_to_hub``.

Only :meth:`SAMTrainer.training_step` changes, and it runs the engine's own update rule for the method
(``common/methods.py``'s ``UPDATES``: ``sam``/``asam`` of ``common/sam.py``, ``sam-every-k``, ``looksam`` and
``ae-sam`` of ``common/efficient_sam.py``, ``plain`` for the AT methods) with the engine's objectives, on a view
of the optimizer whose ``step`` records the descent gradient instead of applying it (:class:`HeldStep`): the
gradient it leaves in ``.grad`` is the one samat's own loop would descend with, and the Trainer steps, clips and
schedules. The efficient rules keep their state (step counter, LookSAM's direction, AE-SAM's EMAs) in the
optimizer's ``state``, so the Trainer's checkpoints hold it; AE-SAM's threshold schedule runs over the Trainer's
``max_steps``.

Gradient accumulation is **per micro-batch**: the Trainer hands ``training_step`` one micro-batch at a time,
so each micro-batch ascends along its own gradient (m-sharpness with m = the micro-batch size, as SAM under
DDP with ``--sam_sync local``), and the K descent gradients are averaged. samat's loop instead ascends once
along the gradient of all K micro-batches; the two agree when K = 1. (``samat.step`` and ``samat.SAM`` follow
samat's loop.) The efficient rules count optimizer steps, so they need K = 1 here. SAF and MESA are not offered:
SAF keys its memory by each example's dataset index, which the Trainer's batches do not carry, and MESA
updates its EMA weights after the optimizer step, which the Trainer takes only after ``training_step`` returns.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import Trainer

from .api import SAMArguments, resolve, task_for
from .errors import UsageError
from .step import StepContext

# Update rules a Trainer step cannot run, and why (the rest of common/registry.py's UPDATE_RULES can).
REFUSED_UPDATES = {
    "saf": "it keys its memory of past outputs by each example's dataset index (batch key sample_index), which "
           "the Trainer's batches do not carry",
    "mesa": "it updates its EMA weights after the optimizer step, which the Trainer takes only after "
            "training_step returns",
}


class HeldStep:
    """The Trainer's base optimizer as an update rule sees it: ``step`` records the descent gradient (the
    tensors in ``.grad``, in ``param_groups`` order, ``None`` where a parameter has none) in :attr:`descent`
    instead of applying it; everything else is the base optimizer's (its ``state`` holds the efficient rules'
    counters). ``zero_grad`` always sets ``.grad`` to ``None``, so the recorded tensors stay intact."""

    def __init__(self, base: torch.optim.Optimizer):
        self.optimizer = base
        self.descent: Optional[list[Optional[Tensor]]] = None
        self.step_was_skipped = False  # the Trainer's own step (its GradScaler) decides

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def step(self) -> None:
        self.descent = [p.grad for group in self.optimizer.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class SAMTrainer(Trainer):
    """``transformers.Trainer`` with a samat method (default SAM, rho 0.05); see the module docstring.

    Args:
        *args, **kwargs: as ``transformers.Trainer``.
        samat_args: the method and its hyper-parameters (:class:`samat.SAMArguments`).
    """

    def __init__(self, *args: Any, samat_args: Optional[SAMArguments] = None, **kwargs: Any):
        from .errors import lookup
        from .registry import METHODS, UPDATE_RULES

        self.samat_args = samat_args or SAMArguments()
        name = self.samat_args.method
        update = lookup(METHODS, "method", name).update
        if update in REFUSED_UPDATES:
            raise UsageError(f"SAMTrainer cannot train with {name!r}: {REFUSED_UPDATES[update]}; train it with "
                             "samat run (scripts/run.py)")
        super().__init__(*args, **kwargs)
        if UPDATE_RULES[update].efficient and self.args.gradient_accumulation_steps > 1:
            raise UsageError(f"SAMTrainer: {name!r} counts optimizer steps (when to take SAM's second pass), but "
                             "the Trainer hands training_step one micro-batch at a time: use "
                             "gradient_accumulation_steps=1, or samat.step with the step's micro-batches as a list")
        self._samat: Optional[tuple] = None  # (task, resolved method), from the first batch

    def _task_and_method(self, model: nn.Module, inputs: dict) -> tuple:
        if self._samat is None:
            task = task_for(inputs, self.accelerator.unwrap_model(model), self.samat_args.method)
            self._samat = (task, resolve(self.samat_args, task))
        return self._samat

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any = None) -> Tensor:
        """One micro-batch: leave ``(1/K) * g`` added to ``.grad``, where ``g`` is the descent gradient the
        samat method's update rule chose for this micro-batch (at ``w + e`` on a SAM step). Returns the loss at
        ``w`` divided by K, as the Trainer's own step does for its logs."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        from .methods import OBJECTIVES, UPDATES

        task, method = self._task_and_method(model, inputs)
        # The rule's passes clear .grad between them; AcceleratedOptimizer.zero_grad does nothing inside an
        # accumulation (sync_gradients False), so they get the base optimizer (the Trainer steps its own).
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        held = HeldStep(base)
        ctx = StepContext(accelerator=self.accelerator, model=model, optimizer=held, task=task, method=method,
                          total_steps=self.state.max_steps)
        k = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        params = [p for group in base.param_groups for p in group["params"]]
        # The earlier micro-batches' gradients step aside: SAM's ascent must see this micro-batch's alone.
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        result = UPDATES[method.method.update](ctx, OBJECTIVES[method.method.objective], [inputs])
        loss = (result.loss / k).detach().to(self.args.device)
        if result.skipped or held.descent is None:
            # fp16 overflow: no gradient at all this step (the scale has backed off); the Trainer's
            # optimizer step then finds nothing to apply.
            return loss
        with torch.no_grad():
            for p, g, before in zip(params, held.descent, earlier):
                if g is not None and k > 1:
                    g.div_(k)
                p.grad = before if g is None else (g if before is None else g.add_(before))
        return loss
