"""Issue 24: a model that learned nothing beyond the label prior is not attacked, and every classification
result carries its majority-class baseline and macro-F1 (torchmetrics) beside accuracy; one warnings list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samat.common.evaluate import evaluate_all, majority_baseline
from samat.common.results import RunResults
from samat.common.suites import Suite, resolve_suite
from samat.common.config import EvalArgs
from samat.common.task import AttackSpec
from helpers import image_batch, prior_only_dataset, tiny_mlp, vision_task

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class Constant(nn.Module):
    """Pixels ``(B, 3, 8, 8)`` -> logits ``(B, 4)`` that always favour class 2 by a wide margin, through a
    weight so that attacks have a gradient (and could run)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.0, 0.0, 5.0, 0.0]))
        self.w = nn.Parameter(torch.full((1,), 1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias + self.w * x.flatten(1).mean(dim=1, keepdim=True)


def _counting_specs(calls: list) -> list[AttackSpec]:
    def objective(logits, batch, step, steps):
        calls.append(step)
        return F.cross_entropy(logits, batch["labels"])
    return [AttackSpec("pgd-linf", "linf", [("4/255", 4 / 255)], objective)]


def _loader():
    return [image_batch(n=12, classes=4, seed=s) for s in (1, 2)]


def test_a_collapsed_model_is_not_attacked_unless_asked(accelerator):
    calls: list = []
    suite = resolve_suite(vision_task(), EvalArgs(eval_attacks=["apgd-ce"], eval_apgd_steps=2))
    out = evaluate_all(Constant(), vision_task(), _loader(), accelerator, _counting_specs(calls), steps=2,
                       suite=suite)
    assert calls == [] and out["collapsed"] and out["metrics"]["robust"] == {}
    assert "robust metrics not computed" in out["attacks_skipped"] and "--attack_collapsed" in out["attacks_skipped"]
    assert out["predicted_class_counts"]["2"] == 24 and out["sanity"]["passed"]

    forced = evaluate_all(Constant(), vision_task(), _loader(), accelerator, _counting_specs(calls), steps=2,
                          suite=suite, attack_collapsed=True)
    assert len(calls) > 0 and forced["attacks_skipped"] is None and forced["collapsed"]
    assert set(forced["metrics"]["robust"]) == {"pgd-linf", "apgd-ce-linf", "apgd-ce-suite-linf"}

    # a model that predicts two or more classes is attacked as before
    calls.clear()
    out = evaluate_all(tiny_mlp(classes=4), vision_task(), _loader(), accelerator, _counting_specs(calls), steps=2)
    assert not out["collapsed"] and len(set(calls)) == 2 and out["attacks_skipped"] is None


def test_macro_f1_equals_sklearn_on_the_same_predictions_and_the_baseline(accelerator):
    from sklearn.metrics import f1_score

    batches, model = _loader(), tiny_mlp(classes=4)
    calls: list = []
    out = evaluate_all(model, vision_task(), batches, accelerator, _counting_specs(calls), steps=2)
    labels = torch.cat([b["labels"] for b in batches])
    with torch.no_grad():
        preds = torch.cat([model(b["pixel_values"]).argmax(1) for b in batches])
    clean = out["metrics"]["clean"]
    assert abs(clean["macro_f1"] - f1_score(labels, preds, average="macro")) < 1e-6
    assert clean["accuracy"] == (preds == labels).sum().item() / len(labels)
    assert "macro_f1" in out["metrics"]["robust"]["pgd-linf"]["4/255"]
    counts = torch.bincount(labels, minlength=4)
    base = out["majority_baseline"]
    assert base["class"] == int(counts.argmax()) and abs(base["accuracy"] - counts.max() / 24) < 1e-9
    constant = torch.full_like(labels, base["class"])
    assert abs(base["macro_f1"] - f1_score(labels, constant, average="macro")) < 1e-6
    # fixed predictions with a class absent from both: sklearn leaves it out, and so do we
    assert abs(majority_baseline(torch.tensor([7, 3, 0]))["macro_f1"] -
               f1_score([0] * 7 + [1] * 3, [0] * 10, average="macro")) < 1e-6


def test_warnings_in_the_file_are_the_summary_lines():
    r = RunResults(task="vision", method="erm", headline_metric="accuracy",
                   metrics={"clean": {"accuracy": 0.61}, "robust": {}},
                   majority_baseline={"class": 0, "accuracy": 0.6, "macro_f1": 0.375},
                   sanity={"passed": False, "checks": [{"name": "eps0_equals_clean", "passed": False}]},
                   warnings=["segmentation: a task's own warning"])
    line = r.summary_line()
    shown = line.split("WARNING: ", 1)[1].split("; WARNING: ")
    written = r.to_dict()["warnings"]
    assert written == shown and len(written) == 3
    assert any("majority" in w for w in written) and any("sanity" in w for w in written)
    again = RunResults.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again.all_warnings() == written and again.summary_line() == line
    # well above the baseline: no warning
    r.metrics["clean"]["accuracy"], r.sanity, r.warnings = 0.9, {"passed": True}, []
    assert r.to_dict()["warnings"] == [] and r.summary_line().endswith("no warnings")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run.py"), *args], capture_output=True,
                          text=True, env=ENV, timeout=300, cwd=ROOT)


def test_a_collapsed_run_stops_after_the_clean_pass_and_says_why(tmp_path):
    """Identical images: the model can only predict one class. The guard is off (it would stop the run)."""
    data = prior_only_dataset(tmp_path / "data", signal=False, n_train=64, n_test=32)
    common = ["--dataset", str(data), "--model", "small_cnn", "--width", "4", "--batch_size", "32",
              "--max_steps", "2", "--divergence_guard", "false", "--eval_linf", "2/255", "--eval_l2", "none",
              "--eval_steps", "1", "--log_with", "none"]
    proc = _run(*common, "--output_dir", str(tmp_path / "collapsed"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "collapsed" / "results.json").read_text())
    assert results["collapsed"] and results["metrics"]["robust"] == {} and results["sharpness"] is None
    assert "robust metrics not computed" in results["attacks_skipped"]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("method erm")][-1]
    assert summary.split("WARNING: ", 1)[1].split("; WARNING: ") == results["warnings"]
    assert any("robust metrics not computed" in w for w in results["warnings"])
    assert results["majority_baseline"]["accuracy"] == 0.6875  # round(0.7 * 32) = 22 of 32
    assert results["columns"]["baseline/majority_class/accuracy"] == 0.6875
    assert "majority class 0" in proc.stdout

    forced = _run(*common, "--attack_collapsed", "true", "--output_dir", str(tmp_path / "forced"))
    assert forced.returncode == 0, forced.stderr[-3000:]
    results = json.loads((tmp_path / "forced" / "results.json").read_text())
    assert results["collapsed"] and results["attacks_skipped"] is None
    assert "macro_f1" in results["metrics"]["robust"]["pgd-linf"]["2/255"]

    # samat evaluate applies the same rule and the same flag to the saved model
    ev = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(tmp_path / "collapsed"),
                         "--eval_linf", "2/255", "--eval_l2", "none", "--eval_steps", "1"],
                        capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert ev.returncode == 0, ev.stderr[-3000:]
    evaluation = json.loads((tmp_path / "collapsed" / "evaluations" / "pgd.json").read_text())
    assert evaluation["metrics"]["robust"] == {} and "robust metrics not computed" in ev.stdout
    ev = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(tmp_path / "collapsed"),
                         "--eval_linf", "2/255", "--eval_l2", "none", "--eval_steps", "1",
                         "--attack_collapsed", "true"], capture_output=True, text=True, env=ENV, timeout=300,
                        cwd=ROOT)
    assert ev.returncode == 0, ev.stderr[-3000:]
    evaluation = json.loads((tmp_path / "collapsed" / "evaluations" / "pgd.json").read_text())
    assert set(evaluation["metrics"]["robust"]) == {"pgd-linf"}
