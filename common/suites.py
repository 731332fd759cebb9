"""Attack suites: which attacks an evaluation runs (``--eval_attacks``), checked against what the task can run.

Every evaluation runs the task's own attacks (``pgd-linf``, ``pgd-l2``; SegPGD for segmentation). A suite adds:

- ``pgd``: nothing (the fast default; costs what one PGD per radius costs).
- ``apgd``: APGD-CE and APGD-DLR (Croce & Hein 2020) with the project's one PGD, so in every space the task
  has (pixels, token embeddings, per-pixel segmentation).
- ``autoattack``: the standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) from ``pyautoattack``, for pixel-space
  classifiers only.

Single attacks can be named too (``--eval_attacks apgd-cw aa-square``). Per example, each attack keeps the worst
point it found (and the clean point, so an example counts as robust only if it is also correct clean); the suite
keeps, per example, the worst over all attacks of the same norm.

**Cascade** (``--eval_cascade``, the default): as AutoAttack's standard run, each suite attack runs only on the
examples still robust after the task's own attacks, the suite attacks before it at this radius and the whole
suite at the smaller radii; and every attack drops an example as soon as it is broken. The suite's worst case
is the full evaluation's, example by example: an example's outcome under one attack depends on nothing but
the example and its random start, and the starts are drawn for the whole batch in both modes (the library
attacks of ``autoattack`` seed their own starts per subset: for them the worst case is AutoAttack's, not
bit-for-bit the full mode's). What changes is the meaning of a suite member's entry: in a cascade,
``apgd-dlr-linf`` counts the examples robust after ``pgd-linf``, ``apgd-ce-linf`` *and* ``apgd-dlr-linf``
("robust after the members up to this one"); with ``--eval_cascade false`` it counts APGD-DLR alone. The task's
own attacks (``pgd-<norm>``, SegPGD) are never cascaded: their entries are their standalone numbers. The
gradient-masking diagnostics run their PGD-vs-APGD comparison on their subset with each attack alone, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .attack_losses import LOSSES, example_score
from .attacks import AttackResult, project, random_start, run_pgd
from .errors import UsageError
from .library_attacks import LIBRARY_ATTACKS, WHITE_BOX, library_attack
from .task import AttackSpec, Task


@dataclass(frozen=True)
class AttackDef:
    """A suite member. Own attacks run :func:`common.attacks.run_pgd` with ``schedule`` on the per-example
    ``loss``; library attacks run :func:`common.library_attacks.library_attack`."""

    name: str
    loss: Optional[str] = None
    schedule: str = "apgd"
    library: bool = False
    white_box: bool = True


ATTACKS: dict[str, AttackDef] = {
    "apgd-ce": AttackDef("apgd-ce", loss="ce"),
    "apgd-dlr": AttackDef("apgd-dlr", loss="dlr"),
    "apgd-cw": AttackDef("apgd-cw", loss="cw"),
    **{name: AttackDef(name, library=True, white_box=name in WHITE_BOX) for name in LIBRARY_ATTACKS},
}
SUITES: dict[str, tuple[str, ...]] = {
    "pgd": (),
    "apgd": ("apgd-ce", "apgd-dlr"),
    "autoattack": LIBRARY_ATTACKS,
}


@dataclass
class Suite:
    """A validated ``--eval_attacks`` selection with its budget."""

    name: str
    attacks: tuple[AttackDef, ...]
    restarts: int = 1
    apgd_steps: int = 100
    diagnostics: bool = False
    diagnostics_examples: int = 100
    cascade: bool = True

    def key(self, norm: str) -> str:
        """The results key of the suite's worst case in ``norm``, e.g. ``"apgd-suite-linf"``."""
        return f"{self.name}-suite-{norm}"

    def describe(self) -> dict:
        return {"name": self.name, "attacks": [a.name for a in self.attacks], "restarts": self.restarts,
                "apgd_steps": self.apgd_steps, "diagnostics": self.diagnostics, "cascade": self.cascade}


def suite_notes(suite: Suite, classes: int) -> list[str]:
    """What the suite record must say about how its members ran on a ``classes``-class model.

    APGD-DLR on 2 classes: DLR divides the margin by ``z_pi1 - z_pi3``, which needs a third logit, so
    :func:`common.attack_losses.dlr_loss` falls back to the CW margin ``m = z_other - z_y``. On 2 classes CE is
    ``softplus(m)``, an increasing function of ``m``: every comparison APGD makes (best iterate, step-size
    halving) and the direction of every normalised or sign step are the same, so APGD-DLR here is APGD-CE
    from another random start (a second restart), not a second objective. It stays in the suite (dropping it
    would drop that restart and could change the worst case); the record says what it was."""
    notes = []
    if classes == 2 and any(a.loss == "dlr" for a in suite.attacks):
        notes.append("apgd-dlr: DLR is undefined for 2 classes (it needs a third-largest logit); it ran the CW "
                     "margin, a monotone transform of CE's margin (CE = softplus(margin)), so it is APGD-CE from "
                     "another random start (a restart), not a second objective")
    return notes


def library_capable(task: Task) -> bool:
    """Can ``pyautoattack`` attack this task? Only pixel-space, one-label-per-image classifiers."""
    return bool(task.pixel_space) and task.headline_metric == "accuracy"


def valid_names(task: Task) -> list[str]:
    """Suite and attack names ``--eval_attacks`` accepts for ``task``."""
    ok = library_capable(task)
    suites = [s for s, members in SUITES.items() if ok or not any(ATTACKS[m].library for m in members)]
    return suites + [a for a, d in ATTACKS.items() if ok or not d.library]


def resolve_suite(task: Task, evals: Any) -> Suite:
    """Validate ``--eval_attacks``, ``--eval_restarts``, ``--eval_apgd_steps`` and the diagnostics flags.

    Raises ``UsageError`` (one line) for an unknown name (listing the task's valid ones) and for an attack the
    task cannot run (AutoAttack's on embeddings or segmentation).
    """
    names = list(evals.eval_attacks or ["pgd"])
    for flag in ("eval_restarts", "eval_apgd_steps", "eval_diagnostics_examples"):
        if getattr(evals, flag) < 1:
            raise UsageError(f"--{flag}: {getattr(evals, flag)!r} must be >= 1")
    members: list[str] = []
    for name in names:
        if name not in SUITES and name not in ATTACKS:
            raise UsageError(f"--eval_attacks: unknown attack or suite {name!r}; choose from: "
                             f"{', '.join(valid_names(task))}")
        members += [m for m in SUITES.get(name, (name,)) if m not in members]
    library = [m for m in members if ATTACKS[m].library]
    if library and not library_capable(task):
        space = ("perturbs token embeddings" if not task.pixel_space
                 else f"predicts per pixel (metric {task.headline_metric})")
        raise UsageError(f"--eval_attacks: {', '.join(library)} attack pixel-space image classifiers only; the "
                         f"{task.name} task {space}; choose from: {', '.join(valid_names(task))}")
    diagnostics = evals.eval_diagnostics
    if diagnostics is None:
        diagnostics = bool(members)  # on for apgd/autoattack, off for pgd: keeps pgd's cost
    return Suite(name="+".join(names), attacks=tuple(ATTACKS[m] for m in members), restarts=evals.eval_restarts,
                 apgd_steps=evals.eval_apgd_steps, diagnostics=diagnostics,
                 diagnostics_examples=evals.eval_diagnostics_examples, cascade=evals.eval_cascade)


# ------------------------------------------------------------------------------------------ running


# Scores count correct positions in their integer part: below 1, nothing is left to fool.
DONE_BELOW = 1.0


def score_fn(task: Task, batch: dict) -> Callable[[Tensor], Tensor]:
    """``logits -> (B,)`` score, lower = worse for the model. A task may define ``example_score(logits,
    batch)`` (integer part: correct positions); otherwise correct positions (not ``loss_mask``-ed) plus a
    margin tie-break in ``[0, 0.5]``."""
    own = getattr(task, "example_score", None)
    if own is not None:
        return lambda logits: own(logits, batch)
    mask = task.loss_mask(batch)
    return lambda logits: example_score(logits, batch["labels"], mask)


def select(batch: dict, rows: Tensor) -> dict:
    """The examples ``rows`` of a batch dict (every tensor with the batch's leading size is indexed)."""
    size = len(batch["labels"])
    return {k: v[rows] if isinstance(v, Tensor) and v.dim() and v.shape[0] == size else v
            for k, v in batch.items()}


def worse(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Per example, whichever of the ``(logits, score)`` pairs ``a``, ``b`` has the lower score (``a`` on ties).
    Logits ``(B, K, ...)``, scores ``(B,)``."""
    take_b = b[1] < a[1]
    return (torch.where(take_b.view(-1, *([1] * (a[0].dim() - 1))), b[0], a[0]),
            torch.where(take_b, b[1], a[1]))


@dataclass(frozen=True)
class Planned:
    """One attack of an evaluation: its results key, norm, radii ``[(label, value)]`` and how to run it on a
    batch: ``run(model, task, batch, eps, rows=None) -> AttackResult`` with logits and score for ``rows``
    (indices into ``batch``; all when None), or None when ``rows`` is empty. ``member``: a suite attack
    (cascaded after the task's own attacks), not one of the task's."""

    key: str
    norm: str
    eps: list[tuple[str, float]]
    white_box: bool
    run: Callable[..., Optional[AttackResult]]
    member: bool = False


def _rows(batch: dict, rows: Optional[Tensor]) -> Tensor:
    labels = batch["labels"]
    return torch.arange(len(labels), device=labels.device) if rows is None else rows


def _starts(task: Task, model: nn.Module, batch: dict, eps: float, norm: str, restarts: int) -> list[Tensor]:
    """One random start per restart for every example of ``batch``, drawn whether or not it is attacked: an
    example's start, and so its result, does not depend on which other examples are still attacked (the
    cascade and the full evaluation draw the same numbers)."""
    surface = task.surface(model, batch)
    return [random_start(surface, eps * surface.eps_scale, norm) for _ in range(restarts)]


def _own_problem(model: nn.Module, task: Task, batch: dict, objective_of: Callable[[dict], Callable]):
    """``rows -> (surface, objective, score)`` of ``batch`` restricted to ``rows``."""
    def narrow(rows: Tensor):
        sub = select(batch, rows)
        return task.surface(model, sub), objective_of(sub), score_fn(task, sub)
    return narrow


def _spec_runner(spec: AttackSpec, steps: int, restarts: int):
    def run(model: nn.Module, task: Task, batch: dict, eps: float, rows: Optional[Tensor] = None):
        starts = _starts(task, model, batch, eps, spec.norm, restarts)
        rows = _rows(batch, rows)
        if not len(rows):
            return None
        # Madry et al.'s step 2.5 eps / steps, the objective the task chose (its loss, SegPGD's).
        narrow = _own_problem(model, task, batch,
                              lambda sub: lambda logits, step: spec.objective(logits, sub, step, steps))
        surface, objective, score = narrow(rows)
        return run_pgd(surface, objective, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm=spec.norm,
                       restarts=restarts, score=score, done_below=DONE_BELOW,
                       starts=[s[rows] for s in starts], narrow=lambda r: narrow(rows[r]))
    return run


def _own_runner(attack: AttackDef, norm: str, steps: int, restarts: int):
    loss = LOSSES[attack.loss]

    def run(model: nn.Module, task: Task, batch: dict, eps: float, rows: Optional[Tensor] = None):
        starts = _starts(task, model, batch, eps, norm, restarts)
        rows = _rows(batch, rows)
        if not len(rows):
            return None
        narrow = _own_problem(model, task, batch, lambda sub: lambda logits, step: loss(
            logits, sub["labels"], task.loss_mask(sub)))
        surface, objective, score = narrow(rows)
        return run_pgd(surface, objective, eps=eps, steps=steps, norm=norm, restarts=restarts, score=score,
                       schedule=attack.schedule, done_below=DONE_BELOW, starts=[s[rows] for s in starts],
                       narrow=lambda r: narrow(rows[r]))
    return run


def _library_runner(attack: AttackDef, norm: str, restarts: int, **budget: int):
    def run(model: nn.Module, task: Task, batch: dict, eps: float, rows: Optional[Tensor] = None):
        rows = _rows(batch, rows)
        if not len(rows):
            return None
        # The library seeds its own generator (the global one is restored): its random starts follow the
        # position of an example in the subset it is given, so they differ between cascade and full mode.
        batch = select(batch, rows)
        surface = task.surface(model, batch)
        classify = lambda x: task.forward(model, {**batch, task.recipe.input_key: x})  # noqa: E731
        x_adv = library_attack(attack.name, classify, model, surface.x, batch["labels"], eps=eps, norm=norm,
                               restarts=restarts, **budget)
        # Trust no library with the threat model: whatever lies outside the ball or box is projected back.
        delta = project(x_adv - surface.x, surface, eps, norm)
        with torch.no_grad():
            logits = surface.forward(delta).detach()
        return AttackResult(delta, logits, score_fn(task, batch)(logits))
    return run


def plan(specs: list[AttackSpec], suite: Optional[Suite], steps: int, **library_budget: int) -> list[Planned]:
    """The task's attacks (``specs``, fixed-step PGD on their objectives), then the suite's own and library
    attacks in each norm the specs use, at the union of the specs' radii in that norm."""
    restarts = suite.restarts if suite else 1
    planned = [Planned(s.name, s.norm, list(s.eps), True, _spec_runner(s, steps, restarts)) for s in specs]
    for norm in dict.fromkeys(s.norm for s in specs):
        radii = dict(le for s in specs if s.norm == norm for le in s.eps)
        eps = sorted(radii.items(), key=lambda le: le[1])
        for attack in (suite.attacks if suite else ()):
            run = (_library_runner(attack, norm, restarts, **library_budget) if attack.library
                   else _own_runner(attack, norm, suite.apgd_steps, restarts))
            planned.append(Planned(f"{attack.name}-{norm}", norm, eps, attack.white_box, run, member=True))
    return planned
