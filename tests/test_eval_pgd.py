"""Worst-iterate PGD, restarts, APGD's schedule and the margin losses (tiny models, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samat.common.attack_losses import ce_loss, correct_and_counted, cw_loss, dlr_loss, example_score
from samat.common.attacks import apgd_checkpoints, eval_mode, run_pgd
from samat.common.task import AttackSurface
from helpers import image_batch, tiny_mlp


def _setup(n: int = 64):
    model, batch = tiny_mlp(), image_batch(n=n)
    x, labels = batch["pixel_values"], batch["labels"]
    surface = AttackSurface(x=x, forward=lambda d: model(x + d))
    return model, surface, labels


def _accuracy(logits, labels) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


@pytest.mark.parametrize("norm,eps", [("linf", 4 / 255), ("l2", 0.25)])
def test_worst_iterate_is_never_above_the_last_iterate_on_the_same_starts(norm, eps):
    model, surface, labels = _setup()
    objective = lambda logits, step: F.cross_entropy(logits, labels)  # noqa: E731
    score = lambda logits: example_score(logits, labels)  # noqa: E731
    kw = dict(eps=eps, alpha=eps / 2, steps=5, norm=norm)
    with eval_mode(model), torch.no_grad():
        torch.manual_seed(0)
        last = run_pgd(surface, objective, **kw).delta
        torch.manual_seed(0)
        worst = run_pgd(surface, objective, score=score, **kw)
        torch.manual_seed(0)
        two = run_pgd(surface, objective, score=score, restarts=2, **kw)
        last_logits = surface.forward(last)
        assert torch.allclose(surface.forward(worst.delta), worst.logits, atol=1e-6)  # logits match delta
    assert _accuracy(worst.logits, labels) <= _accuracy(last_logits, labels)
    assert (worst.score <= example_score(last_logits, labels) + 1e-6).all()
    assert (two.score <= worst.score + 1e-6).all()  # restart 0 is the same run, so a 2nd can only help
    assert worst.delta.abs().max() <= (eps if norm == "linf" else 1.0) + 1e-6


def test_restarts_without_a_score_are_refused():
    _, surface, labels = _setup(4)
    with pytest.raises(ValueError, match="score"):
        run_pgd(surface, lambda lg, s: F.cross_entropy(lg, labels), eps=0.1, alpha=0.1, steps=1, restarts=2)


@pytest.mark.parametrize("loss", [ce_loss, dlr_loss, cw_loss])
def test_apgd_in_pixel_space_stays_in_the_box_and_raises_the_loss(loss):
    model, surface, labels = _setup(16)
    eps = 8 / 255
    with eval_mode(model):
        torch.manual_seed(0)
        result = run_pgd(surface, lambda logits, step: loss(logits, labels), eps=eps, steps=12,
                         schedule="apgd", score=lambda lg: example_score(lg, labels))
        x_adv = surface.x + result.delta
        assert x_adv.min() >= 0 and x_adv.max() <= 1 and result.delta.abs().max() <= eps + 1e-6
        with torch.no_grad():
            clean = surface.forward(torch.zeros_like(surface.x))
        assert loss(result.logits, labels).mean() > loss(clean, labels).mean()


def test_apgd_on_embeddings_keeps_padding_and_per_token_balls():
    torch.manual_seed(0)
    emb = torch.randn(3, 6, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]).float()[..., None]
    weight = torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2])

    def forward(delta):
        return (((emb + delta) * mask).sum(1) / mask.sum(1)) @ weight

    surface = AttackSurface(x=emb, forward=forward, mask=mask, bounds=None, norm_dims=(-1,), eps_scale=2.0)
    result = run_pgd(surface, lambda logits, step: dlr_loss(logits, labels), eps=0.1, steps=10, norm="l2",
                     schedule="apgd", score=lambda lg: example_score(lg, labels))
    assert torch.count_nonzero(result.delta * (1 - mask)) == 0
    assert result.delta.norm(dim=-1).max() <= 0.1 * 2.0 + 1e-5
    assert cw_loss(result.logits, labels).mean() > cw_loss(forward(torch.zeros_like(emb)), labels).mean()


def test_apgd_needs_a_per_example_objective():
    _, surface, labels = _setup(4)
    with pytest.raises(ValueError, match="per-example"):
        run_pgd(surface, lambda lg, s: F.cross_entropy(lg, labels), eps=0.1, steps=3, schedule="apgd")


def test_apgd_checkpoints_follow_croce_and_hein():
    # N = 100: windows 22, 19, 16, 13, 10, 7, 6, 6 (0.22 N first, 0.03 N shorter each time, >= 0.06 N).
    assert list(apgd_checkpoints(100).items())[:6] == [(22, 22), (41, 19), (57, 16), (70, 13), (80, 10), (87, 7)]
    assert max(apgd_checkpoints(100)) <= 100
    assert apgd_checkpoints(1) == {1: 1}


def test_margin_losses_and_score_on_hand_computed_logits():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 0])
    assert torch.allclose(cw_loss(logits, labels), torch.tensor([-2.0, 2.0]))
    assert torch.allclose(dlr_loss(logits, labels), torch.tensor([-2.0 / 3.0, 2.0 / 2.0]))
    assert torch.allclose(dlr_loss(10 * logits + 5, labels), dlr_loss(logits, labels))  # shift/scale-free
    score = example_score(logits, labels)
    assert score[1] < 0.5 <= 1.0 <= score[0] < 1.5  # misclassified below any correct


def test_segmentation_score_counts_correct_pixels_and_skips_ignored():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = 1.0  # predicts class 1 everywhere
    labels = torch.tensor([[[1, 1], [0, 255]]])
    mask = labels != 255
    correct, counted = correct_and_counted(logits, labels, mask)
    assert correct.item() == 2 and counted.item() == 3
    assert 2.0 <= example_score(logits, labels, mask).item() < 2.5
    assert torch.isfinite(ce_loss(logits, labels, mask)).all()


def test_an_attack_stops_once_every_example_is_fooled():
    model, surface, labels = _setup(8)
    calls = []
    counting = AttackSurface(x=surface.x, forward=lambda d: calls.append(1) or surface.forward(d))
    kw = dict(eps=1.0, steps=20, restarts=3, score=lambda lg: example_score(lg, labels))
    for schedule, extra in (("pgd", {"alpha": 0.5}), ("apgd", {})):
        calls.clear()
        objective = lambda logits, step: ce_loss(logits, labels)  # noqa: E731
        result = run_pgd(counting, objective, schedule=schedule, done_below=1.0, **kw, **extra)
        assert (result.score < 1).all() and len(calls) < 20  # a radius of 1 fools everything at once
