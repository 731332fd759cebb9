"""Exact resume through the text and segmentation input pipelines (tensors read or decoded once, batches cut
at once, augmentation seeded per example): a run resumed from a mid-epoch checkpoint ends with the very
weights of the run that was never stopped (the vision pipeline: tests/test_run_vision.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from text_helpers import tiny_checkpoint, tiny_dataset

from samat.common import offline

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "SAMAT_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((folder / "model").glob("*.safetensors"))
    assert files, list((folder / "model").iterdir())
    return {f"{f.name}/{k}": v for f in files for k, v in load_file(f).items()}


def _resume_is_exact(tmp_path: Path, args: list[str], steps: int, every: int, cut_at: int) -> None:
    """``args`` run for ``steps`` with a checkpoint every ``every`` steps (the run keeps its last two);
    resumed from the one at ``cut_at``, the run ends with the same weights."""
    common = [*args, "--max_steps", str(steps), "--checkpoint_every", str(every), "--log_with", "none",
              "--cpu_threads", "1"]
    full = _run(tmp_path, [*common, "--output_dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for later in (cut / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > cut_at:
            shutil.rmtree(later)
    shutil.rmtree(cut / "model")
    (cut / "results.json").unlink()
    resumed = _run(tmp_path, [*common, "--output_dir", str(cut), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {cut_at}" in resumed.stderr
    a, b = _weights(tmp_path / "full"), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not (offline.fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_segmentation_resume_mid_epoch_is_bit_identical(tmp_path):
    # 24 canvases, batch 8: 3 steps an epoch; cut at step 4 (mid-epoch 1), with random scale, crop and flip
    args = ["--task", "segmentation", "--method", "erm", "--preset", "smoke", "--canvas_size", "48",
            "--canvas_train_size", "24", "--canvas_test_size", "16", "--batch_size", "8", "--scale_min", "0.75",
            "--scale_max", "1.25", "--max_eval_samples", "8", "--eval_batch_size", "8", "--eval_linf", "8/255",
            "--eval_l2", "none", "--segpgd_linf", "none", "--eval_steps", "1", "--sharpness_examples", "0",
            "--seed", "4"]
    _resume_is_exact(tmp_path, args, steps=7, every=4, cut_at=4)


def test_text_resume_mid_epoch_is_bit_identical(tmp_path):
    # 48 sentences, batch 8: 6 steps an epoch; cut at step 8, mid-epoch 1 (dropout on)
    args = ["--task", "text", "--method", "sam", "--model", str(tiny_checkpoint(tmp_path / "model")),
            "--dataset", str(tiny_dataset(tmp_path / "data")), "--max_length", "32", "--batch_size", "8",
            "--textattack_recipes", "none", "--max_eval_samples", "8", "--eval_steps", "1",
            "--sharpness_examples", "0", "--divergence_guard", "false", "--seed", "2"]
    _resume_is_exact(tmp_path, args, steps=10, every=4, cut_at=8)
