"""Augmentation depends on (seed, epoch, index) only, never on the global RNG (exact resume needs it)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from samat.common.errors import UsageError
from samat.segmentation.data import SegmentationDataset
from samat.vision.data import ImageClassification


def _images(n=4, size=16):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, size, size), dtype=np.uint8)


def _vision():
    features = datasets.Features({"image": datasets.Array2D((16, 16), "uint8"), "label": datasets.Value("int64")})
    data = datasets.Dataset.from_dict({"image": _images(), "label": [0, 1, 0, 1]}, features=features)
    return ImageClassification(data.with_format("numpy"), "image", "label", channels=1, size=None, augment=True,
                               seed=5)


def _segmentation():
    images = _images()
    features = datasets.Features({"image": datasets.Array3D((16, 16, 3), "uint8"),
                                  "mask": datasets.Array2D((16, 16), "uint8")})
    data = datasets.Dataset.from_dict({"image": np.repeat(images[..., None], 3, -1),
                                       "mask": (images > 128).astype(np.uint8)}, features=features)
    return SegmentationDataset(data.with_format("numpy"), "image", "mask", num_classes=2, ignore_index=255,
                               size=16, train=True, scale=(0.5, 1.5), hflip=True, seed=5)


def test_same_seed_epoch_index_same_example_whatever_the_global_rng():
    for make in (_vision, _segmentation):
        dataset = make()
        torch.manual_seed(0)
        first = [dataset[i]["pixel_values"] for i in range(4)]
        torch.manual_seed(123)
        torch.rand(1000)
        again = [dataset[i]["pixel_values"] for i in range(4)]
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        dataset.set_epoch(1)
        changed = [dataset[i]["pixel_values"] for i in range(4)]
        assert any(not torch.equal(a, b) for a, b in zip(first, changed))


def test_decoded_once_batches_are_the_items_read_one_by_one():
    g = torch.Generator().manual_seed(0)
    features = datasets.Features({"image": datasets.Array2D((8, 8), "uint8"), "label": datasets.Value("int64")})
    data = datasets.Dataset.from_dict({"image": torch.randint(0, 256, (20, 8, 8), generator=g).numpy(),
                                       "label": list(range(20))}, features=features)
    batched, single = (ImageClassification(data, "image", "label", 3, 12, augment=True, seed=4) for _ in "ab")
    single._cache = None  # the per-item Arrow path
    for ds in (batched, single):
        ds.set_epoch(1)
    rows = [7, 3, 19, 3]
    got = batched.__getitems__(rows)
    assert batched._cache is not None and batched._cache[0].shape == (20, 3, 12, 12)
    for item, i in zip(got, rows):
        want = single[i]
        assert torch.equal(item["pixel_values"], want["pixel_values"]) and item["labels"] == want["labels"] == i


def test_segmentation_decoded_once_batches_are_the_examples_read_one_by_one():
    """Decoded once (uint8 images from PNG, resized float images, masks with the ignore index) or read one
    by one, with random scale, crop and flip: the very same pixels; a bad example still fails only when read."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 20, 20, 3), dtype=torch.uint8, generator=g).numpy()
    masks = torch.randint(0, 3, (12, 20, 20), dtype=torch.uint8, generator=g).numpy()
    masks[:, 0, 0] = 255
    masks[9, 5, 5] = 7  # out of range: example 9 is bad
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    data = datasets.Dataset.from_dict({"image": list(images), "mask": list(masks)}, features=features)
    for size, stored in ((20, torch.uint8), (16, torch.float32)):  # as stored; resized (no longer bytes)
        batched, single = (SegmentationDataset(data, "image", "mask", num_classes=3, ignore_index=255, size=size,
                                               train=True, scale=(0.5, 1.5), hflip=True, seed=3) for _ in "ab")
        single._cache = None  # the per-example path
        for ds in (batched, single):
            ds.set_epoch(2)
        rows = [11, 0, 4, 4, 7]
        got = batched.__getitems__(rows)
        assert batched._cache[0].dtype == stored and batched._cache[1].dtype == torch.uint8
        for item, i in zip(got, rows):
            want = single[i]
            assert torch.equal(item["pixel_values"], want["pixel_values"])
            assert torch.equal(item["labels"], want["labels"]) and item["labels"].dtype == torch.long
        for ds in (batched, single):
            with pytest.raises(UsageError, match=r"example 9: mask values \[7\]"):
                ds.__getitems__([1, 9])
        subset = batched.select([9, 3])
        assert torch.equal(subset[1]["labels"], single.select([9, 3])[1]["labels"])


def test_batch_crop_flip_is_the_per_image_crop_flip():
    from samat.common.data import example_generator
    from samat.vision.data import batch_crop_flip, random_crop_flip

    x = torch.rand(24, 3, 10, 17, generator=torch.Generator().manual_seed(1))  # not square: H and W differ
    got = batch_crop_flip(x, [example_generator(2, 1, i) for i in range(24)])
    want = torch.stack([random_crop_flip(x[i], example_generator(2, 1, i)) for i in range(24)])
    assert got.shape == x.shape and torch.equal(got, want)
    assert not torch.equal(got, x)  # something moved
