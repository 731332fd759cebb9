"""Tiny models and batches for engine tests (CPU, milliseconds)."""

from __future__ import annotations

import socket

import torch
from torch import nn

from samat.common.methods import METHODS, ResolvedMethod, StepContext
from samat.vision.models import Normalized, SmallCNN
from samat.vision.task import VisionArgs, VisionTask


def free_port() -> str:
    """A TCP port free right now, for a multi-process test's rendezvous: a fixed one collides with another
    test running at the same time (pytest-xdist) or with another project's job on the machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def tiny_mlp(in_features: int = 3 * 8 * 8, classes: int = 4, seed: int = 0) -> nn.Module:
    """Pixels (B, 3, 8, 8) in [0, 1] -> logits (B, classes); no BatchNorm, so batch splits are exact."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 16), nn.Tanh(), nn.Linear(16, classes))


def tiny_cnn(classes: int = 4, seed: int = 0) -> nn.Module:
    """A BatchNorm CNN on (B, 3, 8, 8) pixels."""
    torch.manual_seed(seed)
    return Normalized(SmallCNN(classes, in_channels=3, width=4), (0.5,) * 3, (0.5,) * 3)


def image_batch(n: int = 8, classes: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(n, 3, 8, 8, generator=g),
            "labels": torch.randint(0, classes, (n,), generator=g)}


def vision_task() -> VisionTask:
    return VisionTask(VisionArgs())


def eval_loss(task, model: nn.Module, batch: dict) -> float:
    """The task loss of ``model`` on ``batch`` in eval mode (BatchNorm on running statistics), no grad; the
    model is left in train mode."""
    model.eval()
    with torch.no_grad():
        value = task.loss(task.forward(model, batch), batch).item()
    model.train()
    return value


def resolved(name: str, **kw) -> ResolvedMethod:
    base = dict(rho=0.05, eps=8 / 255, alpha=2 / 255, steps=3, norm="linf")
    if name == "fgsm-at":
        base.update(steps=1, alpha=1.25 * 8 / 255)
    base.update(kw)
    return ResolvedMethod(method=METHODS[name], **base)


def context(accelerator, model, method: ResolvedMethod, lr: float = 0.1, momentum: float = 0.0,
            max_grad_norm: float = 0.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model, optimizer = accelerator.prepare(model, optimizer)
    return StepContext(accelerator=accelerator, model=model, optimizer=optimizer, task=vision_task(),
                       method=method, max_grad_norm=max_grad_norm)


def load_script(name: str):
    """``scripts/<name>.py`` imported as module ``<name>_script`` (registered in ``sys.modules``, where
    dataclasses look their module up)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def prior_only_dataset(folder, signal: bool, n_train: int = 640, n_test: int = 64, majority: float = 0.7,
                       seed: int = 0):
    """A ``save_to_disk`` folder of 8×8 grey images, two classes in shares ``majority`` / ``1 - majority``
    (a seeded shuffle). Without ``signal`` every image is the same mid-grey picture, so nothing beyond the
    label prior can be learnt (a model's best loss is the prior's entropy); with it, class 1 is bright and
    class 0 dark (learnt in a few steps)."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)

    def split(n: int):
        labels = (np.arange(n) >= round(majority * n)).astype(int)
        rng.shuffle(labels)
        level = lambda y: (200 if y else 50) if signal else 128  # noqa: E731
        images = [Image.fromarray(np.full((8, 8), level(y), dtype=np.uint8)) for y in labels]
        return datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=["majority", "minority"])}))

    datasets.DatasetDict({"train": split(n_train), "test": split(n_test)}).save_to_disk(str(folder))
    return folder
