"""Weight-space sharpness (common/sharpness.py): zero at rho 0, grows with rho, sharp > flat minimum, the
closed form on a quadratic, ASAM's scale invariance, and the model left exactly as it was found."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samat.common.sharpness import collect_batches, estimate_sharpness, sharpness_report


class RegressionTask:
    """Task stand-in: ``batch = {"x": (B, D), "y": (B,)}``, mean squared error."""

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["x"]).squeeze(-1)

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.mse_loss(logits, batch["y"])


class ClassificationTask:
    """Task stand-in: ``batch = {"x": (B, D), "labels": (B,)}``, cross-entropy."""

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["x"])

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits, batch["labels"])


def _classification_batches(n_batches: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(16, 6, generator=g), "labels": torch.randint(0, 3, (16,), generator=g)}
            for _ in range(n_batches)]


def _mlp(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 12)] + ([nn.BatchNorm1d(12)] if batchnorm else []) + [nn.ReLU(), nn.Dropout(0.5),
                                                                               nn.Linear(12, 3)]
    return nn.Sequential(*layers)


def _quadratic(scale: float) -> tuple[nn.Module, list[dict], float]:
    """A linear least-squares problem at its exact minimum; the loss is a quadratic in w with Hessian
    ``2 X^T X / n``, so the true sharpness is ``rho^2 * lambda_max / 2``."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.5, 0.3, 0.1],
                                                                             dtype=torch.float64) * scale
    w_star = torch.randn(4, generator=g, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star[None])
    lambda_max = torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max().item()
    return model, [{"x": x, "y": x @ w_star}], lambda_max


def test_zero_at_rho_zero_and_weights_untouched():
    model, batches = _mlp(), _classification_batches()
    before = [p.detach().clone() for p in model.parameters()]
    out = estimate_sharpness(model, ClassificationTask(), batches, rho=0.0)
    assert out["sharpness"] == 0.0 and out["perturbed_loss"] == out["loss"] > 0
    assert out["num_examples"] == 32
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("adaptive", [False, True])
def test_grows_with_rho(adaptive):
    model, batches, task = _mlp(), _classification_batches(), ClassificationTask()
    rhos = [0.02, 0.1, 0.5] if not adaptive else [0.1, 0.5, 2.0]
    values = [estimate_sharpness(model, task, batches, rho, steps=5, adaptive=adaptive)["sharpness"]
              for rho in rhos]
    assert 0 < values[0] < values[1] < values[2], values


def test_sharp_minimum_beats_flat_one_and_matches_closed_form():
    rho = 0.1
    results = {}
    for name, scale in [("flat", 1.0), ("sharp", 5.0)]:
        model, batches, lambda_max = _quadratic(scale)
        out = estimate_sharpness(model, RegressionTask(), batches, rho, steps=20)
        exact = rho ** 2 * lambda_max / 2
        # The loss is exactly 0 at w*, the gradient too: the estimator must still climb (seeded start) and
        # the projected ascent converges to the top eigenvector of the Hessian.
        assert out["loss"] < 1e-20
        assert 0.95 * exact <= out["sharpness"] <= exact * (1 + 1e-9), (name, out["sharpness"], exact)
        assert out["perturbation_norm"] == pytest.approx(rho, rel=1e-6)
        results[name] = out["sharpness"]
    assert results["sharp"] > 10 * results["flat"]


def test_more_steps_never_lower_the_estimate():
    model, batches, task = _mlp(seed=1), _classification_batches(seed=1), ClassificationTask()
    one = estimate_sharpness(model, task, batches, 0.3, steps=1)["sharpness"]
    many = estimate_sharpness(model, task, batches, 0.3, steps=8)["sharpness"]
    assert many >= one > 0


def test_adaptive_form_is_invariant_to_relu_rescaling_and_plain_form_is_not():
    """Scaling layer 1 (weight and bias) by c and layer 2 by 1/c leaves the function unchanged; ASAM's
    ball (eta = 0) scales with the weights, so its sharpness is unchanged too, SAM's is not."""
    batches, task = _classification_batches(), ClassificationTask()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    scaled = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    c = 4.0
    with torch.no_grad():
        scaled[0].weight.copy_(base[0].weight * c)
        scaled[0].bias.copy_(base[0].bias * c)
        scaled[2].weight.copy_(base[2].weight / c)
        scaled[2].bias.copy_(base[2].bias)
    batches = [{k: (v.double() if v.is_floating_point() else v) for k, v in b.items()} for b in batches]
    kw = dict(rho=0.5, steps=4, adaptive=True, eta=0.0)
    a, b = estimate_sharpness(base, task, batches, **kw), estimate_sharpness(scaled, task, batches, **kw)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
    assert a["sharpness"] == pytest.approx(b["sharpness"], rel=1e-6)
    plain_a = estimate_sharpness(base, task, batches, 0.5, steps=4)["sharpness"]
    plain_b = estimate_sharpness(scaled, task, batches, 0.5, steps=4)["sharpness"]
    assert not math.isclose(plain_a, plain_b, rel_tol=0.05)


def test_restores_weights_mode_grads_and_batchnorm_stats():
    model, batches = _mlp(batchnorm=True), _classification_batches()
    model.train()
    model[3].eval()  # a submodule in its own mode (the dropout) must keep it
    modes = [m.training for m in model.modules()]
    assert modes == [True, True, True, True, False, True]
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    model[0].bias.requires_grad_(False)
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # includes BN running stats
    grads = {n: p.grad for n, p in model.named_parameters()}
    out = estimate_sharpness(model, ClassificationTask(), batches, 0.2, steps=3, adaptive=True)
    assert out["sharpness"] > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert [m.training for m in model.modules()] == modes
    for n, p in model.named_parameters():
        assert p.grad is grads[n] and torch.all(p.grad == 7.0), n
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad


def test_restores_weights_when_the_loss_raises():
    class Exploding(ClassificationTask):
        calls = 0

        def loss(self, logits, batch):
            self.calls += 1
            if self.calls > 2:
                raise RuntimeError("boom")
            return super().loss(logits, batch)

    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError):
        estimate_sharpness(model, Exploding(), _classification_batches(n_batches=1), 0.5, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_eval_mode_makes_it_deterministic_despite_dropout():
    model, batches, task = _mlp(), _classification_batches(), ClassificationTask()
    model.train()
    a = estimate_sharpness(model, task, batches, 0.1)
    b = estimate_sharpness(model, task, batches, 0.1)
    assert a == b


def test_bad_arguments():
    model, batches, task = _mlp(), _classification_batches(), ClassificationTask()
    for kwargs in [dict(rho=-0.1), dict(rho=float("nan")), dict(rho=0.1, steps=0), dict(rho=0.1, eta=-1.0)]:
        with pytest.raises(ValueError):
            estimate_sharpness(model, task, batches, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        estimate_sharpness(model, task, [], 0.1)


def test_report_shape_for_results_json():
    model, batches = _mlp(), _classification_batches()
    report = sharpness_report(model, ClassificationTask(), batches, rhos=(0.05, 0.1), adaptive_rhos=(0.5,),
                              steps=2)
    assert set(report["sam"]) == {"0.05", "0.1"} and set(report["asam"]) == {"0.5"}
    assert report["num_examples"] == 32 and report["steps"] == 2 and report["loss"] > 0
    assert 0 < report["sam"]["0.05"]["sharpness"] < report["sam"]["0.1"]["sharpness"]
    for entry in [*report["sam"].values(), *report["asam"].values()]:
        assert entry["perturbed_loss"] == pytest.approx(report["loss"] + entry["sharpness"])
    import json

    json.dumps(report)  # plain JSON types only


def test_collect_batches_takes_a_fixed_prefix():
    batches = _classification_batches(n_batches=3)  # 3 x 16 examples
    subset = collect_batches(iter(batches), 20, device="cpu")
    assert [len(b["labels"]) for b in subset] == [16, 4]
    assert torch.equal(subset[1]["x"], batches[1]["x"][:4])
    assert sum(len(b["labels"]) for b in collect_batches(batches, 1000)) == 48
    with pytest.raises(ValueError):
        collect_batches(batches, 0)


def test_on_the_vision_task_with_batchnorm():
    """A real Task (vision) and a BatchNorm CNN: positive, growing, and the running stats untouched."""
    from helpers import image_batch, tiny_cnn, vision_task

    model, task = tiny_cnn(), vision_task()
    model.train()
    batches = [image_batch(8, seed=1), image_batch(8, seed=2)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = sharpness_report(model, task, batches, rhos=(0.05, 0.2), adaptive_rhos=(0.5,), steps=2)
    assert 0 < report["sam"]["0.05"]["sharpness"] < report["sam"]["0.2"]["sharpness"]
    assert report["asam"]["0.5"]["sharpness"] > 0 and model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
