"""The divergence guard: stop a run whose training has failed, instead of training on and reporting it.

Two failures are caught while training, on every process alike (the decision is all-reduced):

- a non-finite training loss on a step that was not skipped by the fp16 loss scaler;
- a loss no lower than the label prior's after the warm-up and :data:`CHECK_EXAMPLES` training examples, and
  again at twice that step (a slow start that then learns is not stopped): the mean loss over the last
  :data:`WINDOW` steps at least ``STUCK_SHARE`` times the loss of predicting the training labels' prior on
  the same examples, or, with three or more classes, the model predicting one class for every example of the
  window while its loss is still at least ``COLLAPSED_SHARE`` times that.

The prior is measured from the training labels at start (:func:`label_prior`). Predicting it costs
``-ln prior[y]`` on an example of class ``y``: on the window's own labels, so a batch that happens to hold more
of the majority class does not hide a model that learned nothing; its mean over the data is the prior's entropy,
``ln K`` when the classes are balanced. Measured on a 60/40 review dataset (issue 24): a model that had
learned only the prior sat at 0.673 nats, below ln 2 = 0.693, so the old ``ln K`` rule never fired. Without
labels (segmentation's masks) the reference stays ``ln K``.

The rule is deliberately conservative: a false stop of a run that would have learned costs more than a
collapsed model finishing (the collapse guard then says so in the summary line). Measured on the text default
(MiniLM, SAM, lr 5e-5 with 10 % warm-up), the loss was 0.692, 0.684, 0.682, 0.680 over steps 1-40 before it
learned: a binary fine-tune sits just below ln 2 = 0.693 for a while, often predicting the majority class, so
neither "below 0.97 ln K" nor "one class" means failure there.

Measured cases it stops (issue 11): SAM on Fashion-MNIST with lr 0.1 and no warm-up sat at ln 10 for ~50 steps;
the same recipe on another small image dataset never left it and reported a collapsed model after 6 minutes.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .errors import UsageError

WINDOW = 10
CHECK_EXAMPLES = 512
STUCK_SHARE = 0.995
COLLAPSED_SHARE = 0.9


class TrainingFailed(UsageError):
    """Training diverged or stayed at chance: one line naming the likely fix, exit 2, no results.json."""


class DivergenceGuard:
    """Watches the training loss (fed by the loop) and the predicted classes of training forwards (a forward
    hook on the model: logits ``(B, K)`` or ``(B, K, H, W)``, K read from dim 1)."""

    def __init__(self, model: nn.Module, check_steps: tuple[int, ...], lr: float, warmup_ratio: float,
                 prior: Optional[Tensor] = None):
        """``prior``: ``(K,)`` class probabilities of the training labels (:func:`label_prior`); ``None``
        compares with ``ln K`` (a uniform prior)."""
        self.check_steps, self.lr, self.warmup_ratio = tuple(sorted(set(check_steps))), lr, warmup_ratio
        self.prior = None if prior is None else prior.detach().double().cpu()
        self.stuck_at: list[int] = []  # check steps at which the loss was at chance
        self.losses: deque[float] = deque(maxlen=WINDOW)
        self.references: deque[float] = deque(maxlen=WINDOW)  # the prior's loss on each step's labels
        self.classes: deque[set] = deque(maxlen=WINDOW)  # predicted classes per step
        self.num_classes: Optional[int] = None
        self._step_classes: set = set()
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
        if isinstance(logits, Tensor) and logits.dim() >= 2 and logits.shape[1] > 1:
            self.num_classes = int(logits.shape[1])
            with torch.no_grad():
                self._step_classes.update(logits.detach().argmax(dim=1).unique().tolist())

    def reference(self, labels: Optional[Tensor]) -> Optional[float]:
        """The mean loss of predicting the prior on ``labels`` (any shape, int; entries outside ``[0, K)``
        such as an ``ignore_index`` are left out); without a prior or labels, ``None`` (then ``ln K``)."""
        if self.prior is None or labels is None:
            return None
        labels = labels.detach().flatten().cpu().long()
        labels = labels[(labels >= 0) & (labels < len(self.prior))]
        if len(labels) == 0:
            return None
        return float(-self.prior[labels].clamp_min(1e-12).log().mean())

    def failure(self, step: int, loss: float, skipped: bool, labels: Optional[Tensor] = None) -> Optional[str]:
        """Record one optimizer step (``labels``: the step's training labels, to price the prior on them);
        the reason to stop, or ``None``."""
        classes, self._step_classes = self._step_classes, set()
        if skipped:  # fp16 overflow: the scaler backs off, nothing was learned or lost
            return None
        if not math.isfinite(loss):
            return (f"the training loss is {loss} at step {step}: training diverged; lower --lr (now "
                    f"{self.lr:g}), add warm-up (--warmup_ratio 0.1) or clip (--max_grad_norm 1)")
        self.losses.append(loss)
        self.references.append(self.reference(labels) if labels is not None else None)
        self.classes.append(classes)
        if step not in self.check_steps or self.num_classes is None or len(self.losses) < WINDOW:
            return None
        chance = math.log(self.num_classes)
        priced = [r for r in self.references if r is not None]
        # the prior's loss on the window's labels when every step had them; else ln K
        reference = sum(priced) / len(priced) if len(priced) == len(self.references) else chance
        mean = sum(self.losses) / len(self.losses)
        one_class = self.num_classes >= 3 and len(set().union(*self.classes)) == 1
        if mean >= STUCK_SHARE * reference or (one_class and mean >= COLLAPSED_SHARE * reference):
            self.stuck_at.append(step)
        if step == self.check_steps[-1] and self.stuck_at == list(self.check_steps):
            what = "predicts a single class and " if one_class else ""
            if reference == chance:
                level = f"chance level for {self.num_classes} classes (ln {self.num_classes} = {chance:.3f})"
            else:
                level = (f"no lower than predicting the training labels' prior ({reference:.3f} on the same "
                         f"examples; prior entropy {prior_entropy(self.prior):.3f}, ln {self.num_classes} = "
                         f"{chance:.3f})")
            warmup = ("a longer warm-up" if self.warmup_ratio >= 0.1 else "a warm-up") + \
                f" (--warmup_ratio, now {self.warmup_ratio:g})"
            return (f"after {step} steps the model {what}still has a training loss of {mean:.3f}, {level}: it "
                    f"is not learning beyond the label prior; try {self._lr_advice(mean, reference)}, {warmup} "
                    "or more steps (--epochs, --max_steps); --divergence_guard false trains on regardless")
        return None

    def _lr_advice(self, mean: float, reference: float) -> str:
        """Which way to move --lr: down when the loss sits far above the prior's (the steps overshoot), either
        way otherwise (an lr too small never leaves the prior either)."""
        if mean > 1.5 * reference:
            return f"a lower --lr (now {self.lr:g})"
        return f"another --lr (now {self.lr:g}; lower if the loss jumped about, higher if it barely moved)"

    def close(self) -> None:
        self._handle.remove()


def label_prior(labels: Optional[Tensor], num_classes: int) -> Optional[Tensor]:
    """``(K,)`` float64 class shares of the training labels ``labels`` (int, any shape; entries outside
    ``[0, K)`` left out), or ``None`` without labels."""
    if labels is None or num_classes < 2:
        return None
    labels = labels.flatten().long()
    labels = labels[(labels >= 0) & (labels < num_classes)]
    if len(labels) == 0:
        return None
    counts = torch.bincount(labels, minlength=num_classes).double()
    return counts / counts.sum()


def prior_entropy(prior: Tensor) -> float:
    """``-sum p ln p`` in nats (``ln K`` for a uniform prior): the mean loss of predicting the prior."""
    p = prior[prior > 0]
    return float(-(p * p.log()).sum())


def check_steps(total_steps: int, warmup_ratio: float, examples_per_step: int) -> tuple[int, ...]:
    """The steps at which the chance-level test runs: after the warm-up, :data:`CHECK_EXAMPLES` examples and
    one full window, and at twice that step; never later than the last step (one check when they meet)."""
    warmup = int(round(warmup_ratio * total_steps))
    first = min(warmup + max(WINDOW, math.ceil(CHECK_EXAMPLES / max(examples_per_step, 1))), total_steps)
    return tuple(sorted({first, min(2 * first, total_steps)}))
