"""Segmentation data: the embedded Fashion-MNIST canvases, loading, validation errors, joint augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from samat.common.config import RunArgs
from samat.common import offline
from samat.common.errors import UsageError
from samat.segmentation import canvas, data
from samat.segmentation.task import SegmentationArgs, SegmentationTask
from segmentation_helpers import TINY_MODEL, one_thread, save_shapes, shapes, tiny_task  # noqa: F401 (fixture)

needs_fashion_mnist = pytest.mark.skipif(
    not (offline.fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed")

pytestmark = pytest.mark.usefixtures("one_thread")


@needs_fashion_mnist
def test_embedded_default_builds_deterministically(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMAT_CACHE", str(tmp_path / "cache"))
    folder = canvas.build_fashion_canvas(size=48, train_size=12, test_size=6, seed=3)
    assert folder.parent == tmp_path / "cache"
    id2label = json.loads((folder / canvas.ID2LABEL_FILE).read_text())
    assert id2label["0"] == "background" and id2label["10"] == "Ankle boot" and len(id2label) == 11

    # Through the same path as any dataset: --dataset unset means the embedded default.
    splits = data.load_splits(None, None, "train", None, None, None, canvas_size=48, canvas_train_size=12,
                              canvas_test_size=6, canvas_seed=3)
    assert (len(splits.train), len(splits.eval), splits.eval_split) == (12, 6, "test")
    assert (splits.image_column, splits.mask_column) == ("image", "mask")
    masks = np.stack([np.asarray(m) for m in splits.train["mask"]])
    images = np.stack([np.asarray(im) for im in splits.train["image"]])
    assert images.shape == (12, 48, 48, 3) and masks.shape == (12, 48, 48)
    assert masks.max() <= 10 and (masks > 0).mean() > 0.05  # items cover part of each canvas
    assert all((m > 0).any() for m in masks)  # every canvas has at least one visible item

    # Same seed, another folder: the same pixels; another seed: different canvases.
    again = canvas.build_fashion_canvas(48, 12, 6, seed=3, folder=tmp_path / "again")
    other = canvas.build_fashion_canvas(48, 12, 6, seed=4, folder=tmp_path / "other")
    import datasets

    def arrays(path):
        d = datasets.load_from_disk(str(path))["test"]
        return np.stack([np.asarray(im) for im in d["image"]]), np.stack([np.asarray(m) for m in d["mask"]])

    first, second, third = arrays(folder), arrays(again), arrays(other)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not np.array_equal(first[1], third[1])


def test_render_labels_items_where_they_are_visible():
    # A fake item pool: solid squares of value 255 (label 4) so every item pixel is foreground.
    items = np.full((3, 28, 28), 255, np.uint8)
    labels = np.full(3, 4)
    canvases, masks = canvas.render_canvases(items, labels, 1, 40, np.random.default_rng(0))
    assert set(np.unique(masks)) <= {0, 5}
    # Item pixels take the item's tint (>= 0.45 * 255) in every channel; the background stays below 0.5 + noise.
    assert (canvases[0][masks[0] == 5] >= 0.45 * 255 - 1).all()


def test_bad_masks_and_columns_are_one_line_errors(tmp_path):
    import datasets

    images, masks = shapes(4, 32)
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})

    def save(name, imgs, msks, features=features):
        ds = datasets.Dataset.from_dict({"image": list(imgs), "mask": list(msks)}, features=features)
        datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / name))
        return tmp_path / name

    def build(folder, **kw):
        task = SegmentationTask(SegmentationArgs(**{**TINY_MODEL, **kw}))
        return task.build(RunArgs(task="segmentation", dataset=str(folder)), None)

    bad_values = masks.copy()
    bad_values[2, 0, 0] = 7
    folder = save("values", images, bad_values)
    with pytest.raises(UsageError, match=r"example 2: mask values \[7\] are outside \[0, 3\)"):
        build(folder, num_classes=3)
    # Without --num_classes the 7 makes 8 classes: no error, the data decides.
    assert build(folder).info["num_classes"] == 8

    small = [np.asarray(m)[:, :30] for m in masks]
    ragged = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    with pytest.raises(UsageError, match="image is 32x32 but its mask is 30x32"):
        build(save("sizes", images, small, ragged))

    with pytest.raises(UsageError, match="RGB colour image"):
        build(save("rgb", images, list(images)))

    with pytest.raises(UsageError, match="--ignore_index 1 is a class index"):
        build(save("ok", images, masks), ignore_index=1)
    with pytest.raises(UsageError, match=r"--image_column: no column 'photo'; the dataset has: image, mask"):
        build(tmp_path / "ok", image_column="photo")
    with pytest.raises(UsageError, match="--eval_split: split 'val' not in the dataset; choose one of: train, test"):
        SegmentationTask(SegmentationArgs(**TINY_MODEL)).build(
            RunArgs(task="segmentation", dataset=str(tmp_path / "ok"), eval_split="val"), None)
    with pytest.raises(UsageError, match="could not load it from the Hugging Face hub"):
        build("no-such-user/no-such-dataset")


def test_validation_catches_bad_examples_beyond_the_checked_prefix(tmp_path):
    images, masks = shapes(6, 32)
    masks[5, 3, 3] = 200
    import datasets

    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": list(images), "mask": list(masks)}, features=features)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "d"))
    _, built = tiny_task(tmp_path / "d", num_classes=3, check_samples=2)
    built.train_dataset[4]
    with pytest.raises(UsageError, match=r"split 'train' example 5: mask values \[200\]"):
        built.train_dataset[5]


def test_joint_augmentation_keeps_image_and_mask_aligned():
    # 8x8 blocks whose red level encodes their label, so alignment can be read back off the image.
    labels = torch.arange(16).view(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1) % 5
    image = torch.stack([labels / 4.0, torch.zeros(32, 32), torch.ones(32, 32)])
    torch.manual_seed(0)
    for _ in range(20):
        img, mask = data.random_scale_crop_flip(image, labels, 32, (0.6, 1.5), True, 255)
        assert img.shape == (3, 32, 32) and mask.shape == (32, 32)
        valid = mask != 255
        padded = ~valid
        assert (img[:, padded] == 0).all()  # padding: black pixels, ignored labels
        decoded = torch.round(img[0] * 4).long()
        agree = (decoded[valid] == mask[valid]).float().mean()
        # Only block edges blur under bilinear resizing; a flip or crop applied to one of the two would
        # misalign whole blocks.
        assert agree > 0.85, agree


def test_eval_transform_resizes_and_reduce_labels(tmp_path):
    save_shapes(tmp_path / "d", n_train=4, n_test=4, size=40)
    _, built = tiny_task(tmp_path / "d", image_size=32)
    item = built.eval_dataset[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["labels"].shape == (32, 32)
    assert 0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    assert set(item["labels"].unique().tolist()) <= {0, 1, 2}
    assert built.info["image_size"] == 32 and built.info["num_classes"] == 3
    reduced = data.reduce_labels(torch.tensor([0, 1, 2, 255]), 255)
    assert reduced.tolist() == [255, 0, 1, 255]
    subset = built.train_dataset.select([1, 2])
    assert len(subset) == 2 and subset.train and torch.equal(subset.load(0)[1], built.train_dataset.load(1)[1])
