"""What a segmentation run adds to the engine's evaluation: the predict-the-majority-class baseline and a
collapse warning against it, a bootstrap interval for the clean mIoU, and a picture of a few segmentations.

A model that predicts background everywhere scores a pixel accuracy equal to the background's share and an
mIoU of about ``share / number of classes``; attacks cannot lower it much, because there is nothing to
destroy. The baseline makes such a run visible: it is computed from the evaluation masks alone (every pixel
predicted as the class with the most labelled pixels), and a model whose mIoU is within
:data:`COLLAPSE_MARGIN` of it gets a warning in ``results["warnings"]`` and in the run's summary line.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import metrics

COLLAPSE_MARGIN = 0.05   # mIoU points above the majority baseline below which a model has learnt ~nothing
BOOTSTRAP_RESAMPLES = 1000
FIGURE_FILE = "segmentations.png"
FIGURE_IMAGES = 4        # the first N evaluation images of the run's evaluation subset


def label_histogram(labels: Tensor, num_classes: int, ignore_index: Optional[int]) -> Tensor:
    """Labelled pixels per class, ``(C,)`` float, for labels ``(B, H, W)`` (ignored pixels not counted)."""
    flat = labels.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_classes)
    if ignore_index is not None:
        valid &= flat != ignore_index
    return torch.bincount(flat[valid], minlength=num_classes).double()


def majority_baseline(histogram: Tensor, class_names: Optional[Sequence[str]] = None) -> dict:
    """Metrics of predicting the most frequent class everywhere, from labelled pixels per class ``(C,)``.

    With ``n_c`` pixels of class ``c`` and ``N = sum_c n_c``, the majority class ``m`` gets ``tp = n_m``,
    ``fp = N - n_m``, ``fn = 0``, so ``IoU_m = n_m / N``; every other present class has ``IoU = 0``. So the
    baseline's pixel accuracy is ``n_m / N`` and its mIoU is ``n_m / N`` divided by the number of classes
    present in the labels (the same present-class rule as :func:`metrics.segmentation_metrics`).
    """
    histogram = histogram.double()
    num_classes = histogram.numel()
    majority = int(histogram.argmax())
    counts = torch.zeros(num_classes, 3, dtype=torch.float64)
    counts[:, metrics.FN] = histogram
    counts[majority, metrics.TP] = histogram[majority]
    counts[majority, metrics.FN] = 0
    counts[majority, metrics.FP] = histogram.sum() - histogram[majority]
    scored = metrics.segmentation_metrics(counts, class_names)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    return {"class": names[majority], "miou": scored["miou"], "pixel_accuracy": scored["pixel_accuracy"]}


def collapse_warning(miou: float, baseline: dict, margin: float = COLLAPSE_MARGIN) -> Optional[str]:
    """A one-line warning when ``miou`` is within ``margin`` of the majority baseline's mIoU, else None."""
    if not miou <= baseline["miou"] + margin:
        return None
    return (f"segmentation: clean mIoU {miou:.3f} is within {margin:.2f} of predicting {baseline['class']!r} "
            f"everywhere (mIoU {baseline['miou']:.3f}, pixel accuracy {baseline['pixel_accuracy']:.3f}): the "
            f"model has not learnt to segment, and its robustness numbers mean little")


def bootstrap_miou(per_image: Tensor, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the dataset mIoU over images.

    ``per_image``: ``(N, C, 3)`` tp/fp/fn counts per image (:func:`metrics.confusion_counts`). Each resample
    draws ``N`` images with replacement and recomputes the dataset mIoU from their summed counts.
    """
    generator = torch.Generator().manual_seed(seed)
    per_image = per_image.double()
    n = per_image.shape[0]
    values = []
    for start in range(0, resamples, 100):  # chunks keep the (chunk, N, C, 3) gather small
        index = torch.randint(0, n, (min(100, resamples - start), n), generator=generator)
        summed = per_image[index].sum(dim=1)  # (chunk, C, 3)
        tp, fp, fn = summed[..., metrics.TP], summed[..., metrics.FP], summed[..., metrics.FN]
        union = tp + fp + fn
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan)
        values.append(iou.nanmean(dim=1))
    values = torch.cat(values)
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=values.dtype)).tolist()
    return float(low), float(high)


# ------------------------------------------------------------------------------------------- pictures


def class_colours(num_classes: int) -> list[tuple[float, float, float]]:
    """One RGB colour in ``[0, 1]`` per class: class 0 (background) black, the rest from tab10/tab20."""
    from matplotlib import colormaps

    palette = list(colormaps["tab10"].colors) + list(colormaps["tab20b"].colors) + list(colormaps["tab20c"].colors)
    return [(0.0, 0.0, 0.0)] + [tuple(palette[(i - 1) % len(palette)])[:3] for i in range(1, num_classes)]


def _colourise(mask: Tensor, colours: list, ignore_index: Optional[int]) -> Any:
    """``(H, W)`` class indices as an ``(H, W, 3)`` float array; ignored pixels white."""
    import numpy as np

    table = np.array(colours + [(1.0, 1.0, 1.0)], dtype=np.float32)
    index = mask.cpu().numpy().astype(np.int64)
    index = np.where((index >= 0) & (index < len(colours)), index, len(colours))
    return table[index]


def draw_segmentations(path: str, images: Tensor, labels: Tensor, columns: list[tuple[str, Tensor, Tensor]],
                       class_names: Sequence[str], ignore_index: Optional[int], title: str) -> None:
    """One PNG: per row an image, its ground truth, then for each ``(name, inputs, predictions)`` column
    group the (possibly adversarial) input and the prediction on it; a class legend below.

    Args:
        images: ``(N, 3, H, W)`` in ``[0, 1]``; labels: ``(N, H, W)``.
        columns: ``(name, inputs (N, 3, H, W) in [0, 1], predictions (N, H, W))``; the clean group's inputs
            equal ``images`` and are not drawn twice.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from samat.common.files import write_bytes_atomic

    colours = class_colours(len(class_names))
    panels: list[tuple[str, Callable[[int], Any]]] = [
        ("input", lambda i: images[i].permute(1, 2, 0).cpu().numpy()),
        ("ground truth", lambda i: _colourise(labels[i], colours, ignore_index)),
    ]
    for name, inputs, preds in columns:
        if inputs is not images:
            panels.append((f"{name} input", lambda i, x=inputs: x[i].permute(1, 2, 0).cpu().numpy()))
        panels.append((f"{name} prediction", lambda i, p=preds: _colourise(p[i], colours, ignore_index)))
    rows = images.shape[0]
    fig, axes = plt.subplots(rows, len(panels), figsize=(1.6 * len(panels), 1.6 * rows + 1.1), squeeze=False)
    for r in range(rows):
        for c, (name, draw) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(draw(r).clip(0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
    handles = [Patch(facecolor=colours[i], edgecolor="grey", label=n) for i, n in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0.12 if rows < 4 else 0.08, 1, 0.95))
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
