"""Clean and robust evaluation, with AutoAttack-style sanity checks before anything is reported.

Robust metrics come from PGD with ``steps`` steps of size ``2.5 · eps / steps`` (Madry et al.'s rule) from a
random start, on the same examples as the clean metric. Per-example statistics are gathered with
``accelerator.gather_for_metrics`` (which drops the duplicates Accelerate pads the last batch with) and
summed, so metrics are exact under any number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from accelerate.logging import get_logger
from torch import nn
from tqdm.auto import tqdm

from .attacks import eval_mode, pgd
from .task import AttackSpec, Task

logger = get_logger("samat")

# Slack for "robust <= clean" and "non-increasing in eps": PGD from a random start is itself random.
SANITY_TOLERANCE = 1e-6


def _sum_stats(accelerator: Any, stats: Optional[torch.Tensor], batch_stats: torch.Tensor) -> torch.Tensor:
    gathered = accelerator.gather_for_metrics(batch_stats.detach().float()).sum(dim=0)
    return gathered if stats is None else stats + gathered


def evaluate_clean(model: nn.Module, task: Task, dataloader, accelerator: Any) -> tuple[dict, dict]:
    """Clean metrics and a histogram of predicted classes (for the collapse guard)."""
    model = accelerator.unwrap_model(model)
    stats, counts = None, None
    with eval_mode(model), torch.no_grad():
        for batch in tqdm(dataloader, desc="eval clean", leave=False,
                          disable=not accelerator.is_local_main_process):
            logits = task.forward(model, batch)
            stats = _sum_stats(accelerator, stats, task.example_stats(logits, batch))
            preds = task.predictions(logits).flatten()
            hist = torch.bincount(preds, minlength=logits.shape[1]).float()[None]
            counts = _sum_stats(accelerator, counts, hist)
    return task.compute_metrics(stats), {str(i): int(c) for i, c in enumerate(counts.tolist())}


def evaluate_attack(model: nn.Module, task: Task, dataloader, accelerator: Any, spec: AttackSpec,
                    eps: float, steps: int) -> dict:
    """Metrics on PGD adversarial inputs at radius ``eps`` (eval mode, task-chosen objective)."""
    model = accelerator.unwrap_model(model)
    stats = None
    alpha = 2.5 * eps / steps
    with eval_mode(model):
        for batch in tqdm(dataloader, desc=f"eval {spec.name} {eps:.4g}", leave=False,
                          disable=not accelerator.is_local_main_process):
            surface = task.surface(model, batch)
            delta = pgd(surface, lambda logits, step: spec.objective(logits, batch, step, steps),
                        eps=eps, alpha=alpha, steps=steps, norm=spec.norm)
            with torch.no_grad():
                logits = surface.forward(delta)
            stats = _sum_stats(accelerator, stats, task.example_stats(logits, batch))
    return task.compute_metrics(stats)


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


def evaluate_all(model: nn.Module, task: Task, dataloader, accelerator: Any,
                 attacks: list[AttackSpec], steps: int) -> dict:
    """Clean + every attack at every eps + sanity checks. Returns the ``metrics`` and ``sanity`` blocks."""
    clean, predicted = evaluate_clean(model, task, dataloader, accelerator)
    robust: dict[str, dict[str, dict]] = {}
    eps0 = None
    if attacks:
        eps0 = evaluate_attack(model, task, dataloader, accelerator, attacks[0], 0.0, steps)
    for spec in attacks:
        robust[spec.name] = {}
        for label, eps in sorted(spec.eps, key=lambda le: le[1]):
            robust[spec.name][label] = evaluate_attack(model, task, dataloader, accelerator, spec, eps, steps)
            logger.info("%s eps %s: %s", spec.name, label, robust[spec.name][label])
    checks = sanity_checks(task.headline_metric, clean, eps0, robust)
    for check in checks:
        if not check.passed:
            logger.warning("sanity check %s FAILED: %s", check.name, check.detail)
    collapsed = sum(1 for v in predicted.values() if v > 0) <= 1 and len(predicted) > 1
    if collapsed:
        logger.warning("the model predicts a single class on the whole evaluation set (collapse): %s",
                       predicted)
    return {
        "metrics": {"clean": clean, "robust": robust},
        "predicted_class_counts": predicted,
        "collapsed": collapsed,
        "sanity": {"passed": all(ch.passed for ch in checks), "checks": [ch.as_dict() for ch in checks]},
    }
