"""The one PGD: balls, box, masks, the objective goes up, the model is left as found."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samat.common.attacks import eval_mode, pgd
from samat.common.task import AttackSurface
from helpers import image_batch, tiny_cnn, tiny_mlp


def _surface(model, batch):
    x = batch["pixel_values"]
    return AttackSurface(x=x, forward=lambda d: model(x + d), bounds=(0.0, 1.0))


def _ce(batch):
    return lambda logits, step: F.cross_entropy(logits, batch["labels"])


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pixel_pgd_stays_in_ball_and_box_and_raises_loss(norm, eps):
    model, batch = tiny_mlp(), image_batch()
    surface = _surface(model, batch)
    torch.manual_seed(0)
    delta = pgd(surface, _ce(batch), eps=eps, alpha=eps / 4, steps=10, norm=norm)
    x_adv = batch["pixel_values"] + delta
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.flatten(1).norm(dim=1).max() <= eps + 1e-5
    with torch.no_grad():
        clean = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
        adv = F.cross_entropy(model(x_adv), batch["labels"])
    assert adv > clean + 1e-3


def test_eps_zero_is_the_identity():
    model, batch = tiny_mlp(), image_batch()
    delta = pgd(_surface(model, batch), _ce(batch), eps=0.0, alpha=0.0, steps=5)
    assert torch.count_nonzero(delta) == 0


def test_embedding_pgd_never_moves_padding_and_keeps_per_token_balls():
    torch.manual_seed(0)
    emb = torch.randn(3, 6, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]).float()[..., None]
    weight = torch.randn(5, 2)

    def forward(delta):
        pooled = ((emb + delta) * mask).sum(1) / mask.sum(1)
        return pooled @ weight

    labels = torch.tensor([0, 1, 0])
    surface = AttackSurface(x=emb, forward=forward, mask=mask, bounds=None, norm_dims=(-1,), eps_scale=2.0)
    for norm in ("l2", "linf"):
        delta = pgd(surface, lambda logits, step: F.cross_entropy(logits, labels), eps=0.1, alpha=0.05,
                    steps=5, norm=norm)
        assert torch.count_nonzero(delta * (1 - mask)) == 0
        per_token = delta.norm(dim=-1) if norm == "l2" else delta.abs().amax(dim=-1)
        assert per_token.max() <= 0.1 * 2.0 + 1e-5  # eps is relative: times eps_scale
        assert per_token[mask[..., 0] > 0].min() > 0  # real tokens did move


def test_attack_restores_mode_and_leaves_grads_untouched():
    model, batch = tiny_cnn(), image_batch()
    model.train()
    model.model.features[1].eval()  # a mixed-mode model must come back mixed
    F.cross_entropy(model(batch["pixel_values"]), batch["labels"]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        pgd(_surface(model, batch), _ce(batch), eps=8 / 255, alpha=2 / 255, steps=3)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), params))


def test_unknown_norm_is_rejected():
    model, batch = tiny_mlp(), image_batch()
    with pytest.raises(ValueError, match="linf, l2"):
        pgd(_surface(model, batch), _ce(batch), eps=0.1, alpha=0.1, steps=1, norm="l1")
