"""Image classifiers that take pixels in ``[0, 1]`` and normalise inside the model.

Keeping normalisation inside means every attack lives in pixel space and eps is in pixel units
(8/255 means 8 grey levels), whatever the backbone's mean/std. All models return logits ``(B, K)``.

Names:
    preact_resnet18   the paper's PreAct ResNet-18 with the CIFAR stem (3×3 conv, no max-pool)
    small_cnn         a 4-layer CNN for CPU runs and tests
    timm:<name>       any timm model (``--pretrained`` loads its hub weights)
    <hub id | folder> any transformers ``AutoModelForImageClassification`` (ViT, ResNet, ConvNeXt, ...)
    <saved folder>    a run's ``model/`` folder (``samat_model.json`` beside the weights), see :func:`save_model`

A saved model reloads with :func:`load_model` and nothing else: ``samat_model.json`` records the kind, the
name, the classes, input channels, width, input size and the normalisation; the weights of the network inside
:class:`Normalized` are ``model.safetensors`` (built-ins), timm's hub layout (``config.json`` +
``model.safetensors``, so ``timm.create_model("local-dir:run/model", pretrained=True)`` or ``"hf-hub:<repo>"``
works without samat, :func:`save_timm`) or a transformers ``save_pretrained`` folder (so
``AutoModelForImageClassification.from_pretrained(run/model)`` works without samat).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samat.common.errors import UsageError

from .recipe import RECIPE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAVED_CONFIG = RECIPE.saved_config  # the file that marks a saved folder (the task recipe)
WEIGHTS_FILE = "model.safetensors"
SAVED_FORMAT = 1


class Normalized(nn.Module):
    """``model((x - mean) / std)`` for ``x`` in ``[0, 1]``, ``(B, C, H, W)``; returns logits ``(B, K)``.

    Transformers models return a ``ModelOutput``: its ``.logits`` are taken so callers always get a tensor.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.model((x - self.mean) / self.std)
        return out if isinstance(out, Tensor) else out.logits


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # Pre-activation: the shortcut branches off after BN-ReLU when it has a projection (He et al. 2016).
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for small images (CIFAR stem). ``width`` is the first stage's channels (64)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        layers, in_planes = [], width
        for i, planes in enumerate(widths):
            for j in range(2):
                layers.append(PreActBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class SmallCNN(nn.Module):
    """conv-pool-conv-conv-pool-fc with BatchNorm: ~3M multiply-adds per 28×28 image, so a CPU trains it
    in seconds per thousand images (the quick-start and test model; the paper's model is PreAct ResNet-18)."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


BUILTIN = {"preact_resnet18": PreActResNet18, "small_cnn": SmallCNN}


def _hub_error(name: str, err: Exception) -> UsageError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    why = "the hub cannot be reached (offline)" if offline else type(err).__name__
    return UsageError(f"--model {name!r}: not a built-in ({', '.join(BUILTIN)}), 'timm:<name>', local folder, "
                      f"or reachable hub id: {why}")


def build_model(name: str, num_classes: int, in_channels: int, *, pretrained: bool = False,
                width: Optional[int] = None) -> tuple[nn.Module, Optional[int]]:
    """A ``Normalized`` classifier and the input size it expects (``None``: any size, use the data's).

    Built-in models normalise with per-channel 0.5 mean / 0.5 std (data-agnostic, so eps stays in pixels);
    timm and transformers models with their own pretraining statistics.
    """
    if is_saved_model(name):  # its own weights (--pretrained has nothing to add) and width
        model, spec = load_model(name)
        if width and width != spec.get("width"):
            raise UsageError(f"--width {width}: the saved model {name!r} has width {spec.get('width')}")
        check_saved_matches(name, spec, num_classes, in_channels)
        return model.train(), spec.get("image_size")
    if name in BUILTIN:
        if pretrained:
            raise UsageError(f"--pretrained: the built-in {name!r} has no pretrained weights; use a hub id or "
                             "timm:<name>")
        kwargs = {"width": width} if width else {}
        model = BUILTIN[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
        return Normalized(model, (0.5,) * in_channels, (0.5,) * in_channels), None
    if width:
        raise UsageError(f"--width applies to the built-in models ({', '.join(BUILTIN)}), not {name!r}")
    if name.startswith("timm:"):
        import timm

        timm_name = name.split(":", 1)[1]
        if not timm.list_models(timm_name):
            raise UsageError(f"--model {name!r}: unknown timm model; see timm.list_models() (e.g. timm:resnet18)")
        try:
            model = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes,
                                      in_chans=in_channels)
        except Exception as err:  # hub download failures come as many exception types
            raise _hub_error(name, err) from None
        cfg = model.pretrained_cfg
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))[:in_channels]
        std = tuple(cfg.get("std", IMAGENET_STD))[:in_channels]
        size = cfg.get("input_size", (in_channels, None, None))[-1] if pretrained else None
        return Normalized(model, mean, std), size
    return _build_transformers(name, num_classes, in_channels)


def _build_transformers(name: str, num_classes: int, in_channels: int) -> tuple[nn.Module, Optional[int]]:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as err:
        raise _hub_error(name, err) from None
    try:
        model = AutoModelForImageClassification.from_pretrained(
            name, num_labels=num_classes, ignore_mismatched_sizes=True)
    except (OSError, EnvironmentError):
        # A folder/hub id with a config but no weights: random init from the config.
        config.num_labels = num_classes
        model = AutoModelForImageClassification.from_config(config)
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, None
    try:
        processor = AutoImageProcessor.from_pretrained(name)
        mean = tuple(getattr(processor, "image_mean", mean))
        std = tuple(getattr(processor, "image_std", std))
        proc_size = getattr(processor, "size", None) or {}
        size = proc_size.get("height") or proc_size.get("shortest_edge")
    except Exception:
        size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", 3)
    if channels != 3 and len(mean) == 3:
        mean, std = mean[:channels], std[:channels]
    if isinstance(size, (list, tuple)):
        size = size[0]
    return Normalized(model, mean, std), size


def model_channels(name: str, data_channels: int) -> int:
    """Input channels the model takes: the data's for built-ins and timm, 3 for transformers hub models
    unless their config says otherwise (grayscale images are then repeated to RGB)."""
    if name in BUILTIN or name.startswith("timm:"):
        return data_channels
    if is_saved_model(name):
        return int(read_spec(name)["channels"])
    from transformers import AutoConfig

    try:
        return int(getattr(AutoConfig.from_pretrained(name), "num_channels", 3))
    except Exception as err:
        raise _hub_error(name, err) from None


# ---------------------------------------------------------------------------------------- save / reload


def model_kind(name: str) -> str:
    """``builtin``, ``timm`` or ``transformers``: how a ``--model`` name is built (and so saved)."""
    if name in BUILTIN:
        return "builtin"
    return "timm" if name.startswith("timm:") else "transformers"


def is_saved_model(name: str) -> bool:
    """Whether ``name`` is a folder written by :func:`save_model`."""
    return (Path(name).expanduser() / SAVED_CONFIG).is_file()


def save_model(model: Normalized, folder: str | Path, spec: dict[str, Any]) -> None:
    """Write ``model`` so that :func:`load_model` rebuilds it from the folder alone.

    ``spec`` holds ``name`` (the ``--model`` it was built from), ``num_classes``, ``channels``, ``width``
    (built-ins; ``None`` for the default), ``image_size`` (the side inputs are resized to, ``None`` for the
    data's own), ``class_names`` and optionally ``input_size`` (the side, or ``[H, W]``, trained on, for timm's
    ``config.json`` when ``image_size`` is ``None``). The normalisation is read from ``model``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = model_kind(spec["name"])
    names = list(spec.get("class_names") or [])
    net = model.model
    if kind == "transformers":
        if names:  # the label names travel in config.json, as for any hub classifier
            net.config.id2label = dict(enumerate(names))
            net.config.label2id = {n: i for i, n in enumerate(names)}
        net.save_pretrained(str(folder))
    elif kind == "timm":
        save_timm(net, folder, spec, model.mean.flatten().tolist(), model.std.flatten().tolist())
    else:
        from safetensors.torch import save_model as save_weights

        save_weights(net, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    record = {"format": "samat-vision", "format_version": SAVED_FORMAT, "kind": kind, **spec,
              "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()}
    from samat.common.files import write_json_atomic

    write_json_atomic(folder / SAVED_CONFIG, record)


def save_timm(net: nn.Module, folder: Path, spec: dict[str, Any], mean: list[float], std: list[float]) -> None:
    """The timm network inside :class:`Normalized` in timm's own hub layout (``timm.models.save_for_hf``):
    ``config.json`` (architecture, ``num_classes``, ``model_args`` such as ``in_chans``, label names, and a
    ``pretrained_cfg`` with the input size and the mean/std samat normalised with) and ``model.safetensors``.

    ``timm.create_model("hf-hub:<repo>", pretrained=True)`` (after ``--push_to_hub``) or
    ``timm.create_model("local-dir:<folder>", pretrained=True)`` then rebuilds the bare network, which takes
    normalised inputs: ``timm.data.resolve_data_config(model=net)`` gives the mean/std to normalise with, and
    ``crop_pct`` 1.0 (samat resizes the whole image, it does not crop)."""
    from timm.models import save_for_hf

    size = spec.get("image_size") or spec.get("input_size")
    data_config: dict[str, Any] = {"mean": tuple(mean), "std": tuple(std), "crop_pct": 1.0}
    if size:
        h, w = (size, size) if isinstance(size, int) else size
        data_config["input_size"] = (int(spec["channels"]), int(h), int(w))
    names = list(spec.get("class_names") or [])
    try:
        save_for_hf(net, str(folder), safe_serialization=True, data_config=data_config,
                    model_config={"label_names": names} if names else None)
    except (ValueError, TypeError) as err:
        # timm refuses to export some models' arguments (not JSON-serialisable); the trained weights must not
        # be lost after training for it: samat's own format (weights only, reloaded by load_model) instead.
        import logging

        logging.getLogger("samat").warning("timm could not export %s for its hub loader (%s); saved the weights "
                                           "for samat's load_model only", spec["name"], err)
        (folder / "config.json").unlink(missing_ok=True)
        from safetensors.torch import save_model as save_weights

        save_weights(net, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def read_spec(folder: str | Path) -> dict[str, Any]:
    """The ``samat_model.json`` of a saved folder; ``UsageError`` when it is not one this samat reads."""
    folder = Path(folder).expanduser()
    try:
        spec = json.loads((folder / SAVED_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{folder}: cannot read {SAVED_CONFIG} ({type(err).__name__})") from None
    if spec.get("format") != "samat-vision" or spec.get("format_version", 0) > SAVED_FORMAT:
        raise UsageError(f"{folder / SAVED_CONFIG}: not a samat vision model of a format this samat reads "
                         f"(format {spec.get('format')!r}, version {spec.get('format_version')!r})")
    return spec


def load_model(folder: str | Path) -> tuple[Normalized, dict[str, Any]]:
    """The model :func:`save_model` wrote into ``folder``, in eval mode on CPU, and its spec (the saved
    ``samat_model.json``). Needs nothing but the folder (no hub, no training flags)."""
    folder = Path(folder).expanduser()
    spec = read_spec(folder)
    kind, classes, channels = spec["kind"], int(spec["num_classes"]), int(spec["channels"])
    if kind == "transformers":
        from transformers import AutoModelForImageClassification

        net = AutoModelForImageClassification.from_pretrained(str(folder))
    else:
        if kind == "builtin":
            width = {"width": spec["width"]} if spec.get("width") else {}
            net = BUILTIN[spec["name"]](num_classes=classes, in_channels=channels, **width)
        else:
            import timm

            net = timm.create_model(spec["name"].split(":", 1)[1], pretrained=False, num_classes=classes,
                                    in_chans=channels)
        from safetensors.torch import load_model as load_weights

        load_weights(net, str(folder / WEIGHTS_FILE))  # strict: every tensor present, none left over
    return Normalized(net, tuple(spec["mean"]), tuple(spec["std"])).eval(), spec


def check_saved_matches(name: str, spec: dict[str, Any], num_classes: int, in_channels: int) -> None:
    """``UsageError`` when a saved model's classes or input channels differ from the data's."""
    if int(spec["num_classes"]) != num_classes:
        raise UsageError(f"--model {name!r} predicts {spec['num_classes']} classes, but the dataset has "
                         f"{num_classes}; evaluate it on the data it was trained for (or pass --dataset)")
    if int(spec["channels"]) != in_channels:
        raise UsageError(f"--model {name!r} takes {spec['channels']}-channel images, the dataset has "
                         f"{in_channels}")
