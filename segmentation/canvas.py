"""The embedded offline dataset: Fashion-MNIST items placed on colour canvases ("fashion-canvas").

No real semantic-segmentation set can be installed on machines that only reach package registries, so the
default is derived from real images: each canvas holds 1-4 Fashion-MNIST items (real 28×28 photographs of
clothing, Xiao et al. 2017), each rescaled to 20-36 px, tinted with a random colour and alpha-composited at a
random position onto a smooth random-colour background with a little Gaussian noise. Later items occlude
earlier ones. A pixel is labelled with its visible item's class (1-10) where that item's grey level is at
least ``FOREGROUND_LEVEL``, and background (0) elsewhere, so the task is to find the items *and* tell e.g.
a shirt from a pullover by shape and texture alone (colours are random, so they carry no class information).

Train canvases are built only from Fashion-MNIST's 60,000 training items and test canvases only from its
10,000 test items, each item used at most once, so no item is shared between splits. Everything is drawn
from ``numpy.random.default_rng(seed)``: the same seed gives the same pixels on every machine.

The result is a ``datasets.DatasetDict`` with ``image`` (RGB) and ``mask`` (L, class indices) columns and an
``id2label.json`` beside it, cached with ``save_to_disk`` and then loaded like any local or hub dataset.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from samat.common.errors import UsageError
from samat.common.files import building_dir
from samat.common.offline import FASHION_MNIST_CLASSES, cache_dir, fashion_mnist_arrays

logger = logging.getLogger(__name__)

NAME = "fashion-canvas"
VERSION = 1  # bump when the generator changes: it is part of the cache key
FASHION_CLASSES = FASHION_MNIST_CLASSES
CLASS_NAMES = ("background", *FASHION_CLASSES)
FOREGROUND_LEVEL = 0.2    # grey level (of 1) from which an item pixel is labelled as the item
ITEMS_PER_CANVAS = (1, 4)  # inclusive
ITEM_SIDE = (20, 36)       # px, inclusive; Fashion-MNIST items are 28 px
MIN_CANVAS = ITEM_SIDE[1]
ID2LABEL_FILE = "id2label.json"


def _resize_item(item: np.ndarray, side: int) -> np.ndarray:
    """Bilinear resize of a uint8 ``(28, 28)`` item to ``(side, side)`` float in ``[0, 1]``."""
    from PIL import Image

    resized = Image.fromarray(item).resize((side, side), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


def render_canvases(images: np.ndarray, labels: np.ndarray, count: int, size: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` canvases from the item pool ``images``/``labels``, each item used at most once.

    Returns uint8 RGB canvases ``(count, size, size, 3)`` and uint8 masks ``(count, size, size)`` with
    0 = background and ``1 + fashion_label`` for an item.
    """
    order = rng.permutation(len(images))
    canvases = np.empty((count, size, size, 3), np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    used = 0
    for i in range(count):
        # Background: a linear gradient between two dark-to-mid colours along a random direction, plus noise.
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        c0, c1 = rng.uniform(0.0, 0.5, 3), rng.uniform(0.0, 0.5, 3)
        canvas = c0 * (1 - t[..., None]) + c1 * t[..., None]
        canvas = canvas + rng.normal(0.0, 0.03, canvas.shape)
        mask = masks[i]
        for _ in range(rng.integers(ITEMS_PER_CANVAS[0], ITEMS_PER_CANVAS[1] + 1)):
            if used == len(order):
                raise ValueError(f"{count} canvases need more than the {len(images)} items available")
            index = order[used]
            used += 1
            side = int(rng.integers(ITEM_SIDE[0], ITEM_SIDE[1] + 1))
            alpha = _resize_item(images[index], side)[..., None]  # (side, side, 1) in [0, 1]
            top, left = rng.integers(0, size - side + 1, 2)
            tint = rng.uniform(0.45, 1.0, 3)
            region = canvas[top:top + side, left:left + side]
            # Alpha compositing keeps the item's real texture (its grey levels) inside a random colour.
            canvas[top:top + side, left:left + side] = region * (1 - alpha) + tint * alpha
            mask[top:top + side, left:left + side][alpha[..., 0] >= FOREGROUND_LEVEL] = labels[index] + 1
        canvases[i] = np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)
    return canvases, masks


def cache_path(size: int, train_size: int, test_size: int, seed: int) -> Path:
    return cache_dir() / f"{NAME}-v{VERSION}-{size}px-{train_size}-{test_size}-s{seed}"


def build_fashion_canvas(size: int = 64, train_size: int = 10000, test_size: int = 2000, seed: int = 0,
                         folder: Optional[Path] = None) -> Path:
    """Build (once) and cache the embedded dataset; returns its ``save_to_disk`` folder.

    ``folder`` defaults to :func:`cache_path`. The folder is written to a temporary name and renamed, so a
    crashed build never leaves a half-written cache behind.
    """
    import datasets

    if size < MIN_CANVAS:
        raise UsageError(f"--canvas_size: {size} is too small; items are up to {MIN_CANVAS} px, use >= "
                         f"{MIN_CANVAS}")
    if train_size < 1 or test_size < 1:
        raise UsageError("--canvas_train_size and --canvas_test_size must be >= 1")
    folder = Path(folder) if folder is not None else cache_path(size, train_size, test_size, seed)
    if (folder / ID2LABEL_FILE).is_file():
        return folder
    logger.info("building %s (%d train + %d test canvases of %d px, seed %d) in %s", NAME, train_size,
                test_size, size, seed, folder)
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    splits = {}
    # One child seed per split: the test canvases do not change when --canvas_train_size does.
    for (split, count), split_seed in zip((("train", train_size), ("test", test_size)),
                                          np.random.SeedSequence(seed).spawn(2)):
        images, labels = fashion_mnist_arrays(split)
        canvases, masks = render_canvases(images, labels, count, size, np.random.default_rng(split_seed))
        info = datasets.DatasetInfo(description=__doc__.strip().splitlines()[0], features=features)
        splits[split] = datasets.Dataset.from_dict(
            {"image": list(canvases), "mask": list(masks)}, features=features, info=info)
    with building_dir(folder) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        (tmp / ID2LABEL_FILE).write_text(json.dumps({str(i): n for i, n in enumerate(CLASS_NAMES)}, indent=1))
    return folder
