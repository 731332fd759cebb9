"""scripts/run.py end to end on the vision task: accelerate launch, results.json, checkpoints, exact resume,
and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "small_cnn", "--width", "8", "--max_train_samples", "256", "--max_eval_samples", "64",
        "--batch_size", "32", "--eval_linf", "2/255", "--eval_l2", "0.25", "--eval_steps", "2",
        "--log_with", "none"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run(*args: str, launcher: tuple[str, ...] = (sys.executable,), timeout: int = 300, env: dict = ENV):
    return subprocess.run([*launcher, str(ROOT / "scripts" / "run.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_accelerate_launch_writes_results_and_checkpoint(tmp_path):
    out = tmp_path / "sam"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    # OMP_NUM_THREADS=1 is what accelerate launch exports when nothing says otherwise
    proc = run("--task", "vision", "--method", "sam", "--max_steps", "3", "--output_dir", str(out), *FAST,
               "--log_with", "tensorboard", launcher=(accelerate, "launch", "--num_processes", "1", "--cpu"),
               env={**ENV, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["cpu_threads"] == len(os.sched_getaffinity(0))  # a single CPU process uses every core
    assert results["method"] == "sam" and results["cost"]["optimizer_steps"] == 3
    # SAM: two forward and two backward passes per step
    assert results["cost"]["forward_passes"] == 6 and results["cost"]["backward_passes"] == 6
    assert set(results["metrics"]["robust"]) == {"pgd-linf", "pgd-l2"}
    assert results["sanity"]["passed"], results["sanity"]
    assert 0 <= results["metrics"]["robust"]["pgd-linf"]["2/255"]["accuracy"] <= \
        results["metrics"]["clean"]["accuracy"]
    assert (out / "checkpoints" / "step_3" / "trainer_state.json").exists()
    # the model reloads from its folder alone: config (normalisation, classes) + safetensors, and a model card
    assert {p.name for p in (out / "model").iterdir()} == {"samat_model.json", "model.safetensors", "README.md"}
    assert any((out / "logs").rglob("events.out.tfevents.*"))
    assert "| clean" in proc.stdout


def test_pgd_at_counts_attack_passes_and_examples(tmp_path):
    proc = run("--method", "pgd-at", "--train_steps", "3", "--max_steps", "2", "--at_clean_weight", "0.5",
               "--output_dir", str(tmp_path / "at"), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cost = json.loads((tmp_path / "at" / "results.json").read_text())["cost"]
    assert cost["forward_passes"] == 2 * (3 + 1) and cost["backward_passes"] == 2 * (3 + 1)
    # 3 attack passes of 32 examples, then one doubled clean+adversarial batch of 64, per step
    assert cost["forward_examples"] == cost["backward_examples"] == 2 * (3 * 32 + 64)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model" / "model.safetensors")


def resumed_from_step_4(tmp_path: Path, *method_flags: str) -> tuple[dict, dict]:
    """An 8-step vision run of ``method_flags`` checkpointed at step 4, and the same run resumed from that
    checkpoint (step 8, model and results taken away): asserts both end with bit-identical weights and returns
    their results.json records ``(uninterrupted, resumed)``."""
    import shutil

    args = [*method_flags, "--max_steps", "8", "--checkpoint_every", "4", "--seed", "2", *FAST, "--batch_size", "16",
            "--eval_l2", "none", "--sharpness_examples", "0"]
    full = run(*args, "--output_dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "checkpoints" / "step_8")
    shutil.rmtree(cut / "model")
    (cut / "results.json").unlink()
    resumed = run(*args, "--output_dir", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = _weights(tmp_path / "full"), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return tuple(json.loads((d / "results.json").read_text()) for d in (tmp_path / "full", cut))


def test_resume_after_preemption_ends_identical(tmp_path):
    """SIGTERM mid-training saves a checkpoint; --resume ends with bit-identical weights and metrics."""
    args = ["--method", "sam", "--max_steps", "24", "--seed", "3", *FAST, "--batch_size", "16"]
    full = run(*args, "--output_dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "run.py"), *args, "--output_dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    deadline = time.time() + 120
    # wait until training is under way (the first progress update), then preempt
    while time.time() < deadline and proc.poll() is None:
        line = proc.stderr.readline()
        if "train sam:" in line and "/24" in line and " 0/24" not in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert not (out / "results.json").exists()
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert saved and int(saved[-1].name.split("_")[1]) < 24

    refused = run(*args, "--output_dir", str(out))
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = run(*args, "--output_dir", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "full" / "results.json").read_text())
    rb = json.loads((out / "results.json").read_text())
    assert ra["metrics"] == rb["metrics"]
    for key in ("forward_passes", "backward_passes", "forward_examples", "backward_examples"):
        assert ra["cost"][key] == rb["cost"][key], key

    again = run(*args, "--output_dir", str(out), "--resume")  # finished: prints, changes nothing
    assert again.returncode == 0 and "is finished" in again.stdout


def test_local_dataset_folder_with_named_columns(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    def split(n):
        return datasets.Dataset.from_dict(
            {"picture": [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(n)],
             "y": rng.integers(0, 3, n).tolist()},
            features=datasets.Features({"picture": datasets.Image(), "y": datasets.Value("int64")}))
    datasets.DatasetDict({"train": split(40), "validation": split(16)}).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "run"
    proc = run("--dataset", str(tmp_path / "data"), "--label_column", "y", "--max_steps", "2",
               "--output_dir", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["eval_split"] == "validation" and results["data"]["num_classes"] == 3
    assert results["data"]["channels"] == 3

    bad = run("--dataset", str(tmp_path / "data"), "--max_steps", "2", "--output_dir", str(tmp_path / "x"),
              *FAST)
    assert bad.returncode == 2 and "--label_column" in bad.stderr


BAD_INPUT = [
    (["--task", "audio"], "unknown task 'audio'; choose one of: segmentation, text, vision"),
    (["--method", "sgd"], "unknown method 'sgd'; choose one of:"),
    (["--model", "resnet9000"], "--model 'resnet9000'"),
    (["--dataset", "no/such-dataset"], "--dataset 'no/such-dataset'"),
    (["--method", "sam", "--rho", "-1"], "--rho: -1.0 must be in [0, 10]"),
    (["--method", "pgd-at", "--train_eps", "8"], "did you mean 8/255"),
    (["--eval_linf", "4"], "--eval_linf: '4' is larger than 1"),
    (["--method", "erm", "--rho", "0.1"], "--rho does not apply to --method erm"),
    (["--optimizer", "lion"], "--optimizer: unknown value 'lion'; choose one of: sgd, adamw"),
    (["--batch_size", "0"], "--batch_size: 0 must be > 0"),
    (["--image_column", "pixels"], "--image_column: no column 'pixels'"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    (["--config", "/nonexistent.yaml"], "--config: no such file"),
    (["--push_to_hub", "true"], "--push_to_hub: the Hugging Face hub cannot be reached"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[a[0][-2] + a[0][-1] for a in BAD_INPUT])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    out = tmp_path / "run"
    proc = run(*args, "--output_dir", str(out), "--max_steps", "1", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "results.json").exists()


def test_config_file_values_and_cli_override(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("method: sam\nrho: 0.1\nmax_steps: 1\neval_linf: [1/255]\n")
    out = tmp_path / "run"
    proc = run("--config", str(cfg), "--rho", "0.2", "--output_dir", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["method_resolved"]["rho"] == 0.2 and results["method"] == "sam"


def test_help_explains_every_flag():
    proc = run("--help", timeout=120)
    assert proc.returncode == 0
    for flag in ("--rho", "--train_eps", "--eval_linf", "--gradient_accumulation_steps", "--resume",
                 "--image_size", "--augment"):
        assert flag in proc.stdout
    assert "sam-at" in proc.stdout


def test_transformers_image_model_from_a_folder_and_timm(tmp_path):
    """A transformers image classifier loads through from_pretrained (a local folder stands in for a hub id),
    normalised inside, grey images repeated to RGB; timm models by name."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=10)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    common = [a for a in FAST if a not in ("--model", "small_cnn", "--width", "8")]
    out = tmp_path / "run_vit"
    proc = run("--model", str(tmp_path / "vit"), "--image_size", "16", "--method", "sam", "--max_steps", "2",
               "--output_dir", str(out), *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())["data"]
    assert data["channels"] == 3 and data["image_size"] == 16

    out = tmp_path / "run_timm"
    proc = run("--model", "timm:resnet18", "--max_steps", "1", "--output_dir", str(out), *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("--model", "timm:resnet18", "--pretrained", "--max_steps", "1", "--output_dir",
               str(tmp_path / "x"), *common)
    assert proc.returncode == 2 and "--model 'timm:resnet18'" in proc.stderr


def _finished_run(tmp_path: Path) -> Path:
    out = tmp_path / "done"
    proc = run("--max_steps", "1", "--output_dir", str(out), *FAST, "--sharpness_examples", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _one_error_line(proc, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_overwrite_with_a_bad_task_flag_deletes_nothing(tmp_path):
    out = _finished_run(tmp_path)
    before = (out / "results.json").read_bytes()
    proc = run("--overwrite", "--image_size", "2", "--output_dir", str(out), *FAST, timeout=120)
    _one_error_line(proc, "--image_size: 2 must be in [4, 1024]")
    assert (out / "results.json").read_bytes() == before
    assert (out / "checkpoints" / "step_1" / "trainer_state.json").is_file()


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    for out in (target, target / "run"):
        proc = run("--max_steps", "1", "--output_dir", str(out), *FAST, timeout=120)
        _one_error_line(proc, "is a file, not a folder")
    assert target.read_text() == "keep me"


def test_a_folder_of_another_task_is_refused_even_with_overwrite(tmp_path):
    out = _finished_run(tmp_path)
    record = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps({**record, "task": "segmentation"}))
    before = (out / "results.json").read_bytes()
    proc = run("--overwrite", "--max_steps", "1", "--output_dir", str(out), *FAST, timeout=120)
    _one_error_line(proc, "holds a 'segmentation' run, not a 'vision' one")
    assert (out / "results.json").read_bytes() == before


def test_config_file_with_another_tasks_keys_is_refused(tmp_path):
    cfg = tmp_path / "text.yaml"
    cfg.write_text("task: vision\nmax_length: 64\ntextattack_recipes: [pwws]\n")
    out = tmp_path / "run"
    proc = run("--config", str(cfg), "--output_dir", str(out), *FAST, timeout=120)
    _one_error_line(proc, "unrecognized arguments: --max_length 64")
    assert not out.exists()


def test_read_only_arrays_become_tensors_without_a_warning():
    """Arrays the datasets library hands out can be read-only; torch warns on (and must not write to) them."""
    import warnings

    import numpy as np

    from samat.vision.data import to_chw_float

    image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    image.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_chw_float(image)
    assert out.shape == (3, 2, 2) and out.dtype == torch.float32
    assert torch.allclose(out[:, 0, 0] * 255, torch.tensor([0.0, 1.0, 2.0]))


def test_resume_past_a_damaged_checkpoint(tmp_path):
    """Issue 24: a truncated model.safetensors in the newest checkpoint: --resume falls back to the previous
    one with a warning naming the file, keeps the damaged folder; with no readable one, one error line."""
    out = tmp_path / "run"
    args = ["--max_steps", "6", "--checkpoint_every", "2", "--eval_l2", "none", "--sharpness_examples", "0",
            *FAST, "--output_dir", str(out)]
    assert run(*args).returncode == 0
    (out / "results.json").unlink()  # as if the run had been stopped after its last checkpoint
    newest = out / "checkpoints" / "step_6" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:5])
    proc = run(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "resumed from" in proc.stderr
    warning = next(line for line in proc.stderr.splitlines() if "cannot be read" in line)
    assert "step_6/model.safetensors" in warning and "step_4" in warning
    kept = out / "checkpoints" / "damaged-step_6" / "model.safetensors"
    assert kept.stat().st_size == 5  # never deleted, never overwritten
    results = json.loads((out / "results.json").read_text())
    assert results["cost"]["optimizer_steps"] == 6 and any("cannot be read" in w for w in results["warnings"])

    (out / "results.json").unlink()
    for checkpoint in (out / "checkpoints").glob("step_*"):
        (checkpoint / "model.safetensors").write_bytes(b"\0" * 3)
    proc = run(*args, "--resume")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.safetensors" in errors[0] and "--overwrite" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and (out / "checkpoints" / "step_6").is_dir()
