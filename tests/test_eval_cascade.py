"""The evaluation cascade: per example the same suite worst case as the full evaluation, for fewer passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samat.common.attack_losses import ce_loss, example_score
from samat.common.attacks import eval_mode, run_pgd
from samat.common.config import EvalArgs
from samat.common.evaluate import _attack_batch
from samat.common.suites import plan, resolve_suite
from samat.common.task import AttackSpec, AttackSurface
from helpers import image_batch, tiny_cnn, tiny_mlp, vision_task


def _ce(logits, batch, step, steps):
    return F.cross_entropy(logits, batch["labels"])


class _Keep:
    """A recorder that keeps each entry's per-example logits (what evaluate_all's recorder sums)."""

    def __init__(self):
        self.logits, self.sums = {}, self

    def add(self, key, logits, batch=None):
        if isinstance(key, tuple):
            self.logits[key] = logits.detach().clone()


def _run(model, batch, cascade: bool, attacks=("apgd",), seed: int = 0):
    """Per-example logits by entry, and the number of model forward passes."""
    task = vision_task()
    specs = [AttackSpec("pgd-linf", "linf", [("1/255", 1 / 255), ("3/255", 3 / 255)], _ce),
             AttackSpec("pgd-l2", "l2", [("0.05", 0.05), ("0.15", 0.15)], _ce)]
    suite = resolve_suite(task, EvalArgs(eval_attacks=list(attacks), eval_apgd_steps=12, eval_cascade=cascade))
    planned = plan(specs, suite, steps=3)
    calls = []
    counted = lambda x: calls.append(len(x)) or model(x)  # noqa: E731
    rec = _Keep()
    torch.manual_seed(seed)
    with eval_mode(model):
        _attack_batch(counted, task, batch, planned, {"linf", "l2"}, rec, cascade=cascade)
    return rec.logits, sum(calls)


def _correct(logits, batch):
    return logits.argmax(1) == batch["labels"]


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn])
@pytest.mark.parametrize("seed", [0, 1])
def test_cascade_gives_the_full_evaluations_worst_case_per_example_for_fewer_passes(make, seed):
    model, batch = make(), image_batch(n=48, seed=seed + 3)
    full, full_cost = _run(model, batch, cascade=False, seed=seed)
    cascade, cascade_cost = _run(model, batch, cascade=True, seed=seed)
    suite_keys = [k for k in full if k[0] == "suite"]
    assert len(suite_keys) == 4  # two norms, two radii each
    for key in suite_keys:
        robust = _correct(full[key], batch)
        assert 0 < robust.sum() < len(robust), key  # the case is not trivial: some robust, some broken
        assert torch.equal(_correct(cascade[key], batch), robust), key  # the same examples, one by one
    for key in full:  # the task's own PGD is not cascaded: its numbers stay its own
        if key[0].startswith("pgd-"):
            assert torch.equal(_correct(cascade[key], batch), _correct(full[key], batch)), key
    # A member's cascade entry counts what survives it and everything before it: never above its full entry.
    for key in full:
        if key[0].startswith("apgd-"):
            assert _correct(cascade[key], batch).sum() <= _correct(full[key], batch).sum(), key
    assert cascade_cost < full_cost, (cascade_cost, full_cost)  # examples seen by forward passes


def test_a_broken_example_leaves_the_attack_and_the_others_keep_their_trajectory():
    model, batch = tiny_mlp(), image_batch(n=32, seed=5)
    x, labels = batch["pixel_values"], batch["labels"]
    seen = []

    def problem(rows):
        sub_x, sub_y = x[rows], labels[rows]
        surface = AttackSurface(x=sub_x, forward=lambda d: seen.append(len(d)) or model(sub_x + d))
        return surface, (lambda logits, step: ce_loss(logits, sub_y)), (lambda lg: example_score(lg, sub_y))

    everyone = torch.arange(len(labels))
    torch.manual_seed(0)
    starts = [torch.empty_like(x).uniform_(-4 / 255, 4 / 255)]
    results = {}
    for narrowed in (False, True):
        seen.clear()
        surface, objective, score = problem(everyone)
        with eval_mode(model):
            results[narrowed] = run_pgd(surface, objective, eps=4 / 255, steps=15, schedule="apgd", score=score,
                                        done_below=1.0, starts=starts, narrow=problem if narrowed else None)
        results[narrowed, "seen"] = sum(seen)
    robust = results[False].score >= 1
    assert 0 < robust.sum() < len(labels)
    assert torch.equal(results[True].score >= 1, robust)  # the same examples broken
    # The robust ones ran every step in both: the same trajectory, so the same worst point.
    assert torch.allclose(results[True].score[robust], results[False].score[robust])
    assert results[True, "seen"] < results[False, "seen"]
