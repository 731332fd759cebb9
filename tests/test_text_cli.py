"""The text CLIs: ``scripts/run.py --task text`` end to end, ``scripts/attack_text.py`` side by side and its
bad-input errors, and an offline ``import textattack`` in a fresh process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from text_helpers import tiny_checkpoint, tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def _python(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def _attack_text(argv: list[str], monkeypatch) -> int:
    """Run scripts/attack_text.py in this process (its imports are already warm); returns the exit code."""
    spec = importlib.util.spec_from_file_location("attack_text", ROOT / "scripts" / "attack_text.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "attack_text", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    monkeypatch.setattr(sys, "argv", ["attack_text.py", *argv])
    try:
        module.main_guard(module.main)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_textattack_imports_offline_and_keeps_our_loggers(tmp_path):
    """With no NLTK data on the path, the import neither hangs nor crashes, and textattack's dictConfig
    does not silence loggers that existed before it."""
    code = ("import logging; lg = logging.getLogger('samat.probe'); from samat.text import resources; "
            "ta = resources.import_textattack(); print(ta.__name__, lg.disabled)")
    proc = _python(["-c", code], env={"NLTK_DATA": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["textattack", "False"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step SAM run of ``scripts/run.py --task text`` on a tiny BERT and tiny data."""
    root = tmp_path_factory.mktemp("textcli")
    model, data, out = tiny_checkpoint(root / "tiny"), tiny_dataset(root / "data"), root / "sam"
    proc = _python(["scripts/run.py", "--task", "text", "--method", "sam", "--model", str(model),
                    "--dataset", str(data), "--max_steps", "2", "--max_eval_samples", "8", "--batch_size", "8",
                    "--eval_l2", "0.05", "--eval_linf", "none", "--eval_steps", "2", "--log_with", "none",
                    "--textattack_recipes", "deepwordbug", "--textattack_num_examples", "3",
                    "--max_length", "32", "--output_dir", str(out),
                    # a two-step toy model may predict one class: attack it anyway (the test is the plumbing)
                    "--attack_collapsed", "true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "run": out, "tiny": model, "data": data}


def test_run_py_text_end_to_end(trained):
    results = json.loads((trained["run"] / "results.json").read_text())
    assert results["task"] == "text" and results["method"] == "sam"
    assert results["data"]["text_column"] == "sentence" and results["data"]["label_names"] == ["neg", "pos"]
    assert set(results["metrics"]["robust"]["pgd-l2"]) == {"0.05"}
    summary = results["metrics"]["textattack"]["deepwordbug"]
    assert summary["num_examples"] == 3
    assert summary["accuracy_under_attack"] <= summary["original_accuracy"]
    saved = trained["run"] / "model"
    assert (saved / "config.json").exists() and (saved / "samat_text.json").exists()


def test_attack_text_bad_input_is_one_line_and_writes_nothing(trained, monkeypatch, capsys):
    report = trained["root"] / "bad"
    cases = [(["--checkpoints", str(trained["run"]), "--recipes", "deepwordbug", "nope"], "choose one of"),
             (["--checkpoints", str(trained["data"])], "no classifier"),
             (["--checkpoints", str(trained["root"] / "missing")], "does not exist"),
             (["--checkpoints", str(trained["run"]), "--text_column", "review"], "column 'review'"),
             (["--checkpoints", str(trained["run"]), "--recipes", "textfooler"], "paragramcf")]
    for argv, message in cases:
        assert _attack_text([*argv, "--output_dir", str(report)], monkeypatch) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not report.exists()


def test_attack_text_side_by_side(trained, monkeypatch, capsys):
    report = trained["root"] / "report"
    argv = ["--checkpoints", str(trained["run"]), str(trained["tiny"]), "--recipes", "deepwordbug", "pruthi",
            "--num_examples", "3", "--output_dir", str(report)]
    assert _attack_text(argv, monkeypatch) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "attack tiny / pruthi" in captured.err  # a progress bar per model x recipe
    assert table.count("| sam ") == 2 and table.count("| tiny ") == 2
    summary = json.loads((report / "summary.json").read_text())
    assert [(r["model"], r["recipe"]) for r in summary["rows"]] == [
        ("sam", "deepwordbug"), ("sam", "pruthi"), ("tiny", "deepwordbug"), ("tiny", "pruthi")]
    assert len((report / "examples.csv").read_text().strip().splitlines()) == 1 + 4 * 3
    # The same sentences and seeds as the run's own TextAttack evaluation.
    own = json.loads((trained["run"] / "results.json").read_text())["metrics"]["textattack"]["deepwordbug"]
    row = summary["rows"][0]
    assert {k: row[k] for k in ("original_accuracy", "accuracy_under_attack", "avg_queries")} == {
        k: own[k] for k in ("original_accuracy", "accuracy_under_attack", "avg_queries")}
    # Files exist now: a second run refuses instead of overwriting.
    assert _attack_text(argv, monkeypatch) == 2
    assert "--overwrite" in capsys.readouterr().err
