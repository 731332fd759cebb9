"""Segmentation metrics, loss and SegPGD objective against hand computations (no model, milliseconds)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from samat.segmentation.metrics import confusion_counts, segmentation_metrics
from samat.segmentation.task import SegmentationArgs, SegmentationTask, segpgd_objective

IGNORE = 255

# Two 2x3 images, classes 0..3; class 3 appears in neither labels nor predictions; one ignored pixel each,
# predicted 0 and 2, which must count nowhere.
TARGET = torch.tensor([[[0, 0, 1], [1, 2, IGNORE]],
                       [[2, 2, 0], [IGNORE, 1, 0]]])
PRED = torch.tensor([[[0, 1, 1], [1, 2, 0]],
                     [[2, 0, 0], [2, 1, 1]]])
# By hand over the 10 labelled pixels (label -> prediction): 0->0 x2, 0->1 x2, 1->1 x3, 2->2 x2, 2->0 x1.
#   class 0: tp 2, fp 1 (the 2->0), fn 2 (the 0->1s)   IoU 2/5
#   class 1: tp 3, fp 2 (the 0->1s), fn 0              IoU 3/5
#   class 2: tp 2, fp 0, fn 1                          IoU 2/3
#   class 3: 0/0, left out of the mean
HAND_COUNTS = torch.tensor([[2, 1, 2], [3, 2, 0], [2, 0, 1], [0, 0, 0]], dtype=torch.float32)


def test_counts_and_miou_match_hand_computation():
    per_image = confusion_counts(PRED, TARGET, num_classes=4, ignore_index=IGNORE)
    assert per_image.shape == (2, 4, 3) and per_image.dtype == torch.float32
    # Image 1 alone: class 0 tp 1 fn 1 and no fp (its ignored pixel is predicted 0), class 1 tp 2 fp 1.
    assert per_image[0].tolist() == [[1, 0, 1], [2, 1, 0], [1, 0, 0], [0, 0, 0]]
    assert torch.equal(per_image.sum(0), HAND_COUNTS)
    metrics = segmentation_metrics(per_image.sum(0), ["bg", "square", "disc", "never"])
    assert metrics["miou"] == pytest.approx((2 / 5 + 3 / 5 + 2 / 3) / 3)  # 5/9, not 5/12 with class 3 as 0
    assert metrics["pixel_accuracy"] == pytest.approx(7 / 10)
    assert metrics["iou/bg"] == pytest.approx(0.4) and metrics["iou/disc"] == pytest.approx(2 / 3)
    assert "iou/never" not in metrics


def test_class_only_predicted_counts_as_zero():
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    pred = torch.tensor([[[0, 0], [0, 1]]])
    metrics = segmentation_metrics(confusion_counts(pred, target, 3, IGNORE).sum(0))
    # class 0: 3/4; class 1 is predicted but never labelled: present, IoU 0; class 2 absent: excluded.
    assert metrics["miou"] == pytest.approx((3 / 4 + 0) / 2)
    assert metrics["iou/1"] == 0.0 and "iou/2" not in metrics


def test_counts_agree_with_smp_and_add_up_over_batches():
    import segmentation_models_pytorch as smp

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (6, 7, 9), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = IGNORE
    pred = torch.randint(0, 5, (6, 7, 9), generator=g)
    ours = confusion_counts(pred, target, 5, IGNORE)
    tp, fp, fn, _ = smp.metrics.get_stats(pred, target, mode="multiclass", num_classes=5, ignore_index=IGNORE)
    assert torch.equal(ours, torch.stack([tp, fp, fn], dim=-1).float())
    halves = confusion_counts(pred[:2], target[:2], 5, IGNORE).sum(0) + \
        confusion_counts(pred[2:], target[2:], 5, IGNORE).sum(0)
    assert torch.equal(halves, ours.sum(0))


def test_task_stats_loss_and_empty_set():
    task = SegmentationTask(SegmentationArgs())
    task.num_classes, task.class_names = 4, ["a", "b", "c", "d"]
    logits = F.one_hot(PRED, 4).permute(0, 3, 1, 2).float() * 5
    batch = {"labels": TARGET}
    assert torch.equal(task.example_stats(logits, batch).sum(0), HAND_COUNTS)
    expected = F.cross_entropy(logits, TARGET, ignore_index=IGNORE)
    assert task.loss(logits, batch).item() == pytest.approx(expected.item())
    all_ignored = {"labels": torch.full_like(TARGET, IGNORE)}
    assert task.loss(logits, all_ignored).item() == 0.0  # not NaN
    empty = task.compute_metrics(torch.zeros(4, 3))
    assert math.isnan(empty["miou"]) and math.isnan(empty["pixel_accuracy"])


def test_segpgd_weights_correct_and_wrong_pixels():
    # One image, 3 pixels, 2 classes: pixel 0 correct, pixel 1 wrong, pixel 2 ignored.
    logits = torch.tensor([[[[2.0, -1.0, 3.0]], [[0.0, 1.0, 0.0]]]])  # (1, 2, 1, 3)
    labels = torch.tensor([[[0, 0, IGNORE]]])
    ce = F.cross_entropy(logits, labels.clamp(max=1), reduction="none")[0, 0]
    objective = segpgd_objective(IGNORE)
    steps = 10
    for step in (0, 5, 9):
        lam = step / (2 * steps)
        expected = ((1 - lam) * ce[0] + lam * ce[1]) / 3
        got = objective(logits, {"labels": labels}, step, steps)
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_miou_and_pixel_accuracy_equal_torchmetrics():
    """Oracle: torchmetrics' per-class Jaccard index (IoU) over the classes present in prediction or target,
    and its micro accuracy over labelled pixels, on random maps with an ignore index."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_jaccard_index

    g = torch.Generator().manual_seed(3)
    classes, ignore = 5, 255
    target = torch.randint(0, classes - 1, (6, 12, 12), generator=g)  # class 4 never in the target
    target[:, :2] = ignore
    pred = torch.randint(0, classes, (6, 12, 12), generator=g)
    pred[pred == 3] = 2  # class 3 only in the target
    counts = confusion_counts(pred, target, classes, ignore).sum(dim=0)
    ours = segmentation_metrics(counts)
    per_class = multiclass_jaccard_index(pred, target, num_classes=classes, average="none", ignore_index=ignore)
    valid = target != ignore
    present = torch.zeros(classes, dtype=torch.bool)
    present[pred[valid].unique()] = True
    present[target[valid].unique()] = True
    assert ours["miou"] == pytest.approx(float(per_class[present].mean()), abs=1e-6)
    accuracy = multiclass_accuracy(pred, target, num_classes=classes, average="micro", ignore_index=ignore)
    assert ours["pixel_accuracy"] == pytest.approx(float(accuracy), abs=1e-6)
