"""Segmentation's own evaluation: the majority-class baseline, the collapse warning, the bootstrap interval,
the picture, and the presets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from samat.common.errors import UsageError
from samat.segmentation import evaluation, metrics
from samat.segmentation.task import PRESETS, SegmentationArgs, SegmentationTask
from segmentation_helpers import one_thread, save_shapes, tiny_task  # noqa: F401 (fixture)


def test_majority_baseline_by_hand():
    # 2x3 mask, classes {0, 1, 2}, 255 ignored: four 0s, one 1, no 2.
    labels = torch.tensor([[[0, 0, 0], [0, 1, 255]]])
    histogram = evaluation.label_histogram(labels, 3, 255)
    assert histogram.tolist() == [4.0, 1.0, 0.0]
    baseline = evaluation.majority_baseline(histogram, ["bg", "a", "b"])
    # Predict 0 everywhere: IoU_bg = 4 / (4 + 1) = 0.8, IoU_a = 0, class b absent from labels and predictions.
    assert baseline["class"] == "bg"
    assert baseline["miou"] == pytest.approx((0.8 + 0.0) / 2)
    assert baseline["pixel_accuracy"] == pytest.approx(0.8)
    # The same through the real metric on an all-background prediction.
    counts = metrics.confusion_counts(torch.zeros_like(labels), labels, 3, 255).sum(dim=0)
    assert metrics.segmentation_metrics(counts)["miou"] == pytest.approx(baseline["miou"])


def test_collapse_warning_margin():
    baseline = {"class": "background", "miou": 0.07, "pixel_accuracy": 0.8}
    assert "background" in evaluation.collapse_warning(0.108, baseline)  # the failed default run
    assert evaluation.collapse_warning(0.5, baseline) is None


def test_bootstrap_interval_holds_the_estimate():
    torch.manual_seed(0)
    per_image = torch.randint(0, 50, (40, 3, 3)).double()
    low, high = evaluation.bootstrap_miou(per_image, resamples=300)
    point = metrics.segmentation_metrics(per_image.sum(dim=0))["miou"]
    assert low <= point <= high and high - low > 0
    same = per_image[:1].repeat(40, 1, 1)  # identical images: no spread
    low, high = evaluation.bootstrap_miou(same, resamples=100)
    assert high - low == pytest.approx(0.0, abs=1e-12)


def test_seeded_subset_is_deterministic_sorted_and_whole_when_asked():
    from samat.common.data import seeded_subset

    class Rows(list):
        def select(self, indices):
            return Rows(self[i] for i in indices)

    rows = Rows(range(50))
    for n in (0, 50, 80):
        assert list(seeded_subset(rows, n, 3)) == list(range(50))
    picked = list(seeded_subset(rows, 7, 3))
    assert picked == sorted(picked) and len(set(picked)) == 7 and picked == list(seeded_subset(rows, 7, 3))
    assert picked != list(seeded_subset(rows, 7, 4))


def test_the_runs_subsets_draw_training_with_the_seed_and_evaluation_with_seed_plus_one():
    from types import SimpleNamespace

    from samat.common.data import eval_subset, seeded_subset, train_subset

    rows = list(range(50))
    run = SimpleNamespace(seed=3, max_train_samples=7, max_eval_samples=5)
    assert list(train_subset(rows, run)) == list(seeded_subset(rows, 7, 3))
    assert list(eval_subset(rows, run)) == list(seeded_subset(rows, 5, 4))
    # The evaluation draw is not the training permutation cut shorter.
    assert list(eval_subset(rows, run)) != list(seeded_subset(rows, 5, 3))


class Constant(nn.Module):
    """Logits that always pick class ``k``."""

    def __init__(self, classes: int, k: int = 0):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(classes))
        self.k = k

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.bias.numel(), *x.shape[-2:]) + self.bias[None, :, None, None]
        logits[:, self.k] += 5.0
        return logits + 0.0 * x[:, :1]  # depends on x, so the picture's attacks have a gradient


class Oracle(nn.Module):
    """The right mask for every image it was shown (matched by exact pixels), background for anything else."""

    def __init__(self, images, labels, classes: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.images, self.labels, self.classes = images, labels, classes

    def forward(self, x):
        out = []
        for image in x:
            match = [i for i, known in enumerate(self.images) if torch.equal(known, image)]
            mask = self.labels[match[0]].clamp(max=self.classes - 1) if match else torch.zeros(x.shape[-2:]).long()
            out.append(torch.nn.functional.one_hot(mask, self.classes).permute(2, 0, 1).float() * 10)
        return torch.stack(out) + self.bias + 0.0 * x[:, :1]


def _run(tmp_path):
    return SimpleNamespace(max_eval_samples=0, seed=0, eval_batch_size=8, output_dir=str(tmp_path), method="erm")


def test_warning_fires_for_background_only_and_not_for_a_right_model(tmp_path, one_thread):
    task, built = tiny_task(save_shapes(tmp_path / "data", n_train=8, n_test=8))
    out = task.extra_evaluation(Constant(3), None, _run(tmp_path))
    seg = out["segmentation"]
    assert seg["near_majority_baseline"] and len(out["warnings"]) == 1
    assert out["warnings"][0].startswith("segmentation: clean mIoU") and "predicting '0'" in out["warnings"][0]
    assert out["segmentation"]["figure"] == evaluation.FIGURE_FILE
    assert seg["clean_miou"] == pytest.approx(seg["majority_baseline"]["miou"])
    columns = task.extra_columns({"clean": {"miou": seg["clean_miou"], "iou/0": 0.9}, **out})
    assert columns["segmentation/near_majority_baseline"] == 1.0 and "segmentation/iou/0" in columns

    items = [built.eval_dataset[i] for i in range(len(built.eval_dataset))]
    oracle = Oracle([it["pixel_values"] for it in items], [it["labels"] for it in items], 3)
    out = task.extra_evaluation(oracle, None, _run(tmp_path))
    assert "warnings" not in out and not out["segmentation"]["near_majority_baseline"]
    assert out["segmentation"]["clean_miou"] == pytest.approx(1.0)
    low, high = out["segmentation"]["clean_miou_ci95"]
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)


def test_picture_is_written(tmp_path, one_thread):
    from PIL import Image

    task, built = tiny_task(save_shapes(tmp_path / "data", n_train=8, n_test=8))
    out = task.extra_evaluation(built.model, None, _run(tmp_path))
    assert out["segmentation"]["figure"] == evaluation.FIGURE_FILE
    path = tmp_path / evaluation.FIGURE_FILE
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300


def test_presets_fill_unset_flags_only():
    args = SegmentationArgs(preset="smoke", encoder_depth=4)
    task = SegmentationTask(args)
    assert task.defaults is PRESETS["smoke"].defaults
    assert args.encoder_depth == 4 and args.canvas_size == PRESETS["smoke"].canvas_size
    assert PRESETS["smoke"].decoder_for("unet", 4) is None  # not the preset's depth: smp's widths
    assert PRESETS["default"].decoder_for("unet", 4) == list(PRESETS["default"].decoder_channels)
    assert "SMOKE" in PRESETS["smoke"].summary
    with pytest.raises(UsageError, match="--preset: unknown preset 'fast'; choose one of: default, smoke"):
        SegmentationTask(SegmentationArgs(preset="fast"))
