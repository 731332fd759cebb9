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
    assert "chance level for 10 classes" in reasons[-1] and "--lr (now 0.1)" in reasons[-1]
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
