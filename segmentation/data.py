"""Semantic-segmentation data: any Hugging Face dataset (hub id or ``save_to_disk`` folder) or the embedded
offline default (:mod:`segmentation.canvas`), all through one path.

An example becomes ``{"pixel_values": (3, S, S) float in [0, 1], "labels": (S, S) int64}``, where labels are
class indices in ``[0, num_classes)`` or ``ignore_index``. Geometry (the same for image and mask):

* eval: resize to ``S × S`` (bilinear for the image, nearest for the mask), so every pixel is scored;
* train: the same resize, then a random scale in ``[scale_min, scale_max]``, a random ``S × S`` crop
  (padding with black pixels labelled ``ignore_index`` where the scaled image is smaller) and a random
  horizontal flip, seeded per ``(seed, epoch, index)`` (``common.data.example_generator``) so that a
  resumed run sees the same pixels.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from samat.common.data import example_generator, find_column, pick_split
from samat.common.errors import UsageError

from . import canvas

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "pixel_values", "images", "rgb", "input")
MASK_COLUMNS = ("mask", "label", "labels", "annotation", "semantic_segmentation", "segmentation", "seg_map",
                "label_mask", "gt", "target")


@dataclass
class SegmentationSplits:
    """Raw splits and what was found about them, before any transform."""

    name: str                    # what the user asked for (hub id, folder, or the embedded name)
    train: Any                   # datasets.Dataset
    eval: Any                    # datasets.Dataset
    eval_split: str
    image_column: str
    mask_column: str
    id2label: Optional[dict[int, str]]  # from an id2label.json next to the data, when there is one


def load_splits(dataset: Optional[str], config: Optional[str], train_split: str, eval_split: Optional[str],
                image_column: Optional[str], mask_column: Optional[str], *, canvas_size: int = 64,
                canvas_train_size: int = 10000, canvas_test_size: int = 2000,
                canvas_seed: int = 0) -> SegmentationSplits:
    """Load the train and eval splits and find their image and mask columns.

    ``dataset``: None or ``"fashion-canvas"`` (the embedded default, built and cached on first use), a local
    ``save_to_disk`` folder, or a hub id. ``eval_split`` None means ``test``, else ``validation``.
    Raises ``UsageError`` for a dataset that cannot be loaded, a missing split or column.
    """
    import datasets

    name = dataset or canvas.NAME
    id2label = None
    if name == canvas.NAME:
        folder = canvas.build_fashion_canvas(canvas_size, canvas_train_size, canvas_test_size, canvas_seed)
        name = f"{canvas.NAME} ({canvas_size}px, {canvas_train_size}+{canvas_test_size}, seed {canvas_seed})"
        dataset = str(folder)
    if os.path.isdir(dataset):
        try:
            loaded = datasets.load_from_disk(dataset)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--dataset {dataset}: not a datasets save_to_disk folder ({err})") from None
        id2label = _read_id2label(Path(dataset) / canvas.ID2LABEL_FILE)
    else:
        try:
            loaded = datasets.load_dataset(dataset, config)
        except Exception as err:  # the hub raises many types (offline, not found, gated, bad config)
            raise UsageError(f"--dataset {dataset!r}: could not load it from the Hugging Face hub "
                             f"({type(err).__name__}: {_first_line(err)})") from None
        id2label = _hub_id2label(dataset)
    if isinstance(loaded, datasets.Dataset):
        raise UsageError(f"--dataset {dataset}: holds a single Dataset; segmentation needs a DatasetDict with "
                         f"a train and an eval split")
    train_split = pick_split(loaded, train_split, ("train",), "--train_split")
    eval_split = pick_split(loaded, eval_split, ("test", "validation"), "--eval_split")
    train, evaluation = loaded[train_split], loaded[eval_split]
    image_col = find_column(train.column_names, image_column, IMAGE_COLUMNS, "image", "--image_column")
    mask_col = find_column(train.column_names, mask_column, MASK_COLUMNS, "mask", "--label_column")
    if image_col == mask_col:
        raise UsageError(f"the image and mask columns are both {image_col!r}; name them with --image_column "
                         f"and --label_column")
    for col in (image_col, mask_col):
        if col not in evaluation.column_names:
            raise UsageError(f"column {col!r} is in split {train_split!r} but not in {eval_split!r}")
    keep = [image_col, mask_col]
    return SegmentationSplits(name=name, train=train.select_columns(keep), eval=evaluation.select_columns(keep),
                              eval_split=eval_split, image_column=image_col, mask_column=mask_col,
                              id2label=id2label)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no message"


def _read_id2label(path: Path) -> Optional[dict[int, str]]:
    if not path.is_file():
        return None
    return {int(k): str(v) for k, v in json.loads(path.read_text()).items()}


def _hub_id2label(repo: str) -> Optional[dict[int, str]]:
    """The dataset repo's ``id2label.json`` (a common hub convention for segmentation sets), if any."""
    try:
        from huggingface_hub import hf_hub_download

        return _read_id2label(Path(hf_hub_download(repo, canvas.ID2LABEL_FILE, repo_type="dataset")))
    except Exception:  # absent file, offline: class names are a nicety, never a reason to fail
        return None


# ------------------------------------------------------------------------------------------- decoding


def to_image_tensor(image: Any, where: str) -> Tensor:
    """A PIL image or array (``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``) as float ``(3, H, W)`` in ``[0, 1]``."""
    if hasattr(image, "convert"):  # PIL: palette, grey, RGBA, 16-bit... all to RGB
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3:
        raise UsageError(f"{where}: image has shape {array.shape}; expected (H, W), (H, W, C) or (C, H, W)")
    if array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):  # channels first
        array = np.moveaxis(array, 0, -1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] != 3:
        raise UsageError(f"{where}: image has {array.shape[-1]} channels; expected 1 or 3")
    tensor = torch.from_numpy(np.array(array)).permute(2, 0, 1)  # a copy: arrow buffers are read-only
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if not tensor.is_floating_point() and tensor.numel() and 0 <= tensor.min() and tensor.max() <= 255:
        return tensor.float() / 255.0  # integer pixels (e.g. arrow's int64) on the 8-bit scale
    tensor = tensor.float()
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise UsageError(f"{where}: float image values in [{tensor.min():.3g}, {tensor.max():.3g}]; expected "
                         f"uint8 or floats in [0, 1]")
    return tensor


def to_mask_tensor(mask: Any, where: str) -> Tensor:
    """A single-channel PIL image or integer array of class indices as int64 ``(H, W)``."""
    if hasattr(mask, "mode") and mask.mode in ("RGB", "RGBA"):
        raise UsageError(f"{where}: the mask is an {mask.mode} colour image; segmentation needs one class "
                         f"index per pixel (a single-channel 'L', 'P' or 'I' image, or an integer array)")
    array = np.asarray(mask)
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.squeeze(0 if array.shape[0] == 1 else -1)
    if array.ndim != 2:
        raise UsageError(f"{where}: the mask has shape {array.shape}; expected (H, W) class indices")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.mod(array, 1) == 0):
            raise UsageError(f"{where}: the mask holds non-integer values; expected class indices")
    return torch.from_numpy(array.astype(np.int64))


def check_example(image: Tensor, mask: Tensor, num_classes: int, ignore_index: int, where: str) -> None:
    """``UsageError`` if sizes differ or a mask value is outside ``[0, num_classes)`` and not ignore_index."""
    if image.shape[-2:] != mask.shape:
        raise UsageError(f"{where}: image is {image.shape[-1]}x{image.shape[-2]} but its mask is "
                         f"{mask.shape[-1]}x{mask.shape[-2]} (width x height)")
    bad = mask[((mask < 0) | (mask >= num_classes)) & (mask != ignore_index)]
    if bad.numel():
        values = sorted(set(bad.unique()[:5].tolist()))
        raise UsageError(f"{where}: mask values {values} are outside [0, {num_classes}) and not the ignore "
                         f"index {ignore_index}; pass --num_classes or --ignore_index (or --reduce_labels)")


def reduce_labels(mask: Tensor, ignore_index: int) -> Tensor:
    """ADE20k-style label reduction: 0 ('other') becomes ``ignore_index``, every other class shifts down."""
    keep = mask != ignore_index
    out = torch.where(mask == 0, torch.full_like(mask, ignore_index), mask - 1)
    return torch.where(keep, out, mask)


def infer_num_classes(dataset: Any, mask_column: str, ignore_index: int, reduce: bool, limit: int) -> int:
    """1 + the largest mask value (other than ``ignore_index``) among the first ``limit`` examples."""
    top = -1
    for i in range(min(limit, len(dataset))):
        mask = to_mask_tensor(dataset[i][mask_column], f"example {i}")
        if reduce:
            mask = reduce_labels(mask, ignore_index)
        valid = mask[mask != ignore_index]
        if valid.numel():
            top = max(top, int(valid.max()))
    if top < 0:
        raise UsageError(f"the first {limit} masks hold only the ignore index {ignore_index}; pass "
                         f"--num_classes and check --ignore_index")
    return top + 1


# ------------------------------------------------------------------------------------------ transforms


def resize_pair(image: Tensor, mask: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Resize ``(3, H, W)`` image (bilinear, antialiased when shrinking) and ``(H, W)`` mask (nearest)."""
    if image.shape[-2:] == (height, width):
        return image, mask
    image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False,
                          antialias=True)[0].clamp(0, 1)
    # nearest-exact picks the source pixel whose centre is nearest, so a 2x downscale keeps a true grid.
    mask = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0].long()
    return image, mask


def random_scale_crop_flip(image: Tensor, mask: Tensor, size: int, scale: tuple[float, float], hflip: bool,
                           ignore_index: int, generator: Optional[torch.Generator] = None
                           ) -> tuple[Tensor, Tensor]:
    """Joint augmentation of a ``(3, S, S)`` image and ``(S, S)`` mask; returns the same shapes."""
    factor = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator))
    scaled = max(1, round(size * factor))
    image, mask = resize_pair(image, mask, scaled, scaled)
    if scaled < size:  # pad to S: black pixels, ignored by loss and metrics
        pad = size - scaled
        image = F.pad(image, (0, pad, 0, pad), value=0.0)
        mask = F.pad(mask, (0, pad, 0, pad), value=ignore_index)
        scaled = size
    top, left = (int(torch.randint(0, scaled - size + 1, (), generator=generator)) for _ in range(2))
    image = image[:, top:top + size, left:left + size]
    mask = mask[top:top + size, left:left + size]
    if hflip and bool(torch.rand((), generator=generator) < 0.5):
        image, mask = image.flip(-1), mask.flip(-1)
    return image.contiguous(), mask.contiguous()


def load_example(row: dict, image_column: str, mask_column: str, num_classes: int, ignore_index: int,
                 reduce: bool, where: str) -> tuple[Tensor, Tensor]:
    """One dataset row as a validated ``(3, H, W)`` image in [0, 1] and ``(H, W)`` int64 mask."""
    image = to_image_tensor(row[image_column], where)
    mask = to_mask_tensor(row[mask_column], where)
    if reduce:
        mask = reduce_labels(mask, ignore_index)
    check_example(image, mask, num_classes, ignore_index, where)
    return image, mask


def validate_prefix(dataset: Any, image_column: str, mask_column: str, num_classes: int, ignore_index: int,
                    reduce: bool, limit: int, split: str) -> None:
    """Read (and so validate) the first ``limit`` rows of a ``datasets.Dataset`` now, before training."""
    for i in range(min(limit, len(dataset))):
        load_example(dataset[i], image_column, mask_column, num_classes, ignore_index, reduce,
                     f"split {split!r} example {i}")


# Sets whose resized examples take at most this many bytes (as float32 images and int64 masks, the most they can
# take) are decoded once into tensors; larger ones are read example by example. The default CPU subset (8,000
# canvases of 48 px) takes 59 MB as stored (uint8).
DECODE_ONCE_BYTES = 1 << 30


def _smallest_int(values: Tensor) -> Tensor:
    """``values`` (int64) in the narrowest of uint8/int16/int32/int64 that holds every value exactly."""
    if not values.numel():
        return values
    low, high = int(values.min()), int(values.max())
    for dtype in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return values.to(dtype)
    return values


class SegmentationDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` of (image, mask) pairs as model-ready tensors (see the module docstring).

    Every example is validated when it is read (sizes, mask values), so a bad example far into a large
    set still fails with a one-line ``UsageError`` naming it.

    Sets up to :data:`DECODE_ONCE_BYTES` are decoded, validated and resized once, on first use, into one
    image and one mask tensor (images as uint8 when that is exact, masks in the narrowest integer type), and
    a batch is cut from them at once (``__getitems__``) instead of one Arrow read and image decode per
    example per epoch. The items are bit-identical to the per-example path's (the same functions make
    them), and a bad example still fails only when it is read.
    """

    def __init__(self, data: Any, image_column: str, mask_column: str, *, num_classes: int, ignore_index: int,
                 size: int, train: bool, scale: tuple[float, float] = (1.0, 1.0), hflip: bool = False,
                 reduce: bool = False, split: str = "train", seed: int = 0):
        self.data = data
        self.seed, self.epoch = seed, 0
        self.image_column, self.mask_column = image_column, mask_column
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.size, self.train, self.scale, self.hflip, self.reduce = size, train, scale, hflip, reduce
        self.split = split

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at each epoch start: new augmentations every epoch. Decodes the set
        now (once) if it is to be decoded: in the main process, before the epoch's loader workers start, so
        that they inherit the tensors instead of each decoding them again."""
        self.epoch = epoch
        self._decoded()

    def select(self, indices: Sequence[int]) -> "SegmentationDataset":
        """The examples at ``indices`` with the same transform (the engine subsets with ``select``)."""
        out = SegmentationDataset.__new__(SegmentationDataset)
        out.__dict__.update(self.__dict__)
        out.__dict__.pop("_cache", None)  # the subset decodes its own examples
        out.data = self.data.select(indices)
        return out

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """Decoded and validated, before any geometry: ``(3, H, W)`` in [0, 1] and ``(H, W)`` int64."""
        return load_example(self.data[index], self.image_column, self.mask_column, self.num_classes,
                            self.ignore_index, self.reduce, f"split {self.split!r} example {index}")

    def _resized(self, index: int) -> tuple[Tensor, Tensor]:
        """Example ``index`` decoded, validated and resized to ``S × S``: ``(3, S, S)`` float, ``(S, S)`` int64."""
        image, mask = self.load(index)
        return resize_pair(image, mask, self.size, self.size)

    def _decoded(self) -> Optional[tuple[Tensor, Tensor, dict[int, str]]]:
        """Every example through :meth:`_resized`, once: images ``(N, 3, S, S)`` (uint8 when ``x * 255``
        rounds back exactly, else float32), masks ``(N, S, S)`` in the narrowest integer type, and the
        ``UsageError`` message of each example that failed validation (its slots hold zeros). ``None``
        (read per example) for a set that is not a ``datasets.Dataset`` or is over :data:`DECODE_ONCE_BYTES`."""
        if not hasattr(self, "_cache"):
            self._cache = None
            n = len(self.data)
            if hasattr(self.data, "with_format") and n and n * self.size * self.size * (3 * 4 + 8) \
                    <= DECODE_ONCE_BYTES:
                images = torch.zeros(n, 3, self.size, self.size)
                masks = torch.zeros(n, self.size, self.size, dtype=torch.long)
                bad: dict[int, str] = {}
                for i in range(n):
                    try:
                        images[i], masks[i] = self._resized(i)
                    except UsageError as err:
                        bad[i] = str(err)
                as_bytes = torch.round(images * 255).to(torch.uint8)
                if torch.equal(as_bytes.float() / 255.0, images):
                    images = as_bytes
                self._cache = (images, _smallest_int(masks), bad)
        return self._cache

    def _item(self, image: Tensor, mask: Tensor, index: int) -> dict[str, Tensor]:
        """A resized example's training geometry (train) and the item dict."""
        if self.train:
            image, mask = random_scale_crop_flip(image, mask, self.size, self.scale, self.hflip,
                                                 self.ignore_index,
                                                 example_generator(self.seed, self.epoch, int(index)))
        return {"pixel_values": image, "labels": mask}

    def _from_cache(self, images: Tensor, masks: Tensor, bad: dict[int, str], rows: list[int]) -> list[dict]:
        for i in rows:
            if i in bad:
                raise UsageError(bad[i])
        index = torch.as_tensor(rows, dtype=torch.long)
        picked, picked_masks = images[index], masks[index].long()
        picked = picked.float() / 255.0 if picked.dtype == torch.uint8 else picked
        return [self._item(picked[k], picked_masks[k], i) for k, i in enumerate(rows)]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        decoded = self._decoded()
        if decoded is not None:
            return self._from_cache(*decoded, [int(index)])[0]
        return self._item(*self._resized(int(index)), int(index))

    def __getitems__(self, indices: list[int]) -> list[dict[str, Tensor]]:
        """A batch's items at once (the DataLoader calls this instead of one ``__getitem__`` per index)."""
        decoded = self._decoded()
        if decoded is None:
            return [self[i] for i in indices]
        return self._from_cache(*decoded, [int(i) for i in indices])


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``pixel_values`` ``(B, 3, S, S)`` float in [0, 1] and ``labels`` ``(B, S, S)`` int64."""
    return {key: torch.stack([item[key] for item in items]) for key in ("pixel_values", "labels")}


def first_image_size(dataset: Any, image_column: str) -> tuple[int, int]:
    """(height, width) of the first example's image."""
    image = to_image_tensor(dataset[0][image_column], "example 0")
    return int(image.shape[-2]), int(image.shape[-1])


def default_image_size(height: int, width: int, multiple: int, cap: int = 512) -> int:
    """The shorter side rounded down to ``multiple`` (at least one multiple), capped at ``cap``."""
    side = min(height, width, cap)
    return max(multiple, (side // multiple) * multiple)
