"""Dataset-level segmentation metrics from summed per-example true/false positive/negative pixel counts.

Per example and class ``c``: ``tp`` = pixels predicted ``c`` whose label is ``c``; ``fp`` = predicted ``c``,
labelled another class; ``fn`` = labelled ``c``, predicted another class. Pixels labelled ``ignore_index``
count nowhere. These counts add up over examples and processes, so the engine sums them (after
``gather_for_metrics``) and the metrics are exact for any batching or number of processes:

    IoU_c = tp_c / (tp_c + fp_c + fn_c)          pixel accuracy = sum_c tp_c / sum_c (tp_c + fn_c)
    mIoU  = mean of IoU_c over the classes present in the labels or the predictions of the whole set

A class absent from both the labels and the predictions has 0 / 0: it is left out of the mean, not scored
0 (smp's ``iou_score(reduction="macro")`` scores it 0, which is why the reduction is done here). The counts
are the same as ``smp.metrics.get_stats(..., mode="multiclass", ignore_index=...)`` (the tests check it);
they are computed with one ``bincount`` on the logits' device instead of smp's per-image CPU loop.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

TP, FP, FN = 0, 1, 2


def confusion_counts(pred: Tensor, target: Tensor, num_classes: int, ignore_index: Optional[int]) -> Tensor:
    """Per-example counts ``(B, C, 3)`` float (``[..., 0]`` tp, ``1`` fp, ``2`` fn).

    Args:
        pred: predicted classes ``(B, H, W)`` int in ``[0, C)``.
        target: labels ``(B, H, W)`` int in ``[0, C)`` or ``ignore_index``.
    """
    batch = pred.shape[0]
    pred, target = pred.reshape(batch, -1).long(), target.reshape(batch, -1).long()
    valid = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        valid &= target != ignore_index
    example = torch.arange(batch, device=pred.device)[:, None].expand_as(pred)
    # One bincount over (example, label, prediction) triples gives every example's confusion matrix.
    flat = (example * num_classes + target.clamp(0, num_classes - 1)) * num_classes + pred
    confusion = torch.bincount(flat[valid], minlength=batch * num_classes * num_classes)
    confusion = confusion.view(batch, num_classes, num_classes).float()  # [b, label, prediction]
    tp = confusion.diagonal(dim1=1, dim2=2)
    fp = confusion.sum(dim=1) - tp
    fn = confusion.sum(dim=2) - tp
    return torch.stack([tp, fp, fn], dim=-1)


def metric_key(name: str) -> str:
    """A per-class metric key: ``iou/<name>`` with ``/`` and spaces made safe for trackers."""
    return "iou/" + name.replace("/", "-").replace(" ", "_")


def segmentation_metrics(counts: Tensor, class_names: Optional[Sequence[str]] = None) -> dict[str, float]:
    """``miou``, ``pixel_accuracy`` and ``iou/<class>`` (present classes only) from summed ``(C, 3)`` counts.

    With no class present at all (an empty set), ``miou`` and ``pixel_accuracy`` are ``nan``.
    """
    counts = counts.double()
    if counts.dim() == 3:  # tolerate unsummed per-example counts
        counts = counts.sum(dim=0)
    tp, fp, fn = counts[:, TP], counts[:, FP], counts[:, FN]
    union = tp + fp + fn
    present = union > 0
    iou = tp / union.clamp_min(1)
    labelled = (tp + fn).sum()
    out = {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / labelled) if labelled > 0 else float("nan"),
    }
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    for index in present.nonzero().flatten().tolist():
        out[metric_key(names[index])] = float(iou[index])
    return out
