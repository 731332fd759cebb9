"""The divergence guard: stop a run whose training has failed, instead of training on and reporting it.

Two failures are caught while training, on every process alike (the decision is all-reduced):

- a non-finite training loss on a step that was not skipped by the fp16 loss scaler (read every
  ``--logging_steps`` steps, on the check steps and on the last step, so no step waits on the device for it);
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
    hook on the model: logits ``(B, K)`` or ``(B, K, H, W)``, K read from dim 1).

    Nothing here waits for the device on an ordinary step: the loss arrives as a device tensor, the window's
    references are priced on the device, and the predicted classes are marked in a ``(K,)`` device mask, only
    on the steps of a check's window. The values are read on the check steps, and the losses' finiteness every
    ``poll_every`` steps (a diverged run stops at the next poll, not the same step; a loss given as a Python
    float is checked at once)."""

    def __init__(self, model: nn.Module, check_steps: tuple[int, ...], lr: float, warmup_ratio: float,
                 prior: Optional[Tensor] = None, poll_every: int = WINDOW, last_step: Optional[int] = None):
        """``prior``: ``(K,)`` class probabilities of the training labels (:func:`label_prior`); ``None``
        compares with ``ln K`` (a uniform prior). ``poll_every``: steps between reads of the losses'
        finiteness, which is also read on the check steps and on ``last_step`` (the run's last)."""
        self.check_steps, self.lr, self.warmup_ratio = tuple(sorted(set(check_steps))), lr, warmup_ratio
        self.prior = None if prior is None else prior.detach().double().cpu()
        self.poll_every, self.last_step = max(1, poll_every), last_step
        self.stuck_at: list[int] = []  # check steps at which the loss was at chance
        self.losses: deque[Tensor] = deque(maxlen=WINDOW)
        self.references: deque = deque(maxlen=WINDOW)  # the prior's (loss sum, count) on each step's labels
        self.classes: deque[Optional[Tensor]] = deque(maxlen=WINDOW)  # (K,) bool: classes predicted per step
        self.num_classes: Optional[int] = None
        self._step_classes: Optional[Tensor] = None
        self._pending: list[tuple[int, Tensor]] = []  # (step, loss) not yet checked for finiteness
        self._cost: dict = {}  # -ln prior per device
        self._watching = self._in_window(1)
        self._handle = model.register_forward_hook(self._hook)

    def _in_window(self, step: int) -> bool:
        """Whether ``step`` is one of the :data:`WINDOW` steps a check step looks back on."""
        return any(c - WINDOW < step <= c for c in self.check_steps)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self._watching:
            return
        logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
        if isinstance(logits, Tensor) and logits.dim() >= 2 and logits.shape[1] > 1:
            self.num_classes = int(logits.shape[1])
            with torch.no_grad():
                if self._step_classes is None or self._step_classes.numel() != self.num_classes:
                    self._step_classes = torch.zeros(self.num_classes, dtype=torch.bool, device=logits.device)
                self._step_classes.index_fill_(0, logits.detach().argmax(dim=1).flatten(), True)

    def reference(self, labels: Optional[Tensor]) -> Optional[float]:
        """The mean loss of predicting the prior on ``labels`` (any shape, int; entries outside ``[0, K)``
        such as an ``ignore_index`` are left out); without a prior or labels, ``None`` (then ``ln K``)."""
        terms = self._reference_terms(labels)
        return None if terms is None else _mean_or_none(*terms)

    def _reference_terms(self, labels: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor]]:
        """``(sum of -ln prior[y], count)`` over the valid ``labels``, as device tensors (no host sync)."""
        if self.prior is None or labels is None:
            return None
        labels = labels.detach().flatten().long()
        if labels.device not in self._cost:
            self._cost[labels.device] = -self.prior.clamp_min(1e-12).log().to(labels.device)
        cost, k = self._cost[labels.device], len(self.prior)
        valid = (labels >= 0) & (labels < k)
        return (cost[labels.clamp(0, k - 1)] * valid).sum(), valid.sum()

    def failure(self, step: int, loss: float | Tensor, skipped: bool,
                labels: Optional[Tensor] = None) -> Optional[str]:
        """Record one optimizer step (``labels``: the step's training labels, to price the prior on them);
        the reason to stop, or ``None``."""
        classes, self._step_classes = self._step_classes, None
        self._watching = self._in_window(step + 1)
        if skipped:  # fp16 overflow: the scaler backs off, nothing was learned or lost
            return None
        at_once = not isinstance(loss, Tensor)
        loss = torch.as_tensor(loss).detach().double()
        self._pending.append((step, loss))
        if at_once or step % self.poll_every == 0 or step in self.check_steps or step == self.last_step:
            bad = self._nonfinite()
            if bad is not None:
                return (f"the training loss is {bad[1]} at step {bad[0]}: training diverged; lower --lr (now "
                        f"{self.lr:g}), add warm-up (--warmup_ratio 0.1) or clip (--max_grad_norm 1)")
        self.losses.append(loss)
        self.references.append(self._reference_terms(labels) if labels is not None else None)
        self.classes.append(classes)
        if step not in self.check_steps or self.num_classes is None or len(self.losses) < WINDOW:
            return None
        return self._check(step)

    def _nonfinite(self) -> Optional[tuple[int, float]]:
        """The first pending ``(step, loss)`` whose loss is not finite, or ``None``; one host sync."""
        pending, self._pending = self._pending, []
        finite = torch.stack([l.to(pending[0][1].device) for _, l in pending]).isfinite().tolist()
        return next(((s, float(l)) for (s, l), ok in zip(pending, finite) if not ok), None)

    def _check(self, step: int) -> Optional[str]:
        """The chance-level test of a check step (reads the window from the device)."""
        chance = math.log(self.num_classes)
        priced = [None if r is None else _mean_or_none(*r) for r in self.references]
        # the prior's loss on the window's labels when every step had them; else ln K
        reference = (sum(priced) / len(priced) if all(r is not None for r in priced) else chance)
        mean = float(torch.stack(list(self.losses)).mean())
        seen = [c for c in self.classes if c is not None]
        used = int(torch.stack(seen).any(dim=0).sum()) if seen else 0
        one_class = self.num_classes >= 3 and used == 1
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


def _mean_or_none(total: Tensor, count: Tensor) -> Optional[float]:
    n = int(count)
    return None if n == 0 else float(total) / n


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
