"""Gradient-masking diagnostics: cheap checks that tell a user when a PGD robust accuracy cannot be trusted.

Run on the first ``--eval_diagnostics_examples`` evaluation examples, at the largest radius of each norm
(Carlini et al. 2019, "On evaluating adversarial robustness"; Croce & Hein 2020's AutoAttack checks):

(i) ``pgd_vs_white_box``: the evaluation's PGD must not sit more than 3 points above the strongest white-box
    attack (APGD-CE / APGD-DLR, each alone, on the subset; on the full set, the suite's other white-box attacks
    if any: the strongest alone, or in a cascade the white-box part of the cascade as a whole).
(ii) ``huge_radius``: at L-inf 64/255 (pixels; for embeddings, a radius of the mean token-embedding norm) no
    image survives, so accuracy must fall to about chance (1/K + 0.05).
(iii) ``black_box_vs_white_box`` (pixel-space classifiers): Square, which needs no gradient, must not fool
    examples that every white-box attack missed (more than a point of them).
(iv) ``more_steps``: PGD with twice the steps and twice the restarts must not lower accuracy by more than a point.

"Accuracy" is the fraction of correct positions (segmentation: pixel accuracy). A failed check is logged as
``robust accuracy may be overestimated: ...`` and stored with its numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Optional

import torch
from accelerate.logging import get_logger
from torch import Tensor, nn

from .attack_losses import correct_and_counted
from .suites import ATTACKS, Planned, Suite, library_capable, plan, score_fn, select, worse
from .task import AttackSpec, Task

logger = get_logger("samat")

GAP_TOLERANCE = 0.03
POINT = 0.01
CHANCE_SLACK = 0.05
HUGE_PIXELS = 64 / 255
HUGE_EMBEDDING = 1.0
SQUARE_QUERIES = 1000  # a fifth of AutoAttack's: enough to find what gradients cannot, on a small subset


@dataclass
class Diagnostic:
    name: str
    passed: bool
    detail: str
    values: dict


def _subset(dataloader: Any, n: int) -> Iterator[dict]:
    """Batches holding the first ``n`` examples (the last one sliced)."""
    seen = 0
    for batch in dataloader:
        take = min(n - seen, len(batch["labels"]))
        yield {k: v[:take] if isinstance(v, Tensor) else v for k, v in batch.items()}
        seen += take
        if seen >= n:
            return


class _Counts:
    """``key -> [correct positions, counted positions]`` summed over batches; per-example correctness kept
    for the white-box/Square comparison."""

    def __init__(self, square_queries: int):
        self.sums: dict[str, Tensor] = {}
        self.square_queries = square_queries

    def add(self, key: str, logits: Tensor, batch: dict, task: Task) -> Tensor:
        correct, counted = correct_and_counted(logits, batch["labels"], task.loss_mask(batch))
        pair = torch.stack([correct.sum(), counted.sum()])
        self.sums[key] = pair if key not in self.sums else self.sums[key] + pair
        return correct == counted


def _run(p: Planned, model: nn.Module, task: Task, batch: dict, eps: float, clean) -> tuple[Tensor, Tensor]:
    result = p.run(model, task, batch, eps)
    return worse(clean, (result.logits, result.score))


def _probe_norm(model, task, batch, spec: AttackSpec, suite: Suite, steps: int, clean, counts: _Counts) -> None:
    """(i), (iii), (iv) for one norm at its largest radius."""
    label, eps = max(spec.eps, key=lambda le: le[1])
    norm = spec.norm
    probe_suite = replace(suite, attacks=(ATTACKS["apgd-ce"], ATTACKS["apgd-dlr"]))
    planned = plan([spec], probe_suite, steps)
    white_box = clean
    for p in planned:
        worst = _run(p, model, task, batch, eps, clean)
        counts.add(f"{norm}/{p.key}", worst[0], batch, task)
        white_box = worse(white_box, worst)
    robust_wb = counts.add(f"{norm}/white-box", white_box[0], batch, task)
    doubled = plan([spec], replace(suite, attacks=(), restarts=2 * suite.restarts), 2 * steps)[0]
    counts.add(f"{norm}/pgd-doubled", _run(doubled, model, task, batch, eps, clean)[0], batch, task)
    if library_capable(task):
        _probe_square(model, task, batch, spec, suite, steps, eps, robust_wb, counts)


def _probe_square(model, task, batch, spec: AttackSpec, suite: Suite, steps: int, eps: float, robust_wb: Tensor,
                  counts: _Counts) -> None:
    """(iii): Square on the examples that every white-box attack missed (the only ones it can embarrass them
    on), counting those it fools."""
    keep = robust_wb.nonzero().flatten()
    fooled = torch.zeros(())
    if len(keep):
        sub = select(batch, keep)
        with torch.no_grad():
            logits = task.forward(model, sub).detach()
        square = plan([spec], replace(suite, attacks=(ATTACKS["aa-square"],)), steps,
                      square_queries=counts.square_queries)[1]
        worst = _run(square, model, task, sub, eps, (logits, score_fn(task, sub)(logits)))
        correct, counted = correct_and_counted(worst[0], sub["labels"], task.loss_mask(sub))
        fooled = (correct < counted).float().sum().cpu()
    key = f"{spec.norm}/square-only"
    pair = torch.stack([fooled, torch.tensor(float(len(robust_wb)))])
    counts.sums[key] = pair if key not in counts.sums else counts.sums[key] + pair


def _probe_batch(model, task, batch, specs: list[AttackSpec], suite: Suite, steps: int, counts: _Counts) -> int:
    with torch.no_grad():
        logits = task.forward(model, batch).detach()
    clean = (logits, score_fn(task, batch)(logits))
    counts.add("clean", logits, batch, task)
    first_by_norm = {s.norm: s for s in reversed(specs) if s.eps}  # the first spec of each norm (pgd-<norm>)
    for spec in first_by_norm.values():
        _probe_norm(model, task, batch, spec, suite, steps, clean, counts)
    huge = HUGE_PIXELS if task.pixel_space else HUGE_EMBEDDING
    huge_spec = AttackSpec("huge", "linf", [("huge", huge)], specs[0].objective)
    worst = _run(plan([huge_spec], replace(suite, attacks=()), steps)[0], model, task, batch, huge, clean)
    counts.add("huge-radius", worst[0], batch, task)
    return logits.shape[1]


def _within(value: float, tolerance: float) -> bool:
    """``value <= tolerance`` up to float rounding: fractions of whole examples, computed in float32 (0.36000001
    - 0.34999999), must not trip a check at exactly its tolerance ("more than a point" means more)."""
    return value <= tolerance + 1e-6


def _judge(frac: dict[str, float], counts: dict[str, Tensor], classes: int, norms: list[str], examples: int,
           full_gaps: list[Diagnostic]) -> list[Diagnostic]:
    """The subset checks; on the subset, one example's worth of difference is never evidence."""
    out, one = list(full_gaps), 1.0 / max(examples, 1)
    gap_tol, point = max(GAP_TOLERANCE, one), max(POINT, one)
    for norm in norms:
        pgd = frac[f"{norm}/pgd-{norm}"]
        others = {k.split("/", 1)[1]: v for k, v in frac.items()
                  if k.startswith(f"{norm}/apgd-")}
        name, best = min(others.items(), key=lambda kv: kv[1])
        out.append(Diagnostic("pgd_vs_white_box", _within(pgd - best, gap_tol),
                              f"{norm}, subset: PGD {pgd:.3f} vs {name} {best:.3f} (gap {pgd - best:+.3f}, "
                              f"tolerance {gap_tol:.3f})", {"norm": norm, "pgd": pgd, name: best}))
        doubled = frac[f"{norm}/pgd-doubled"]
        out.append(Diagnostic("more_steps", _within(pgd - doubled, point),
                              f"{norm}: PGD {pgd:.3f}, with twice the steps and restarts {doubled:.3f} "
                              f"(drop {pgd - doubled:+.3f}, tolerance {point:.3f})",
                              {"norm": norm, "pgd": pgd, "pgd_doubled": doubled}))
        if f"{norm}/square-only" in counts:
            only, n = counts[f"{norm}/square-only"].tolist()
            out.append(Diagnostic("black_box_vs_white_box", _within(only / max(n, 1), point),
                                  f"{norm}: Square fools {int(only)}/{int(n)} examples that every white-box "
                                  f"attack missed (white-box accuracy {frac[f'{norm}/white-box']:.3f})",
                                  {"norm": norm, "white_box": frac[f"{norm}/white-box"],
                                   "square_only": only / max(n, 1)}))
    huge, chance = frac["huge-radius"], 1.0 / classes
    out.append(Diagnostic("huge_radius", _within(huge, chance + CHANCE_SLACK),
                          f"accuracy at a radius that destroys any input is {huge:.3f}, chance {chance:.3f}",
                          {"accuracy": huge, "chance": chance}))
    return out


def _cascade_rival(planned: list[Planned], norm: str) -> tuple[Optional[str], list[str]]:
    """In a cascade, the white-box rival of ``pgd-<norm>``: the last suite member before the first black-box
    one (its entry counts what survives it and every attack before it), and those attacks' keys."""
    run, rival = [], None
    for p in planned:
        if p.norm != norm:
            continue
        if p.member and not p.white_box:
            break
        run.append(p.key)
        rival = p.key if p.member else rival
    return rival, run


def full_set_gaps(robust: dict, planned: list[Planned], metric: str, cascade: bool = False) -> list[Diagnostic]:
    """(i) on the whole evaluation set, at every radius: ``pgd-<norm>`` against the suite's other white-box
    attacks of that norm, where the suite ran any. Full mode: against the strongest of them alone. In a
    ``cascade`` each member's entry counts what is robust after it and every attack before it, so PGD is
    compared with the white-box part of the cascade as a whole (a gap at least the full mode's)."""
    out = []
    for norm in dict.fromkeys(p.norm for p in planned):
        pgd_key = f"pgd-{norm}"
        if cascade:
            rival, run = _cascade_rival(planned, norm)
            rivals = [rival] if rival else []
        else:
            rivals = [p.key for p in planned if p.norm == norm and p.white_box and p.key != pgd_key
                      and not p.key.startswith("segpgd")]
        if pgd_key not in robust or not rivals:
            continue
        for label, m in robust[pgd_key].items():
            values = {k: robust[k][label][metric] for k in rivals if label in robust[k]}
            name, best = min(values.items(), key=lambda kv: kv[1])
            shown = f"the cascade {' -> '.join(run)}" if cascade else name
            gap = m[metric] - best
            out.append(Diagnostic("pgd_vs_white_box", _within(gap, GAP_TOLERANCE),
                                  f"{norm} eps {label}, full set: PGD {m[metric]:.3f} vs {shown} {best:.3f} "
                                  f"(gap {gap:+.3f}, tolerance {GAP_TOLERANCE})",
                                  {"norm": norm, "eps": label, "pgd": m[metric], name: best,
                                   "cascade": cascade}))
    return out


def masking_diagnostics(model: nn.Module, task: Task, dataloader: Any, accelerator: Any,
                        specs: list[AttackSpec], suite: Suite, steps: int,
                        full_gaps: Optional[list[Diagnostic]] = None, square_queries: int = SQUARE_QUERIES) -> dict:
    """Run (i)-(iv) on the first ``suite.diagnostics_examples`` examples (per process; counts are summed
    across processes). ``model`` is unwrapped and in eval mode. Returns ``{"examples", "accuracy"
    (fraction of correct positions by probe), "checks", "passed"}`` and logs each failed check.
    ``square_queries``: Square's budget for (iii) (tests lower it)."""
    specs = [s for s in specs if s.eps]
    counts, classes, examples = _Counts(square_queries), 2, 0
    for batch in _subset(dataloader, suite.diagnostics_examples):
        classes = _probe_batch(model, task, batch, specs, suite, steps, counts)
        examples += len(batch["labels"])
    counts.sums["examples"] = torch.tensor([float(examples), 1.0])
    summed = {k: accelerator.reduce(v.to(accelerator.device), "sum").cpu() for k, v in counts.sums.items()}
    frac = {k: (v[0] / v[1].clamp_min(1)).item() for k, v in summed.items() if not k.endswith("square-only")}
    norms = list(dict.fromkeys(s.norm for s in specs))
    checks = _judge(frac, summed, classes, norms, int(summed["examples"][0].item()), full_gaps or [])
    for check in checks:
        if not check.passed:
            logger.warning("robust accuracy may be overestimated: %s: %s", check.name, check.detail)
    frac.pop("examples")
    return {"examples": int(summed["examples"][0].item()), "accuracy": frac,
            "checks": [asdict(c) for c in checks], "passed": all(c.passed for c in checks)}
