"""Gradient-masking diagnostics: deliberately masked models trip them, a normal model does not."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samat.common.attacks import eval_mode
from samat.common.config import EvalArgs
from samat.common.diagnostics import masking_diagnostics
from samat.common.suites import resolve_suite
from samat.common.task import AttackSpec
from helpers import image_batch, tiny_mlp, vision_task


class Saturated(nn.Module):
    """Logits times 1e4: softmax saturates, so cross-entropy's gradient is exactly 0 on confident examples
    (DLR, which is scale-free, still sees the way)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return 1e4 * self.model(x)


class Rounded(nn.Module):
    """Quantises its input to 1/4 steps: the gradient through ``round`` is 0 everywhere."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


def _diagnose(model: nn.Module, accelerator, eps: float = 16 / 255) -> dict:
    task = vision_task()
    batch = image_batch(n=16)
    with torch.no_grad():
        batch["labels"] = model(batch["pixel_values"]).argmax(1)  # every example correct clean
    objective = lambda logits, b, step, steps: F.cross_entropy(logits.float(), b["labels"])  # noqa: E731
    specs = [AttackSpec("pgd-linf", "linf", [("eps", eps)], objective)]
    suite = resolve_suite(task, EvalArgs(eval_attacks=["apgd"], eval_apgd_steps=10, eval_diagnostics_examples=16))
    torch.manual_seed(0)
    with eval_mode(model):
        return masking_diagnostics(model, task, [batch], accelerator, specs, suite, steps=5, square_queries=100)


def _failed(report: dict) -> set[str]:
    return {c["name"] for c in report["checks"] if not c["passed"]}


def test_a_normal_model_passes_every_diagnostic(accelerator):
    report = _diagnose(tiny_mlp(), accelerator)
    assert report["passed"], report["checks"]
    assert report["examples"] == 16
    assert {c["name"] for c in report["checks"]} == {"pgd_vs_white_box", "more_steps", "black_box_vs_white_box",
                                                    "huge_radius"}


def test_saturated_logits_trip_the_pgd_gap_and_the_huge_radius(accelerator, caplog):
    with caplog.at_level("WARNING"):
        report = _diagnose(Saturated(tiny_mlp()), accelerator)
    assert {"pgd_vs_white_box", "huge_radius"} <= _failed(report), report["checks"]
    assert "robust accuracy may be overestimated" in caplog.text


def test_rounded_inputs_trip_black_box_vs_white_box(accelerator):
    report = _diagnose(Rounded(tiny_mlp()), accelerator)
    assert "black_box_vs_white_box" in _failed(report), report["checks"]


def test_a_difference_of_exactly_the_tolerance_does_not_fire():
    """Measured on the vision default: PGD 0.36 vs 0.35 with twice the steps on 100 examples (one example, one
    point) fired "more_steps" through float rounding (0.36 - 0.35 = 0.01000000000000001). One point is not
    "more than a point"; two are."""
    from samat.common.diagnostics import _judge, full_set_gaps
    from samat.common.suites import Planned

    counts = {}
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731  (as the diagnostics compute them)
    frac = {"linf/pgd-linf": f32(0.36), "linf/apgd-ce-linf": f32(0.33), "linf/pgd-doubled": f32(0.35),
            "huge-radius": 0.15}
    assert frac["linf/pgd-linf"] - frac["linf/pgd-doubled"] > 0.01  # the rounding that used to fire
    checks = {d.name: d.passed for d in _judge(frac, counts, 10, ["linf"], 100, [])}
    assert checks == {"pgd_vs_white_box": True, "more_steps": True, "huge_radius": True}
    frac.update({"linf/pgd-doubled": 0.34, "linf/apgd-ce-linf": 0.32})
    checks = {d.name: d.passed for d in _judge(frac, counts, 10, ["linf"], 100, [])}
    assert checks == {"pgd_vs_white_box": False, "more_steps": False, "huge_radius": True}
    planned = [Planned("pgd-linf", "linf", [], True, None), Planned("apgd-ce-linf", "linf", [], True, None)]
    robust = {"pgd-linf": {"8/255": {"accuracy": 0.46}}, "apgd-ce-linf": {"8/255": {"accuracy": 0.43}}}
    assert [d.passed for d in full_set_gaps(robust, planned, "accuracy")] == [True]
