"""Clean and robust evaluation, with AutoAttack-style sanity checks before anything is reported.

The clean pass runs over the whole set first: a model that predicts one class for every example is not
attacked (its robust accuracy would only repeat that class's share, at the attacks' full cost) unless asked
to (``attack_collapsed``). Single-label classifiers get the macro-F1 (torchmetrics) of the same predictions
beside accuracy, clean and under every attack, and the majority-class baseline of the evaluation set.

Robustness is counted as AutoAttack and RobustBench count it: each attack keeps, per example, the worst point
it found over all iterates and restarts, and the clean point too, so an example is robust only if it is
correct clean and under the attack (segmentation: per image, the point with the fewest correct pixels). A
suite (``--eval_attacks``, see :mod:`common.suites`) adds attacks, and its own entry keeps, per example, the
worst over every attack of the same norm. The task's PGD uses ``steps`` steps of size ``2.5 · eps / steps``
(Madry et al.'s rule). Per-example statistics are gathered with ``accelerator.gather_for_metrics`` (which drops
the duplicates Accelerate pads the last batch with) and summed, so metrics are exact under any number of
processes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from accelerate.logging import get_logger
from torch import Tensor, nn
from tqdm.auto import tqdm

from .attacks import eval_mode
from .diagnostics import full_set_gaps, masking_diagnostics
from .suites import DONE_BELOW, Planned, Suite, plan, score_fn, suite_notes, worse
from .task import AttackSpec, Task

logger = get_logger("samat")

# Slack for "robust <= clean" and "non-increasing in eps": PGD from a random start is itself random.
SANITY_TOLERANCE = 1e-6


class _Sums:
    """Summed per-example statistics by key, gathered across processes."""

    def __init__(self, accelerator: Any):
        self.accelerator, self.sums = accelerator, {}

    def add(self, key: Any, batch_stats: Tensor) -> None:
        gathered = self.accelerator.gather_for_metrics(batch_stats.detach().float()).sum(dim=0)
        self.sums[key] = gathered if key not in self.sums else self.sums[key] + gathered


def _radii(planned: list[Planned], norm: str) -> list[tuple[str, float]]:
    radii = dict(le for p in planned if p.norm == norm for le in p.eps)
    return sorted(radii.items(), key=lambda le: le[1])


def _attack_alive(p: Planned, model: nn.Module, task: Task, batch: dict, eps: float,
                  base: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``p`` at ``eps``, combined per example with ``base``: the clean point, this attack's worst at the
    previous, smaller radius (it lies in this ball too), or in a cascade the worst of every attack before it.
    Only examples with something left to fool are attacked; for the others ``base`` already is a witness, so
    the count is the same and the work is not."""
    alive = (base[1] >= DONE_BELOW).nonzero().flatten()
    result = p.run(model, task, batch, eps, alive)  # draws its random starts even when nothing is alive
    if result is None:
        return base
    sub = worse((base[0][alive], base[1][alive]), (result.logits, result.score))
    logits, score = base[0].clone(), base[1].clone()
    logits[alive], score[alive] = sub
    return logits, score


class _Classes:
    """Per-example predicted classes against the labels, by key, in torchmetrics' macro-F1 (single-label
    classification): the same predictions the accuracy counts, gathered across processes like it."""

    def __init__(self, accelerator: Any):
        self.accelerator, self.scores = accelerator, {}

    def add(self, key: Any, logits: Tensor, labels: Tensor) -> None:
        """``logits`` ``(B, K)``, ``labels`` ``(B,)`` int in ``[0, K)``."""
        from torchmetrics.classification import MulticlassF1Score

        preds, labels = self.accelerator.gather_for_metrics((logits.detach().argmax(dim=1), labels.detach()))
        if key not in self.scores:
            self.scores[key] = MulticlassF1Score(num_classes=logits.shape[1], average="macro").to(preds.device)
        self.scores[key].update(preds, labels)

    def macro_f1(self, key: Any) -> Optional[float]:
        return float(self.scores[key].compute()) if key in self.scores else None


def majority_baseline(label_counts: Tensor) -> dict:
    """What always predicting the evaluation set's most frequent class scores: ``{"class": index,
    "accuracy", "macro_f1"}`` (F1 by torchmetrics on those constant predictions, as for the model).
    ``label_counts``: ``(K,)`` examples per class."""
    from torchmetrics.functional.classification import multiclass_f1_score

    counts = label_counts.long().cpu()
    majority = int(counts.argmax())
    labels = torch.repeat_interleave(torch.arange(len(counts)), counts)
    preds = torch.full_like(labels, majority)
    f1 = multiclass_f1_score(preds, labels, num_classes=len(counts), average="macro")
    return {"class": majority, "accuracy": int(counts[majority]) / max(int(counts.sum()), 1),
            "macro_f1": float(f1)}


class _Recorder:
    """Where one batch's statistics go: summed per-example stats, and (single-label tasks) predictions."""

    def __init__(self, task: Task, accelerator: Any):
        self.task, self.sums = task, _Sums(accelerator)
        self.classes = _Classes(accelerator) if getattr(task, "single_label", False) else None

    def add(self, key: Any, logits: Tensor, batch: dict) -> None:
        self.sums.add(key, self.task.example_stats(logits, batch))
        if self.classes is not None:
            self.classes.add(key, logits, batch["labels"])

    def metrics(self, key: Any) -> dict:
        """The task's metrics of ``key``, with ``macro_f1`` beside accuracy for single-label tasks."""
        out = self.task.compute_metrics(self.sums.sums[key])
        if self.classes is not None and self.classes.macro_f1(key) is not None:
            out["macro_f1"] = self.classes.macro_f1(key)
        return out


def _clean_batch(model: nn.Module, task: Task, batch: dict, rec: _Recorder) -> None:
    """Clean metrics, predicted classes and (single-label tasks) label counts of one batch."""
    with torch.no_grad():
        clean_logits = task.forward(model, batch).detach()
    rec.add("clean", clean_logits, batch)
    k = clean_logits.shape[1]
    # Counts per example (rows), so that gather_for_metrics drops exactly the padded duplicates.
    rec.sums.add("predicted", per_example_counts(task.predictions(clean_logits), k))
    if rec.classes is not None:
        rec.sums.add("labels", per_example_counts(batch["labels"], k))


def per_example_counts(classes: Tensor, num_classes: int) -> Tensor:
    """``(B, K)`` float: how many positions of each example hold each class (``classes``: ``(B, ...)`` int;
    entries outside ``[0, K)``, such as an ``ignore_index``, are left out)."""
    flat = classes.reshape(classes.shape[0], -1).long()
    valid = (flat >= 0) & (flat < num_classes)
    rows = torch.arange(flat.shape[0], device=flat.device)[:, None].expand_as(flat)
    index = (rows * num_classes + flat)[valid]
    return torch.bincount(index, minlength=flat.shape[0] * num_classes).view(-1, num_classes).float()


def _attack_batch(model: nn.Module, task: Task, batch: dict, planned: list[Planned], suite_norms: set[str],
                  rec: _Recorder, cascade: bool = False) -> None:
    """The eps-0 check and every planned attack at every radius (increasing) on one batch; the suite's worst
    per norm and radius.

    The task's own attacks each run on the examples they have not broken at a smaller radius. A suite member
    runs, in full mode, likewise on its own; in a ``cascade``, only on the examples still robust after the
    task's attacks, the members before it at this radius, and the whole suite at the smaller radii: its entry
    then counts what is robust after all of those, and the suite's worst case is the full mode's."""
    with torch.no_grad():  # recomputed: the clean pass ran over the whole set first (collapse is known then)
        clean_logits = task.forward(model, batch).detach()
    surface = task.surface(model, batch)
    with torch.no_grad():  # the eps-0 "attack": the surface must reproduce the clean logits
        rec.sums.add("eps0", task.example_stats(surface.forward(torch.zeros_like(surface.x)), batch))
    clean = (clean_logits, score_fn(task, batch)(clean_logits))
    last: dict[str, tuple[Tensor, Tensor]] = {}  # attack key -> its worst at the last radius
    for norm in dict.fromkeys(p.norm for p in planned):
        suite_worst = clean  # the suite's worst at the previous radius, then at this one
        for label, eps in _radii(planned, norm):
            for p in planned:
                if p.norm != norm or label not in dict(p.eps):
                    continue
                base = suite_worst if cascade and p.member else last.get(p.key, clean)
                last[p.key] = _attack_alive(p, model, task, batch, eps, base)
                rec.add((p.key, label), last[p.key][0], batch)
                suite_worst = worse(suite_worst, last[p.key])
            if norm in suite_norms:
                rec.add(("suite", norm, label), suite_worst[0], batch)


def _suite_members(planned: list[Planned], suite: Optional[Suite]) -> dict[str, list[str]]:
    """``{suite key: [attack keys]}`` for each norm with two or more attacks (else the suite is its one
    attack, and no extra entry is written)."""
    if suite is None:
        return {}
    by_norm: dict[str, list[str]] = {}
    for p in planned:
        by_norm.setdefault(p.norm, []).append(p.key)
    return {suite.key(norm): keys for norm, keys in by_norm.items() if len(keys) > 1}


@dataclass
class Check:
    name: str
    passed: bool
    detail: str

    def as_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


def sanity_checks(headline: str, clean: dict, eps0: Optional[dict], robust: dict) -> list[Check]:
    """AutoAttack-style checks: the eps-0 attack equals clean, robust <= clean, non-increasing in eps.

    ``robust`` maps attack name -> {eps label: metrics}, labels in increasing eps order.
    """
    checks = []
    c = clean[headline]
    if eps0 is not None:
        checks.append(Check("eps0_equals_clean", abs(eps0[headline] - c) <= SANITY_TOLERANCE,
                            f"{headline} at eps 0 = {eps0[headline]:.6f}, clean = {c:.6f}"))
    for attack, by_eps in robust.items():
        values = [(label, m[headline]) for label, m in by_eps.items()]
        worst = max((v - c for _, v in values), default=0.0)
        checks.append(Check(f"{attack}_le_clean", worst <= SANITY_TOLERANCE,
                            f"max({headline} under attack - clean) = {worst:+.6f}"))
        rises = [f"{a}->{b}: {va:.4f}->{vb:.4f}" for (a, va), (b, vb) in zip(values, values[1:])
                 if vb > va + SANITY_TOLERANCE]
        checks.append(Check(f"{attack}_non_increasing", not rises,
                            "; ".join(rises) or "non-increasing in eps"))
    return checks


def _count_metric(clean: dict) -> str:
    """The metric that counts correct positions: accuracy, or pixel accuracy for segmentation."""
    return next(m for m in ("accuracy", "pixel_accuracy", *clean) if m in clean)


def suite_checks(clean: dict, robust: dict, members: dict[str, list[str]]) -> list[Check]:
    """Suite robust <= each of its attacks' robust, at every radius.

    Checked on accuracy (pixel accuracy for segmentation): the suite keeps per example the point with the
    fewest correct positions, so that count can only go down; mIoU, a ratio over the whole set, need not.
    """
    metric = _count_metric(clean)
    checks = []
    for key, attacks in members.items():
        above = [f"{label}: {m[metric]:.4f} > {a} {robust[a][label][metric]:.4f}"
                 for label, m in robust[key].items() for a in attacks
                 if label in robust[a] and m[metric] > robust[a][label][metric] + SANITY_TOLERANCE]
        checks.append(Check(f"{key}_le_each_attack", not above,
                            "; ".join(above) or f"{metric} of the suite <= each of {', '.join(attacks)}"))
    return checks


def collapse_reason(predicted: dict[str, int]) -> Optional[str]:
    """Why a model is not attacked: it predicts one class for every evaluation example (``predicted``: class
    -> count); ``None`` when it predicts two or more."""
    used = [c for c, n in predicted.items() if n > 0]
    if len(used) != 1 or len(predicted) < 2:
        return None
    return (f"robust metrics not computed: the model predicts class {used[0]} for all {predicted[used[0]]} "
            "evaluation examples (collapsed): its clean accuracy is that class's share, and a robust accuracy "
            "could only repeat it or fall below it, which tells nothing about robustness; --attack_collapsed "
            "true attacks it anyway")


def _precision(accelerator: Any, precision: str) -> Any:
    """The evaluation's autocast: none for ``"fp32"`` (the caller has taken Accelerate's autocast off the
    model's forward, :func:`samat.common.experiment.evaluate`), the run's mixed precision for ``"train"``."""
    return contextlib.nullcontext() if precision == "fp32" else accelerator.autocast()


def evaluate_all(model: nn.Module, task: Task, dataloader, accelerator: Any, attacks: list[AttackSpec],
                 steps: int, suite: Optional[Suite] = None, attack_collapsed: bool = False,
                 precision: str = "fp32") -> dict:
    """A clean pass over the whole set, then every attack (the task's ``attacks`` and the ``suite``'s) at
    every eps + sanity checks. A model that predicts a single class is not attacked unless
    ``attack_collapsed`` (then ``attacks_skipped`` says why and ``robust`` is empty).

    Returns ``metrics`` (``clean``; ``robust[attack][eps label]``, with ``robust[suite.key(norm)]`` for a
    norm with several attacks; single-label tasks add ``macro_f1`` beside accuracy in every block),
    ``predicted_class_counts``, ``collapsed``, ``attacks_skipped``, ``majority_baseline`` (single-label tasks),
    ``sanity``, and, when the suite asks for them, ``diagnostics`` (see :mod:`common.diagnostics`) and
    ``suite`` (what was run).
    """
    model = accelerator.unwrap_model(model)
    planned = plan(attacks, suite, steps)
    rec = _Recorder(task, accelerator)
    show = accelerator.is_local_main_process
    # Eval mode (BatchNorm statistics, no dropout); fp32 unless ``precision`` is "train" (the run's autocast:
    # the losses and scores then read logits in float32).
    # Each pass over the loader draws its base seed from torch's global RNG; restoring it after the clean pass
    # gives the attacks' random starts the very draws they had when clean and attacks shared one pass, so a
    # seed's robust numbers do not depend on whether a clean pass came first.
    rng = torch.get_rng_state()
    with eval_mode(model), _precision(accelerator, precision):
        for batch in tqdm(dataloader, desc="eval clean", leave=False, disable=not show):
            _clean_batch(model, task, batch, rec)
    torch.set_rng_state(rng)
    predicted = {str(i): int(c) for i, c in enumerate(rec.sums.sums["predicted"].tolist())}
    skipped = collapse_reason(predicted)
    collapsed = skipped is not None
    if collapsed:
        logger.warning("the model predicts a single class on the whole evaluation set (collapse): %s",
                       predicted)
    if skipped and attack_collapsed:
        skipped = None
    if skipped:
        logger.warning(skipped)
        planned = []
    members = _suite_members(planned, suite)
    if (precision == "train" and accelerator.mixed_precision == "fp16" and planned and suite is not None
            and any(a.library for a in suite.attacks)):
        # samat's own PGD/APGD rescale each example's fp16 gradient (common.attacks); the library's attacks
        # take theirs as fp16 gives them, and FAB reads gradient magnitudes, so they cannot be rescaled.
        logger.warning("--eval_precision train under fp16: the library attacks (AutoAttack's) take unscaled fp16 "
                       "gradients, which flush to zero on confident examples; report the fp32 default")
    suite_norms = {p.norm for p in planned if suite is not None and suite.key(p.norm) in members}
    if planned:
        with eval_mode(model), _precision(accelerator, precision):
            for batch in tqdm(dataloader, desc="eval attacks", leave=False, disable=not show):
                _attack_batch(model, task, batch, planned, suite_norms, rec, cascade=suite is not None
                              and suite.cascade)
    clean = rec.metrics("clean")
    robust: dict[str, dict[str, dict]] = {}
    for p in planned:
        robust[p.key] = {label: rec.metrics((p.key, label)) for label, _ in sorted(p.eps, key=lambda le: le[1])}
    for norm in suite_norms:
        robust[suite.key(norm)] = {label: rec.metrics(("suite", norm, label)) for label, _ in _radii(planned, norm)}
    for key, by_eps in robust.items():
        for label, m in by_eps.items():
            logger.info("%s eps %s: %s", key, label, m)
    eps0 = task.compute_metrics(rec.sums.sums["eps0"]) if planned else None
    checks = sanity_checks(task.headline_metric, clean, eps0, robust) + suite_checks(clean, robust, members)
    for check in checks:
        if not check.passed:
            logger.warning("sanity check %s FAILED: %s", check.name, check.detail)
    out = {
        "metrics": {"clean": clean, "robust": robust},
        "predicted_class_counts": predicted,
        "collapsed": collapsed,
        "attacks_skipped": skipped,
        "sanity": {"passed": all(ch.passed for ch in checks), "checks": [ch.as_dict() for ch in checks]},
    }
    if "labels" in rec.sums.sums:
        out["majority_baseline"] = majority_baseline(rec.sums.sums["labels"])
    if suite is not None:
        notes = suite_notes(suite, len(predicted))
        out["suite"] = {**suite.describe(), "members": members, **({"notes": notes} if notes else {})}
        if suite.diagnostics and planned:
            gaps = full_set_gaps(robust, planned, _count_metric(clean), cascade=suite.cascade)
            with eval_mode(model), _precision(accelerator, precision):
                out["diagnostics"] = masking_diagnostics(model, task, dataloader, accelerator, attacks, suite,
                                                         steps, gaps)
    return out
