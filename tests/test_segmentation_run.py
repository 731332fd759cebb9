"""scripts/run.py --task segmentation end to end on the embedded Fashion-MNIST canvases (tiny U-Net, a few
steps), and one-line errors for bad segmentation input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samat.common import offline
from samat.segmentation import canvas, models
from segmentation_helpers import shapes

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "smoke", "--encoder_depth", "3", "--decoder_channels", "16", "8", "8", "--batch_size", "8",
        "--eval_batch_size", "16", "--max_eval_samples", "16", "--eval_l2", "none", "--eval_steps", "2",
        "--log_with", "none"]


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # One thread: the tiny model gains nothing from more on a shared CPU.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "SAMAT_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run.py"), "--task", "segmentation", *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


@pytest.mark.skipif(not (offline.fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_sam_on_the_embedded_default_end_to_end(tmp_path):
    out = tmp_path / "sam"
    proc = run(tmp_path, "--method", "sam", "--max_steps", "3", "--output_dir", str(out), "--canvas_size", "48",
               "--canvas_train_size", "24", "--canvas_test_size", "16", "--eval_linf", "8/255",
               "--segpgd_linf", "2/255", "8/255", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "segmentation" and results["headline_metric"] == "miou"
    assert results["cost"]["optimizer_steps"] == 3 and results["cost"]["forward_passes"] == 6  # SAM: 2 per step
    assert results["data"]["dataset"].startswith("fashion-canvas") and results["data"]["num_classes"] == 11
    assert results["data"]["image_size"] == 48 and results["data"]["class_names"][1] == "T-shirt/top"
    clean = results["metrics"]["clean"]
    assert 0 <= clean["miou"] <= 1 and 0 <= clean["pixel_accuracy"] <= 1 and "iou/background" in clean
    robust = results["metrics"]["robust"]
    # (the evaluation's worst-of-both entry, pgd-suite-linf, may sit beside them)
    assert {"pgd-linf", "segpgd-linf"} <= set(robust) and set(robust["segpgd-linf"]) == {"2/255", "8/255"}
    assert robust["segpgd-linf"]["8/255"]["miou"] <= clean["miou"] + 1e-6
    assert results["sanity"]["passed"], results["sanity"]
    model = models.load_model(str(out / "model"))
    assert model.config["class_names"][0] == "background" and model.config["arch"] == "unet"
    assert re.search(r"\| segpgd-linf\s+\| 8/255", proc.stdout), proc.stdout[-2000:]
    seg = results["metrics"]["segmentation"]  # the majority baseline, its flag and the picture
    assert 0 < seg["majority_baseline"]["miou"] < 1 and seg["majority_baseline"]["class"] == "background"
    assert seg["figure"] == "segmentations.png" and (out / "segmentations.png").stat().st_size > 10000
    assert results["data"]["preset"] == "smoke"
    assert seg["near_majority_baseline"] == any("majority" in w or "predicting" in w for w in results["warnings"])


def test_bad_segmentation_input_is_one_line_exit_2(tmp_path):
    import datasets

    images, masks = shapes(4, 32)
    masks[1, 0, 0] = 9
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": list(images), "mask": list(np.asarray(masks))}, features=features)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "bad"))
    proc = run(tmp_path, "--dataset", str(tmp_path / "bad"), "--num_classes", "3", "--max_steps", "1",
               "--output_dir", str(tmp_path / "out"), *TINY)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: split 'train' example 1: mask values [9] are outside [0, 3)"), last
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "results.json").exists()
