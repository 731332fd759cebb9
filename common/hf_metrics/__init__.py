"""Hugging Face ``evaluate`` metric modules of samat, loadable offline by path.

``evaluate.load(path)`` reads a metric script from a local folder without the hub, so a user's own
``evaluate`` pipeline (a ``Trainer``'s ``compute_metrics``, an evaluation script) can report robustness the way
samat does::

    from samat.common.hf_metrics import load_robust_accuracy
    metric = load_robust_accuracy()
    metric.compute(predictions=adv_preds, references=labels, clean_predictions=clean_preds)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROBUST_ACCURACY = Path(__file__).resolve().parent / "robust_accuracy"


def load_robust_accuracy(**kwargs: Any):
    """The ``robust_accuracy`` metric (:mod:`evaluate`), loaded from this package's folder (no hub)."""
    import evaluate

    return evaluate.load(str(ROBUST_ACCURACY), **kwargs)
