"""Classification metrics against reference implementations: samat's accuracy statistics and the ``evaluate``
robust-accuracy module (loaded offline by path) against torchmetrics on fixed predictions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from samat.common.hf_metrics import load_robust_accuracy
from samat.common.metrics import accuracy_from_stats, accuracy_stats

G = torch.Generator().manual_seed(5)
LABELS = torch.randint(0, 4, (50,), generator=G)
CLEAN = torch.where(torch.rand(50, generator=G) < 0.7, LABELS, torch.randint(0, 4, (50,), generator=G))
ADV = torch.where(torch.rand(50, generator=G) < 0.5, CLEAN, torch.randint(0, 4, (50,), generator=G))


def test_accuracy_stats_equal_torchmetrics():
    logits = F.one_hot(CLEAN, 4).float()
    ours = accuracy_from_stats(accuracy_stats(logits, LABELS).sum(dim=0))
    assert ours["examples"] == 50
    assert ours["accuracy"] == pytest.approx(float(multiclass_accuracy(CLEAN, LABELS, 4, average="micro")))


def test_the_evaluate_module_loads_offline_and_equals_torchmetrics(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = load_robust_accuracy()
    out = metric.compute(predictions=ADV.tolist(), references=LABELS.tolist(), clean_predictions=CLEAN.tolist())
    assert out["robust_accuracy"] == pytest.approx(float((ADV == LABELS).float().mean()))
    assert out["clean_accuracy"] == pytest.approx(float((CLEAN == LABELS).float().mean()))
    assert out["robust_macro_f1"] == pytest.approx(float(multiclass_f1_score(ADV, LABELS, 4, average="macro")))
    assert out["clean_macro_f1"] == pytest.approx(float(multiclass_f1_score(CLEAN, LABELS, 4, average="macro")))
    fooled = ((CLEAN == LABELS) & (ADV != LABELS)).sum() / (CLEAN == LABELS).sum()
    assert out["attack_success_rate"] == pytest.approx(float(fooled))
    with pytest.raises(ValueError, match="clean_predictions has 2 entries"):
        metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], clean_predictions=[0, 1])
