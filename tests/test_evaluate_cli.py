"""``samat evaluate`` end to end on two saved runs of each task (tiny models, a few steps), and its bad input:
one ``error:`` line, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from samat.common import offline
from samat.common.errors import UsageError
from samat.common.results import RunResults

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
VISION = ["--model", "small_cnn", "--width", "4", "--max_train_samples", "64", "--max_eval_samples", "16",
          "--batch_size", "16", "--eval_linf", "2/255", "--eval_l2", "none", "--eval_steps", "1",
          "--sharpness_examples", "0", "--log_with", "none", "--max_steps", "1"]
SEGMENTATION = ["--task", "segmentation", "--encoder_depth", "3", "--decoder_channels", "8", "8", "8",
                "--batch_size", "8", "--max_eval_samples", "8", "--eval_linf", "2/255", "--eval_l2", "none",
                "--segpgd_linf", "none", "--eval_steps", "1", "--canvas_size", "48", "--canvas_train_size", "16", "--max_train_samples", "16",
                "--canvas_test_size", "8", "--sharpness_examples", "0", "--log_with", "none", "--max_steps", "1"]
# The cheapest suite beyond pgd: APGD-CE/DLR with 2 iterations, no diagnostics.
APGD = ["--eval_attacks", "apgd", "--eval_apgd_steps", "2", "--eval_diagnostics", "false", "--eval_steps", "1"]
needs_fashion_mnist = pytest.mark.skipif(
    not (offline.fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed")


def script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], capture_output=True,
                          text=True, env={**ENV, **(env or {})}, timeout=600, cwd=ROOT)


def train_two(root: Path, *args: str, env: dict | None = None) -> list[Path]:
    """An ERM and a SAM run of one step each."""
    runs = []
    for method in ("erm", "sam"):
        out = root / method
        proc = script("run", "--method", method, "--output_dir", str(out), *args, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(out)
    return runs


def evaluate_in_process(*argv: str):
    from samat.scripts.evaluate import main

    return main(list(argv))


def files_under(*folders: Path) -> set[Path]:
    return {p for f in folders for p in f.rglob("*") if p.is_file()}


def check_evaluated(proc: subprocess.CompletedProcess, runs: list[Path], suite: str, attack_column: str) -> None:
    """One table with a row per run and a column per attack and radius; each run's evaluation file is a
    results record whose clean metric equals the run's own (same examples, bit-identical reload)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert attack_column in table[0] and len(table) == 2 + len(runs)
    assert [row.split("|")[1].strip() for row in table[2:]] == [r.name for r in runs]
    for run in runs:
        evaluation = RunResults.read(run / "evaluations" / f"{suite}.json")
        trained = RunResults.read(run / "results.json")
        assert evaluation.method == trained.method and evaluation.task == trained.task
        assert evaluation.clean == trained.clean
        assert evaluation.sanity["passed"], evaluation.sanity
        assert f"Evaluation `{suite}`" in (run / "model" / "README.md").read_text()


# -------------------------------------------------------------------------------------------- vision


@pytest.fixture(scope="module")
def vision_runs(tmp_path_factory):
    return train_two(tmp_path_factory.mktemp("vision"), *VISION)


@needs_fashion_mnist
def test_vision_runs_side_by_side(vision_runs):
    proc = script("evaluate", *map(str, vision_runs), *APGD, "--eval_linf", "2/255", "8/255", "--eval_l2", "none")
    check_evaluated(proc, vision_runs, "apgd", "apgd-suite-linf 8/255")
    evaluation = RunResults.read(vision_runs[0] / "evaluations" / "apgd.json")
    assert set(evaluation.metrics["robust"]) == {"pgd-linf", "apgd-ce-linf", "apgd-dlr-linf", "apgd-suite-linf"}
    assert set(evaluation.metrics["robust"]["apgd-suite-linf"]) == {"2/255", "8/255"}


@needs_fashion_mnist
def test_a_saved_model_folder_as_model(vision_runs, tmp_path):
    """``--model <run>/model`` with ``--task``: the hub/timm/local path, writing into ``--output``."""
    rows = evaluate_in_process("--model", str(vision_runs[0] / "model"), "--task", "vision",
                               "--max_eval_samples", "16", "--eval_linf", "2/255", "--eval_l2", "none",
                               "--eval_steps", "1", "--output", str(tmp_path / "out"))
    assert rows[0][1].method == "external"
    assert RunResults.read(tmp_path / "out" / "erm-pgd.json").clean == \
        RunResults.read(vision_runs[0] / "results.json").clean


def _three_class_dataset(folder: Path) -> Path:
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = {"image": [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(8)],
            "label": [i % 3 for i in range(8)]}
    split = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}))
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(folder))
    return folder


@needs_fashion_mnist
def test_bad_input_is_one_line_and_writes_nothing(vision_runs, tmp_path):
    before = files_under(*vision_runs)
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    runs = list(map(str, vision_runs))
    cases = [
        ([*runs, "--eval_attacks", "pgd", "nope"], "unknown attack or suite 'nope'; choose from: pgd, apgd, "
                                                   "autoattack"),
        ([*runs, "--eval_linf", "8"], "--eval_linf: '8' is larger than 1"),
        ([runs[0], str(tmp_path / "unfinished")], "is not a finished samat run"),
        ([runs[0], str(tmp_path / "missing")], "is not a folder"),
        ([runs[0], "--dataset", str(_three_class_dataset(tmp_path / "abc"))],
         "predicts 10 classes, but the dataset has 3"),
        ([], "nothing to evaluate"),
    ]
    for argv, message in cases:
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            evaluate_in_process(*argv)
        assert "\n" not in str(err.value)
    assert files_under(*vision_runs) == before
    proc = script("evaluate", runs[0], "--eval_attacks", "nope")  # the CLI: one line, exit 2
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --eval_attacks")
    assert "Traceback" not in proc.stderr and files_under(*vision_runs) == before


# ---------------------------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    from text_helpers import tiny_checkpoint, tiny_dataset

    root = tmp_path_factory.mktemp("text")
    model, data = tiny_checkpoint(root / "tiny"), tiny_dataset(root / "data")
    return train_two(root, "--task", "text", "--model", str(model), "--dataset", str(data), "--max_steps", "1",
                     "--max_eval_samples", "8", "--batch_size", "8", "--eval_l2", "0.05", "--eval_linf", "none",
                     "--eval_steps", "1", "--sharpness_examples", "0", "--log_with", "none",
                     "--textattack_recipes", "none", "--max_length", "32")


def test_text_runs_side_by_side_with_a_textattack_recipe(text_runs):
    # one-step toy models may predict one class: attack them anyway, this test is about the plumbing
    proc = script("evaluate", *map(str, text_runs), *APGD, "--textattack_recipes", "deepwordbug",
                  "--textattack_num_examples", "2", "--attack_collapsed", "true")
    check_evaluated(proc, text_runs, "apgd", "apgd-suite-l2 0.05")
    evaluation = RunResults.read(text_runs[1] / "evaluations" / "apgd.json")
    assert evaluation.metrics["textattack"]["deepwordbug"]["num_examples"] == 2
    assert "textattack/deepwordbug/accuracy_under_attack" in proc.stdout


def test_a_suite_the_text_task_cannot_run(text_runs):
    with pytest.raises(UsageError, match="aa-apgd-ce.* attack pixel-space image classifiers only.*choose from: "
                                         "pgd, apgd, apgd-ce"):
        evaluate_in_process(str(text_runs[0]), "--eval_attacks", "autoattack")
    with pytest.raises(UsageError, match="is a 'text' run, not 'vision'"):
        evaluate_in_process(str(text_runs[0]), "--task", "vision")
    assert not (text_runs[0] / "evaluations" / "autoattack.json").exists()


# ------------------------------------------------------------------------------------- segmentation


@needs_fashion_mnist
def test_segmentation_runs_side_by_side(tmp_path):
    runs = train_two(tmp_path, *SEGMENTATION, env={"SAMAT_CACHE": str(tmp_path / "cache")})
    proc = script("evaluate", *map(str, runs), *APGD, "--eval_linf", "2/255", "--eval_l2", "none",
                  env={"SAMAT_CACHE": str(tmp_path / "cache")})
    check_evaluated(proc, runs, "apgd", "apgd-suite-linf 2/255")
    assert RunResults.read(runs[0] / "evaluations" / "apgd.json").headline_metric == "miou"
