"""Segmentation models that take pixels in ``[0, 1]`` and normalise inside, so attacks live in pixel space.

Names (``--model``):
    <smp architecture>   any segmentation-models-pytorch architecture (unet, unetplusplus, fpn, deeplabv3plus,
                         ...; default unet) with any smp encoder (``--encoder resnet18``) or any timm model as
                         ``tu-<timm name>``; ``--encoder_weights none`` (random init) or ``imagenet`` (hub)
    <hub id | folder>    a transformers ``AutoModelForSemanticSegmentation`` (SegFormer, ...): its logits at
                         1/4 resolution are upsampled bilinearly to the input size

Every model maps ``(B, 3, H, W)`` in ``[0, 1]`` to logits ``(B, K, H, W)``.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samat.common.errors import UsageError

from .recipe import RECIPE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_NONE = "none"
CONFIG_FILE = RECIPE.saved_config  # the file that marks a saved folder (the task recipe)
# Unet-family decoders take one channel count per encoder stage; smp's default is for depth 5.
PER_STAGE_DECODER = ("unet", "unetplusplus", "manet")
DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class NormalizedSegmenter(nn.Module):
    """``net((x - mean) / std)`` for ``x`` ``(B, 3, H, W)`` in ``[0, 1]``; returns logits ``(B, K, H, W)``.

    ``config`` records how to rebuild the model (see :func:`load_model`).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], config: dict):
        super().__init__()
        self.net = net
        self.config = config
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        z = (x - self.mean) / self.std
        if self.config["kind"] == "smp":
            out = self.net(z)
            return out[0] if isinstance(out, tuple) else out  # (masks, labels) when aux_params is used
        logits = self.net(pixel_values=z).logits
        if logits.shape[-2:] != x.shape[-2:]:
            # SegFormer-style heads predict at 1/4 resolution; score (and attack) at full resolution.
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def architectures() -> dict[str, type]:
    import segmentation_models_pytorch as smp

    return dict(smp.MODEL_ARCHITECTURES_MAPPING)


def _check_encoder(name: str) -> None:
    from segmentation_models_pytorch.encoders import encoders

    if name.startswith("tu-"):
        import timm

        if not timm.is_model(name[3:].split(".")[0]):
            raise UsageError(f"--encoder {name}: timm has no model {name[3:]!r} (see timm.list_models())")
        return
    if name not in encoders:
        raise UsageError(f"--encoder: unknown encoder {name!r}; choose one of: {', '.join(sorted(encoders))}, "
                         f"or tu-<any timm model>")


def _check_kwargs(cls: type, arch: str, encoder: str, kwargs: dict) -> None:
    """smp passes unknown keyword arguments on to the encoder, where smp's own encoders drop them silently;
    only ``tu-`` (timm) encoders use them. Reject them here instead of ignoring a typo."""
    if encoder.startswith("tu-"):
        return
    named = [n for n, p in inspect.signature(cls.__init__).parameters.items()
             if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    # Set by samat, or wrong for it: inputs are RGB, the loss needs raw logits, the task has one head.
    taken = {"encoder_name", "encoder_weights", "classes", "in_channels", "activation", "aux_params"}
    unknown = sorted(set(kwargs) - set(named) | set(kwargs) & taken)
    if unknown:
        raise UsageError(f"--model_kwargs: {arch} takes no argument {unknown[0]!r} (set by samat or unknown); "
                         f"it takes: {', '.join(n for n in named if n not in taken)}")


def _is_network_error(err: BaseException) -> bool:
    """Failures of a hub download (offline, DNS, HTTP), as opposed to bad arguments."""
    module = type(err).__module__
    return isinstance(err, (OSError, ConnectionError)) or module.startswith(("huggingface_hub", "requests",
                                                                             "urllib3"))


def _weights_error(encoder: str, weights: str, err: BaseException) -> UsageError:
    return UsageError(f"--encoder_weights {weights}: could not fetch {encoder} weights from the Hugging Face "
                      f"hub ({type(err).__name__}; offline?); use --encoder_weights none for random init")


def build_smp(arch: str, encoder: str, weights: str, num_classes: int, *, encoder_depth: int = 5,
              decoder_channels: Optional[Sequence[int]] = None, extra: Optional[dict] = None) -> NormalizedSegmenter:
    """An smp model by name. ``weights``: ``none`` or a pretrained tag of the encoder (``imagenet``, ...).

    Raises ``UsageError`` for an unknown architecture, encoder, weights tag or argument, and for weights
    that cannot be downloaded.
    """
    from segmentation_models_pytorch.encoders import encoders

    archs = architectures()
    key = arch.lower()
    if key not in archs:
        raise UsageError(f"--model: unknown architecture {arch!r}; choose one of: {', '.join(archs)}, or a "
                         f"transformers hub id / local folder")
    _check_encoder(encoder)
    kwargs: dict[str, Any] = dict(extra or {})
    _check_kwargs(archs[key], key, encoder, kwargs)
    if encoder_depth != 5 or "encoder_depth" in kwargs:
        kwargs.setdefault("encoder_depth", encoder_depth)
    if decoder_channels is not None:
        kwargs["decoder_channels"] = list(decoder_channels) if key in PER_STAGE_DECODER else decoder_channels[0]
    elif key in PER_STAGE_DECODER and kwargs.get("encoder_depth", 5) != 5:
        kwargs["decoder_channels"] = list(DEFAULT_DECODER_CHANNELS[:kwargs["encoder_depth"]])
    weights_tag = None if weights.lower() == WEIGHTS_NONE else weights
    if weights_tag is not None and not encoder.startswith("tu-"):
        tags = encoders[encoder]["pretrained_settings"]
        if weights_tag not in tags:
            raise UsageError(f"--encoder_weights {weights}: {encoder} has weights: "
                             f"{', '.join([WEIGHTS_NONE, *tags])}")
    if encoder.startswith("tu-") and weights_tag is not None:
        weights_tag = True  # timm universal encoders take a bool; the tag is part of the timm name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            net = archs[key](encoder_name=encoder, encoder_weights=weights_tag, classes=num_classes, **kwargs)
    except Exception as err:
        if weights_tag is not None and _is_network_error(err):
            raise _weights_error(encoder, weights, err) from None
        if isinstance(err, (TypeError, ValueError, AssertionError, KeyError)):
            raise UsageError(f"--model {arch} --encoder {encoder}: smp rejected the arguments "
                             f"{sorted(kwargs)}: {str(err).strip().splitlines()[0][:200]}") from None
        raise
    config = {"kind": "smp", "arch": key, "encoder": encoder, "encoder_weights": weights,
              "num_classes": num_classes, "kwargs": kwargs}
    # ImageNet statistics: what every smp 'imagenet' encoder was trained with, and harmless for random init.
    return NormalizedSegmenter(net, IMAGENET_MEAN, IMAGENET_STD, config)


def build_transformers(name: str, num_classes: int, id2label: dict[int, str]) -> NormalizedSegmenter:
    """``AutoModelForSemanticSegmentation`` from a hub id or folder, with a fresh head when the number of
    classes differs. Mean/std come from its image processor when it has one."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    try:
        net = AutoModelForSemanticSegmentation.from_pretrained(
            name, num_labels=num_classes, id2label={int(k): v for k, v in id2label.items()},
            label2id={v: int(k) for k, v in id2label.items()}, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {name!r}: not an smp architecture and no transformers semantic-segmentation "
                         f"model could be loaded ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0][:160]})") from None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        processor = AutoImageProcessor.from_pretrained(name)
        mean = tuple(getattr(processor, "image_mean", None) or mean)
        std = tuple(getattr(processor, "image_std", None) or std)
    except (OSError, ValueError):
        pass  # no preprocessor_config.json: ImageNet statistics, as SegFormer's processor uses
    return NormalizedSegmenter(net, mean, std, {"kind": "transformers", "name": name, "num_classes": num_classes})


def build_model(name: str, num_classes: int, id2label: dict[int, str], *, encoder: str, weights: str,
                encoder_depth: int = 5, decoder_channels: Optional[Sequence[int]] = None,
                extra: Optional[dict] = None) -> NormalizedSegmenter:
    """smp when ``name`` is an smp architecture, else transformers (hub id with a ``/`` or a folder)."""
    from . import checkpoint

    if checkpoint.is_saved(name):  # a run's model/ folder: its own architecture and weights
        return checkpoint.load_saved(name, num_classes)
    if name.lower() in architectures() or not (os.path.isdir(name) or "/" in name):
        return build_smp(name, encoder, weights, num_classes, encoder_depth=encoder_depth,
                         decoder_channels=decoder_channels, extra=extra)
    return build_transformers(name, num_classes, id2label)


def size_multiple(model: NormalizedSegmenter) -> int:
    """Input sides must be multiples of this (the encoder's output stride for smp models that require it)."""
    net = model.net
    if model.config["kind"] == "smp" and getattr(net, "requires_divisible_input_shape", False):
        return int(net.encoder.output_stride)
    return 1


def check_input_size(model: NormalizedSegmenter, size: int, what: str) -> None:
    """``UsageError`` unless the model maps a ``(2, 3, size, size)`` input to ``(2, K, size, size)`` logits.

    Divisibility is checked first (with the nearest valid sizes), then one eval-mode forward catches the
    rest (an input too small for a pooling pyramid, say).
    """
    multiple = size_multiple(model)
    if size % multiple:
        low, high = (size // multiple) * multiple, (size // multiple + 1) * multiple
        raise UsageError(f"{what}: {size} is not a multiple of {multiple}, which this architecture needs; "
                         f"use {low or high} or {high}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, size, size, device=model.mean.device))
    except RuntimeError as err:
        raise UsageError(f"{what}: the model cannot take {size}x{size} inputs "
                         f"({str(err).strip().splitlines()[0][:200]})") from None
    finally:
        model.train(was_training)
    if out.shape[-2:] != (size, size):
        raise UsageError(f"{what}: the model maps {size}x{size} inputs to {tuple(out.shape[-2:])} logits; "
                         f"use a multiple of {max(multiple, 32)}")


def freeze_unused(model: nn.Module, size: int) -> int:
    """Freeze (``requires_grad = False``) parameters that no output depends on; returns how many.

    smp encoders keep their deeper stages when ``encoder_depth < 5`` but never run them. Left trainable,
    they would make DDP fail ("parameters that were not used in producing loss") and get no weight decay.
    One eval-mode forward/backward on zeros (no BatchNorm statistics change) finds them.
    """
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, size, size, device=model.mean.device)).sum().backward()
    finally:
        model.train(was_training)
    unused = [p for p in model.parameters() if p.requires_grad and p.grad is None]
    for p in model.parameters():
        p.grad = None
    for p in unused:
        p.requires_grad_(False)
    return len(unused)


def save_model(model: NormalizedSegmenter, path: str, extra_config: Optional[dict] = None) -> None:
    """``net.save_pretrained(path)`` (smp or transformers format, loadable without samat) plus
    ``samat_segmentation.json`` (kind, mean/std, classes, input size) for :func:`load_model`."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.net.save_pretrained(str(folder))
    config = {**model.config, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
              **(extra_config or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))


def load_model(path: str) -> NormalizedSegmenter:
    """The model saved by :func:`save_model`, in eval mode."""
    folder = Path(path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config["kind"] == "smp":
        import segmentation_models_pytorch as smp

        net = smp.from_pretrained(str(folder))
    else:
        from transformers import AutoModelForSemanticSegmentation

        net = AutoModelForSemanticSegmentation.from_pretrained(str(folder))
    keep = {k: v for k, v in config.items() if k not in ("mean", "std")}
    return NormalizedSegmenter(net, config["mean"], config["std"], keep).eval()
