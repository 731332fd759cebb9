"""Image-classification data through Hugging Face ``datasets``.

Any hub id (``uoft-cs/cifar10``, ``zalando-datasets/fashion_mnist``, ...) or ``save_to_disk`` folder works;
the image and label columns are found by name or feature type, or named by flags. The embedded default,
``fashion_mnist``, builds the same kind of ``DatasetDict`` (columns ``image``, ``label``) from Debian's
``dataset-fashion-mnist`` files, so it needs no network: it is the hub's Fashion-MNIST, not a special case.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from samat.common.data import example_generator
from samat.common import offline
from samat.common.errors import UsageError
from samat.common.files import building_dir

BUILTIN_DATASETS = ("fashion_mnist",)
IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")


def fashion_mnist():
    """Fashion-MNIST (60,000 train + 10,000 test, 28×28 grey) as a ``DatasetDict`` with the hub's columns
    (``image``, ``label``), built from :func:`samat.common.offline.fashion_mnist_arrays` and cached under
    ``$SAMAT_CACHE`` after the first build."""
    import datasets

    cache = offline.cache_dir() / "fashion_mnist"
    if (cache / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(cache))
    features = datasets.Features({"image": datasets.Array2D((28, 28), "uint8"),
                                  "label": datasets.ClassLabel(names=list(offline.FASHION_MNIST_CLASSES))})
    splits = {}
    for split in ("train", "test"):
        images, labels = offline.fashion_mnist_arrays(split)
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    dataset = datasets.DatasetDict(splits)
    try:
        with building_dir(cache) as tmp:
            dataset.save_to_disk(str(tmp))
    except OSError:
        pass  # a read-only home just means no cache
    return dataset


def load_dataset_dict(name: str, config: Optional[str] = None):
    """A ``DatasetDict`` from a built-in name, a ``save_to_disk`` folder or a hub id (``UsageError`` if none)."""
    import datasets

    if name == "fashion_mnist":
        return fashion_mnist()
    if Path(name).is_dir():
        loaded = datasets.load_from_disk(name)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    try:
        return datasets.load_dataset(name, config)
    except Exception as err:  # hub/network errors come in many types; this is a user-facing lookup
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        why = "the hub cannot be reached (offline)" if offline else f"{type(err).__name__}: {err}".splitlines()[0]
        raise UsageError(f"--dataset {name!r}: not a built-in ({', '.join(BUILTIN_DATASETS)}), a save_to_disk "
                         f"folder or a loadable hub dataset: {why}") from None


def to_chw_float(image: Any) -> Tensor:
    """A PIL image or array ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` -> float ``(C, H, W)`` in ``[0, 1]``."""
    if hasattr(image, "convert"):  # PIL
        mode = image.mode
        image = np.asarray(image.convert("L" if mode in ("L", "1", "I", "I;16", "F") else "RGB"))
    array = np.asarray(image)
    # A read-only array (e.g. one that datasets' arrow backend hands out) cannot back a tensor safely: copy it.
    arr = torch.as_tensor(array if array.flags.writeable else array.copy())
    if arr.dim() == 2:
        arr = arr[None]
    elif arr.dim() == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3, 4):
        arr = arr.permute(2, 0, 1)
    if arr.shape[0] == 4:
        arr = arr[:3]  # drop alpha
    if arr.dtype == torch.uint8:
        return arr.float() / 255.0
    arr = arr.float()
    return arr / 255.0 if arr.max() > 1.0 else arr


def match_channels(x: Tensor, channels: int) -> Tensor:
    """Grey -> RGB by repetition, RGB -> grey by the ITU-R 601 luma weights."""
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 1:
        return x.expand(channels, -1, -1).contiguous()
    if channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        return (x[:3] * weights).sum(0, keepdim=True)
    raise UsageError(f"cannot map {x.shape[0]}-channel images to a {channels}-channel model")


# Datasets whose prepared images take at most this many bytes are decoded once, into one tensor (Fashion-MNIST's
# 60,000 images: 188 MB); larger ones are read item by item.
DECODE_ONCE_BYTES = 1 << 30


class ImageClassification(torch.utils.data.Dataset):
    """Items ``{"pixel_values": (C, S, S) float in [0, 1], "labels": int64}`` from a ``datasets.Dataset``.

    Augmentation (``augment``): random crop with 4-pixel zero padding (1/8 of the side for larger images)
    and horizontal flip, seeded per ``(seed, epoch, index)`` (``common.data.example_generator``).
    """

    def __init__(self, hf_dataset, image_column: str, label_column: str, channels: int,
                 size: Optional[int], augment: bool, seed: int = 0):
        self.data = hf_dataset
        self.seed = seed
        self.epoch = 0
        self.image_column = image_column
        self.label_column = label_column
        self.channels = channels
        self.size = size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.data)

    def labels(self) -> torch.Tensor:
        """``(N,)`` int64 class labels, read from the label column alone (no image is decoded)."""
        return torch.as_tensor([int(v) for v in self.data[self.label_column]], dtype=torch.long)

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at each epoch start: new augmentations every epoch. Decodes the set
        now (once) if it is to be decoded: in the main process, before the epoch's loader workers start, so
        that they inherit the tensors instead of each decoding them again."""
        self.epoch = epoch
        self._decoded()

    def _prepare(self, image: Any) -> Tensor:
        """One stored image -> ``(C, S, S)`` float in ``[0, 1]``, before augmentation."""
        x = match_channels(to_chw_float(image), self.channels)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True)[0].clamp(0, 1)
        return x

    def _decoded(self) -> Optional[tuple[Tensor, Tensor]]:
        """Every image prepared once, ``(N, C, S, S)``, with the labels ``(N,)``, for a dataset whose images
        come out of Arrow as one array (e.g. Fashion-MNIST's ``Array2D``) and fit in
        :data:`DECODE_ONCE_BYTES`; None otherwise (then each item is read on its own). The same
        ``_prepare`` per image as the per-item path, so the tensors are bit-identical to it."""
        if not hasattr(self, "_cache"):
            self._cache = None
            if not hasattr(self.data, "with_format") or not len(self.data):
                return None
            first = self._prepare(self.data[0][self.image_column])
            if first.numel() * first.element_size() * len(self.data) > DECODE_ONCE_BYTES:
                return None
            # One read of the column, not N rows.
            images = self.data.with_format("numpy", columns=[self.image_column])[:][self.image_column]
            if isinstance(images, np.ndarray) and images.dtype != object:
                self._cache = (torch.stack([self._prepare(image) for image in images]), self.labels())
        return self._cache

    def _item(self, x: Tensor, label: Tensor, index: int) -> dict:
        if self.augment:
            x = random_crop_flip(x, example_generator(self.seed, self.epoch, int(index)))
        return {"pixel_values": x, "labels": label}

    def __getitem__(self, index: int) -> dict:
        decoded = self._decoded()
        if decoded is not None:
            return self._item(decoded[0][int(index)], decoded[1][int(index)], index)
        row = self.data[int(index)]
        return self._item(self._prepare(row[self.image_column]),
                          torch.tensor(int(row[self.label_column]), dtype=torch.long), index)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch's items at once (the DataLoader calls this instead of one ``__getitem__`` per index)."""
        decoded = self._decoded()
        if decoded is None:
            return [self[i] for i in indices]
        rows = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
        images, labels = decoded[0][rows], decoded[1][rows]
        if self.augment:  # the per-example draws, then one crop-and-flip of the whole batch
            images = batch_crop_flip(images, [example_generator(self.seed, self.epoch, int(i)) for i in indices])
        return [{"pixel_values": images[k], "labels": labels[k]} for k in range(len(indices))]


def crop_flip_draws(width: int, generator: Optional[torch.Generator] = None) -> tuple[int, int, bool]:
    """One example's crop offsets ``(i, j)`` in ``[0, 2 pad]`` and its flip, drawn from ``generator`` in this
    order (the order fixes which images a seed gives)."""
    pad = max(1, width // 8)
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return i, j, bool(torch.rand((), generator=generator) < 0.5)


def random_crop_flip(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Random crop with zero padding (4 px for 32-px images, 1/8 of the side in general) and a coin-flip
    horizontal mirror. ``x``: ``(C, H, W)``."""
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    i, j, flip = crop_flip_draws(x.shape[-1], generator)
    x = padded[:, i:i + x.shape[-2], j:j + x.shape[-1]]
    return x.flip(-1) if flip else x


def batch_crop_flip(x: Tensor, generators: list[torch.Generator]) -> Tensor:
    """:func:`random_crop_flip` of every image of ``x`` ``(B, C, H, W)`` with its own generator, as one
    gather: the same draws and the same pixels as one call per image, without B Python-level pads and slices."""
    b, _, h, w = x.shape
    pad = max(1, w // 8)
    draws = torch.tensor([crop_flip_draws(w, g) for g in generators], dtype=torch.long).view(b, 3)
    padded = F.pad(x, (pad, pad, pad, pad))
    ys = draws[:, :1] + torch.arange(h)                                    # (B, H) rows of the crop
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(draws[:, 2:].bool(), w - 1 - cols, cols)            # mirrored where flipped
    xs = draws[:, 1:2] + cols                                              # (B, W)
    # (B, H, W, C) from advanced indexing on dims 0, 2, 3; back to (B, C, H, W)
    return padded[torch.arange(b)[:, None, None], :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)


def collate(items: list[dict]) -> dict:
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "labels": torch.stack([it["labels"] for it in items])}
