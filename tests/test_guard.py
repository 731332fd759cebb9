"""The divergence guard: a run whose training failed stops with one line instead of reporting a model."""

from __future__ import annotations

import math

import torch
from torch import nn

from samat.common.guard import CHECK_EXAMPLES, WINDOW, DivergenceGuard, check_steps


class FixedLogits(nn.Module):
    """Returns the logits it is given to predict: ``(B, K)``."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def _feed(guard: DivergenceGuard, model: nn.Module, losses: list[float]) -> list:
    reasons = []
    for step, loss in enumerate(losses, start=1):
        model(torch.zeros(1))
        reasons.append(guard.failure(step, loss, skipped=False))
    return reasons


def test_check_steps_wait_for_warmup_examples_and_a_window_then_twice_that():
    assert check_steps(total_steps=400, warmup_ratio=0.05, examples_per_step=128) == (20 + WINDOW, 2 * (20 + WINDOW))
    assert check_steps(total_steps=400, warmup_ratio=0.0, examples_per_step=8) == (CHECK_EXAMPLES // 8, 128)
    assert check_steps(total_steps=100, warmup_ratio=0.0, examples_per_step=8) == (CHECK_EXAMPLES // 8, 100)
    assert check_steps(total_steps=5, warmup_ratio=0.0, examples_per_step=8) == (5,)


def test_loss_at_chance_after_the_check_step_stops_with_the_fix():
    model = FixedLogits(torch.zeros(4, 10).index_fill_(1, torch.tensor([3]), 1.0))
    guard = DivergenceGuard(model, check_steps=(12, 24), lr=0.1, warmup_ratio=0.0)
    reasons = _feed(guard, model, [math.log(10)] * 24)
    assert reasons[:-1] == [None] * 23
    assert "chance level for 10 classes" in reasons[-1] and "--lr (now 0.1;" in reasons[-1]
    assert "--warmup_ratio" in reasons[-1] and "single class" in reasons[-1]


def test_a_learning_model_passes_and_a_nonfinite_loss_stops_at_once():
    logits = torch.eye(10)[torch.arange(4)]
    model = FixedLogits(logits)
    guard = DivergenceGuard(model, check_steps=(12,), lr=0.1, warmup_ratio=0.05)
    assert _feed(guard, model, [2.3 - 0.1 * i for i in range(12)]) == [None] * 12
    # a slow start that learns before the second check is not stopped
    guard = DivergenceGuard(model, check_steps=(12, 24), lr=0.1, warmup_ratio=0.05)
    assert _feed(guard, model, [2.3] * 12 + [1.0] * 12) == [None] * 24
    guard = DivergenceGuard(model, check_steps=(12,), lr=0.1, warmup_ratio=0.05)
    assert guard.failure(1, float("nan"), skipped=True) is None  # fp16 overflow: the scaler skips the step
    assert "diverged" in guard.failure(2, float("nan"), skipped=False)


def test_one_class_near_chance_stops_with_three_or_more_classes_but_not_a_binary_fine_tune():
    model = FixedLogits(torch.tensor([[2.0, 0.0, 0.0]] * 8))  # always class 0 of 3
    guard = DivergenceGuard(model, check_steps=(WINDOW,), lr=0.1, warmup_ratio=0.0)
    reasons = _feed(guard, model, [0.95 * math.log(3)] * WINDOW)
    assert reasons[-1] is not None and "single class" in reasons[-1]
    # a binary fine-tune sits just below ln 2, predicting the majority class, before it learns (measured on
    # the text default): not a failure
    model = FixedLogits(torch.tensor([[2.0, 0.0]] * 8))
    guard = DivergenceGuard(model, check_steps=(WINDOW,), lr=5e-5, warmup_ratio=0.1)
    assert _feed(guard, model, [0.68] * WINDOW)[-1] is None
    guard = DivergenceGuard(model, check_steps=(WINDOW,), lr=5e-5, warmup_ratio=0.1)
    assert "chance level for 2 classes" in _feed(guard, model, [0.693] * WINDOW)[-1]


def test_a_diverging_run_stops_with_one_line_and_no_results(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "run.py"), "--model", "small_cnn", "--width", "4",
         "--max_train_samples", "512", "--max_eval_samples", "32", "--batch_size", "32", "--max_steps", "30",
         "--lr", "1e4", "--warmup_ratio", "0", "--log_with", "none", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--lr (now 10000)" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (out / "results.json").exists()


# ----------------------------------------------------------------------------- the label prior (issue 24)


def test_the_reference_is_the_prior_loss_on_the_steps_own_labels():
    from samat.common.guard import label_prior, prior_entropy

    prior = label_prior(torch.tensor([0] * 7 + [1] * 3), num_classes=2)
    assert torch.allclose(prior, torch.tensor([0.7, 0.3], dtype=torch.float64))
    assert abs(prior_entropy(prior) - (-(0.7 * math.log(0.7) + 0.3 * math.log(0.3)))) < 1e-12
    assert abs(prior_entropy(label_prior(torch.arange(10), 10)) - math.log(10)) < 1e-12
    guard = DivergenceGuard(nn.Identity(), check_steps=(WINDOW,), lr=0.1, warmup_ratio=0.0, prior=prior)
    assert abs(guard.reference(torch.tensor([0, 0, 1])) - (-(2 * math.log(0.7) + math.log(0.3)) / 3)) < 1e-12
    assert guard.reference(torch.tensor([255, 0])) == -math.log(0.7)  # an ignore_index is left out


def test_a_loss_at_the_prior_stops_though_it_is_below_ln_k():
    """70/30 labels: a model that learned only the prior sits at ~0.611 nats, well below ln 2 = 0.693."""
    from samat.common.guard import label_prior

    prior = label_prior(torch.tensor([0] * 7 + [1] * 3), num_classes=2)
    model = FixedLogits(torch.tensor([[math.log(0.7), math.log(0.3)]] * 4))
    g = torch.Generator().manual_seed(0)
    steps = [(torch.rand(32, generator=g) < 0.3).long() for _ in range(2 * WINDOW)]
    at_prior = [float(-prior[y].log().mean()) for y in steps]  # exactly what predicting the prior costs

    def feed(losses: list[float]) -> list:
        guard = DivergenceGuard(model, check_steps=(WINDOW, 2 * WINDOW), lr=0.1, warmup_ratio=0.0, prior=prior)
        out = []
        for step, (loss, y) in enumerate(zip(losses, steps), start=1):
            model(torch.zeros(1))
            out.append(guard.failure(step, loss, skipped=False, labels=y))
        return out

    reasons = feed(at_prior)
    assert sum(at_prior) / len(at_prior) < 0.95 * math.log(2) and reasons[:-1] == [None] * (2 * WINDOW - 1)
    assert "prior" in reasons[-1] and "--lr (now 0.1;" in reasons[-1] and "--max_steps" in reasons[-1]
    assert feed([0.8 * v for v in at_prior]) == [None] * (2 * WINDOW)  # learning beyond the prior: trains on
    # without a prior the old ln K rule would have let the prior-only model through
    guard = DivergenceGuard(model, check_steps=(WINDOW,), lr=0.1, warmup_ratio=0.0)
    assert _feed(guard, model, at_prior[:WINDOW])[-1] is None


def _run_on(data, out, *extra: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "run.py"), "--dataset", str(data), "--model", "small_cnn",
         "--width", "4", "--batch_size", "32", "--max_steps", "40", "--eval_linf", "2/255", "--eval_l2", "none",
         "--eval_steps", "1", "--sharpness_examples", "0", "--log_with", "none", "--output_dir", str(out),
         *extra],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_a_run_on_data_without_signal_stops_at_the_prior_and_one_with_signal_trains_on(tmp_path):
    from helpers import prior_only_dataset

    noise = prior_only_dataset(tmp_path / "nosignal", signal=False)
    proc = _run_on(noise, tmp_path / "stuck")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "prior" in errors[0] and "--lr (now 0.1;" in errors[0], proc.stderr[-2000:]
    assert "--warmup_ratio" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "stuck" / "results.json").exists()

    learnable = prior_only_dataset(tmp_path / "signal", signal=True)
    proc = _run_on(learnable, tmp_path / "learns")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    results = json.loads((tmp_path / "learns" / "results.json").read_text())
    assert results["cost"]["optimizer_steps"] == 40
