"""Tiny segmentation data and models for the segmentation tests (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from samat.common.config import RunArgs
from samat.common.methods import METHODS, ResolvedMethod
from samat.segmentation.task import SegmentationArgs, SegmentationTask


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (restored after): the tiny convolutions gain nothing from threads, and
    on a shared CPU extra threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A U-Net small enough for CPU tests: 3 encoder stages of ResNet-18, narrow decoder; 32 px inputs.
TINY_MODEL = dict(encoder="resnet18", encoder_depth=3, decoder_channels=[16, 8, 8], image_size=32,
                  check_samples=16)
CLASSES = 3  # background, square, disc


def shapes(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB uint8 images ``(n, size, size, 3)`` and masks ``(n, size, size)``: a noisy plain background
    (0), one square (1) and one disc (2, drawn on top). Shapes differ from the background by a random
    low-contrast colour shift (0.15-0.3 per channel), so a model must read edges and shapes, and a
    few-grey-level perturbation matters."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        background = rng.uniform(0.25, 0.75, 3)
        image = background + rng.normal(0, 0.03, (size, size, 3))
        side = rng.integers(size // 4, size // 2)
        top, left = rng.integers(0, size - side, 2)
        square = (yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side)
        radius = rng.integers(size // 8, size // 4)
        cy, cx = rng.integers(radius, size - radius, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        for region, label in ((square, 1), (disc, 2)):
            shift = rng.choice([-1.0, 1.0], 3) * rng.uniform(0.15, 0.3, 3)
            image[region] = background + shift + rng.normal(0, 0.03, (int(region.sum()), 3))
            masks[i][region] = label
        images[i] = np.clip(image * 255, 0, 255).astype(np.uint8)
    return images, masks


def save_shapes(folder: Path, n_train: int = 64, n_test: int = 32, size: int = 32) -> Path:
    """A ``save_to_disk`` DatasetDict of :func:`shapes` with columns ``image``/``mask`` and splits
    ``train``/``test``."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    splits = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, masks = shapes(n, size, seed)
        splits[split] = datasets.Dataset.from_dict({"image": list(images), "mask": list(masks)},
                                                   features=features)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def tiny_task(folder: Path, **overrides):
    """A SegmentationTask built on the saved shapes data: ``(the task as built, TaskData)``."""
    args = SegmentationArgs(**{**TINY_MODEL, **overrides})
    task = SegmentationTask(args)
    torch.manual_seed(0)
    built = task.build(RunArgs(task="segmentation", dataset=str(folder)), None)
    return built.task, built


def batches(dataset, batch_size: int, collate) -> list[dict]:
    items = [dataset[i] for i in range(len(dataset))]
    return [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def train_briefly(task, model, loader: list[dict], epochs: int = 6, lr: float = 3e-3) -> None:
    """Plain Adam on the task loss: enough for a clearly-better-than-chance, non-robust model."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            task.loss(task.forward(model, batch), batch).backward()
            optimizer.step()
    model.eval()


def resolved_for(name: str) -> ResolvedMethod:
    """``name`` with small, fixed hyper-parameters (3 PGD steps) for quick method tests."""
    base = dict(rho=0.05, eps=8 / 255, alpha=2 / 255, steps=3, norm="linf")
    if name == "fgsm-at":
        base.update(steps=1, alpha=1.25 * 8 / 255)
    if METHODS[name].update in ("saf", "mesa"):  # the trajectory loss on from the first step
        base.update(traj_lambda=0.8, traj_start_epoch=0)
    return ResolvedMethod(method=METHODS[name], **base)
