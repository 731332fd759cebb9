"""Semantic segmentation as a samat task: per-pixel cross-entropy, mIoU, PGD and SegPGD in pixel space.

``accelerate launch scripts/run.py --task segmentation --method sam`` trains an smp U-Net (ResNet-18
encoder, random init) on the embedded Fashion-MNIST canvases (:mod:`segmentation.canvas`); ``--dataset``,
``--model`` and the flags below take any Hugging Face segmentation dataset and any smp or transformers model.

Robustness evaluation: the engine's PGD-L-inf/L2 on the mean pixel cross-entropy, plus SegPGD (Gu et al.
2022, ECCV), which reweights the per-pixel loss at step ``t`` of ``T``: pixels the current adversarial input
still gets right weigh ``1 - lambda_t``, pixels already wrong weigh ``lambda_t``, with
``lambda_t = t / (2T)`` (``t`` counted from 0). Early steps thus spend their budget on flipping correct
pixels instead of pushing wrong ones further wrong, which lowers mIoU more than plain PGD for the same
steps.

TRADES works per pixel: the engine's KL term averages the per-pixel KL over batch and pixels.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samat.common.config import parse_eps_list
from samat.common.data import eval_subset
from samat.common.errors import UsageError
from samat.common.task import AttackSpec, AttackSurface, Task, TaskData

from samat.common.attacks import eval_mode

from . import data, evaluation, metrics, models
from .recipe import PRESETS, RECIPE

logger = logging.getLogger(__name__)


@dataclass
class SegmentationArgs:
    """Flags of ``--task segmentation`` (the mask column is the common ``--label_column``)."""

    encoder: str = field(
        default="resnet18",
        metadata={"help": "smp encoder for smp architectures (resnet18, resnet34, efficientnet-b0, mit_b0, ...) "
                  "or tu-<any timm model>."})
    encoder_weights: str = field(
        default="none",
        metadata={"help": "Encoder weights: none (random init) or imagenet (downloaded from the Hugging Face "
                  "hub; other tags the encoder has, e.g. ssl, also work)."})
    preset: str = field(
        default="default",
        metadata={"help": "Recipe for every flag left unset (model size, canvases, schedule, CPU subsets): "
                  "'default' (a U-Net that segments the embedded canvases, ~15 min on 2 CPU cores) or 'smoke' "
                  "(a tiny U-Net for a few steps: a test that the pipeline runs, NOT a result)."})
    encoder_depth: Optional[int] = field(
        default=None, metadata={"help": "Encoder stages used by smp models (3-5). Default: the preset's."})
    decoder_channels: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Decoder widths: one per encoder stage for unet/unetplusplus/manet, one number for "
                  "other smp architectures. Default: the preset's for its own U-Net, else smp's 256 128 64 32 "
                  "16 truncated to --encoder_depth."})
    model_kwargs: Optional[str] = field(
        default=None,
        metadata={"help": "Extra smp model arguments as JSON, e.g. '{\"decoder_attention_type\": \"scse\"}'."})
    image_column: Optional[str] = field(
        default=None,
        metadata={"help": "Image column. Default: found automatically (image, img, pixel_values, ...)."})
    num_classes: Optional[int] = field(
        default=None,
        metadata={"help": "Number of classes. Default: from the dataset's id2label.json, else 1 + the largest "
                  "mask value among the first --check_samples training masks."})
    ignore_index: int = field(
        default=255, metadata={"help": "Mask value that is neither trained on nor scored."})
    reduce_labels: bool = field(
        default=False,
        metadata={"help": "ADE20k-style masks: map 0 ('other') to --ignore_index and shift classes down by 1."})
    image_size: Optional[int] = field(
        default=None,
        metadata={"help": "Side of the square model input: images and masks are resized to it (train crops "
                  "are taken after random scaling). Default: the first image's shorter side rounded down to a "
                  "multiple the architecture accepts, at most 512 (64 for the embedded dataset)."})
    scale_min: Optional[float] = field(
        default=None, metadata={"help": "Train augmentation: smallest random scale (default: the preset's)."})
    scale_max: Optional[float] = field(
        default=None, metadata={"help": "Train augmentation: largest random scale (default: the preset's)."})
    hflip: bool = field(default=True, metadata={"help": "Train augmentation: random horizontal flips."})
    check_samples: int = field(
        default=256,
        metadata={"help": "Validate (sizes, mask values) this many examples of each split before training; "
                  "every example is validated again when read."})
    canvas_size: Optional[int] = field(
        default=None, metadata={"help": "Embedded dataset: canvas side in pixels (default: the preset's)."})
    canvas_train_size: Optional[int] = field(
        default=None, metadata={"help": "Embedded dataset: training canvases (default: the preset's)."})
    canvas_test_size: Optional[int] = field(
        default=None, metadata={"help": "Embedded dataset: test canvases (default: the preset's)."})
    canvas_seed: int = field(
        default=0, metadata={"help": "Embedded dataset: generator seed (independent of --seed)."})
    segpgd_linf: Optional[list[str]] = field(
        default=None,
        metadata={"help": "L-inf radii for SegPGD, e.g. 1/255 8/255; 'none' to skip. Default: the --eval_linf "
                  "list where the engine passes it, else 1/255 2/255 4/255 8/255."})


def segpgd_objective(ignore_index: int):
    """SegPGD's loss ``(logits (B, K, H, W), batch, step, steps) -> scalar`` to maximise.

    Per image: ``sum_pixels w * CE / (H W)`` with ``w = 1 - lambda`` on pixels the current logits classify
    correctly, ``lambda`` on wrong ones, ``lambda = step / (2 steps)``; summed over images (scale-free for
    sign and normalised steps). Ignored pixels weigh 0.
    """
    def objective(logits: Tensor, batch: dict, step: int, steps: int) -> Tensor:
        labels = batch["labels"]
        ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
        correct = logits.argmax(dim=1) == labels
        lam = step / (2 * steps)
        weight = torch.where(correct, 1.0 - lam, lam)
        return (weight * ce).sum() / labels[0].numel()

    return objective


@dataclass(frozen=True)
class SegmentationBuild:
    """What :meth:`SegmentationTask.build` learned that later methods read: the classes (flag, id2label.json
    or the masks), the input side, and the evaluation set (the task's own evaluation re-draws the engine's
    subset of it)."""

    num_classes: int
    class_names: list[str]
    image_size: int
    eval_dataset: data.SegmentationDataset


class SegmentationTask(Task):
    """Pixels ``(B, 3, H, W)`` in ``[0, 1]`` -> logits ``(B, K, H, W)``; labels ``(B, H, W)``."""

    recipe = RECIPE
    Args = SegmentationArgs

    def __init__(self, args: SegmentationArgs):
        super().__init__(args)
        if args.preset not in PRESETS:
            raise UsageError(f"--preset: unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
        self.preset = PRESETS[args.preset]
        self.defaults = self.preset.defaults  # the engine fills run flags left unset from these
        self.preset.fill(args)

    # -------------------------------------------------------------------------------------------- build

    def check_args(self) -> None:
        """Range checks of the segmentation flags, and ``--model_kwargs`` must parse (:meth:`model_kwargs`)."""
        a = self.args
        if not 0 < a.scale_min <= a.scale_max:
            raise UsageError(f"--scale_min {a.scale_min} / --scale_max {a.scale_max}: need 0 < min <= max")
        if a.num_classes is not None and a.num_classes < 2:
            raise UsageError(f"--num_classes: {a.num_classes} must be >= 2")
        if a.image_size is not None and a.image_size < 1:
            raise UsageError(f"--image_size: {a.image_size} must be >= 1")
        if a.check_samples < 0:
            raise UsageError(f"--check_samples: {a.check_samples} must be >= 0")
        if a.decoder_channels is not None and any(c < 1 for c in a.decoder_channels):
            raise UsageError(f"--decoder_channels: {a.decoder_channels} must be positive")
        self.model_kwargs()

    def model_kwargs(self) -> dict:
        """``--model_kwargs`` as a dict (``{}`` when not given); ``UsageError`` unless it is a JSON object."""
        if self.args.model_kwargs is None:
            return {}
        try:
            extra = json.loads(self.args.model_kwargs)
        except json.JSONDecodeError as err:
            raise UsageError(f"--model_kwargs: not JSON ({err.msg}); write e.g. '{{\"decoder_attention_type\": "
                             f"\"scse\"}}'") from None
        if not isinstance(extra, dict):
            raise UsageError("--model_kwargs: must be a JSON object")
        return extra

    def _resolve_classes(self, splits: data.SegmentationSplits) -> tuple[int, list[str]]:
        """Number of classes (flag, else id2label.json, else the masks) and their names."""
        a = self.args
        num_classes = a.num_classes
        if num_classes is None and splits.id2label:
            num_classes = len(splits.id2label)
        if num_classes is None:
            limit = max(a.check_samples, 1)
            num_classes = data.infer_num_classes(splits.train, splits.mask_column, a.ignore_index,
                                                 a.reduce_labels, limit)
            logger.info("--num_classes not given: %d from the first %d training masks (pass --num_classes if "
                        "a class may be missing from them)", num_classes, min(limit, len(splits.train)))
        if 0 <= a.ignore_index < num_classes:
            raise UsageError(f"--ignore_index {a.ignore_index} is a class index (classes are 0..{num_classes - 1})"
                             f"; choose a value outside that range, e.g. 255")
        id2label = splits.id2label or {}
        return num_classes, [id2label.get(i, str(i)) for i in range(num_classes)]

    def build(self, run: Any, accelerator: Any) -> TaskData:
        """Load (or build) the data, find columns and classes, build the model, check the input size."""
        a = self.args
        self.check_args()
        extra = self.model_kwargs()
        splits = data.load_splits(run.dataset, run.dataset_config, run.train_split, run.eval_split,
                                  a.image_column, run.label_column, canvas_size=a.canvas_size,
                                  canvas_train_size=a.canvas_train_size, canvas_test_size=a.canvas_test_size,
                                  canvas_seed=a.canvas_seed)
        if len(splits.train) == 0 or len(splits.eval) == 0:
            raise UsageError("the train or eval split is empty")
        num_classes, names = self._resolve_classes(splits)
        # Bad masks fail here, in seconds, before a model is built.
        for split, rows in ((run.train_split, splits.train), (splits.eval_split, splits.eval)):
            data.validate_prefix(rows, splits.image_column, splits.mask_column, num_classes, a.ignore_index,
                                 a.reduce_labels, a.check_samples, split)

        decoder = a.decoder_channels
        if decoder is None:
            decoder = self.preset.decoder_for(run.model or "unet", a.encoder_depth)
        model = models.build_model(run.model or "unet", num_classes, dict(enumerate(names)), encoder=a.encoder,
                                   weights=a.encoder_weights, encoder_depth=a.encoder_depth,
                                   decoder_channels=decoder, extra=extra)
        multiple = models.size_multiple(model)
        if a.image_size is None:
            height, width = data.first_image_size(splits.train, splits.image_column)
            size = data.default_image_size(height, width, multiple)
            if (height, width) != (size, size):
                logger.info("--image_size not given: %d (from the first %dx%d image)", size, width, height)
        else:
            size = a.image_size
        models.check_input_size(model, size, "--image_size")
        frozen = models.freeze_unused(model, size)
        if frozen:
            logger.info("froze %d parameter tensors the model never uses (encoder stages beyond "
                        "--encoder_depth)", frozen)

        common = dict(num_classes=num_classes, ignore_index=a.ignore_index, size=size, reduce=a.reduce_labels)
        train = data.SegmentationDataset(splits.train, splits.image_column, splits.mask_column, train=True,
                                         scale=(a.scale_min, a.scale_max), hflip=a.hflip, split=run.train_split, seed=run.seed,
                                         **common)
        evaluation = data.SegmentationDataset(splits.eval, splits.image_column, splits.mask_column, train=False,
                                              split=splits.eval_split, **common)
        info = {
            "preset": a.preset, "preset_summary": self.preset.summary,
            "dataset": splits.name, "eval_split": splits.eval_split, "image_column": splits.image_column,
            "mask_column": splits.mask_column, "num_classes": num_classes, "class_names": names,
            "ignore_index": a.ignore_index, "image_size": size, "model": model.config.get("arch") or
            model.config.get("name"), "encoder": model.config.get("encoder"),
            "encoder_weights": model.config.get("encoder_weights"),
            "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        learned = SegmentationBuild(num_classes=num_classes, class_names=names, image_size=size,
                                    eval_dataset=evaluation)
        return TaskData(model=model, train_dataset=train, eval_dataset=evaluation, collate_fn=data.collate,
                        info=info, task=self.learned(learned))

    # ------------------------------------------------------------------------------------ model calls

    def forward(self, model: nn.Module, batch: dict) -> Tensor:
        """Logits ``(B, K, H, W)`` for ``batch["pixel_values"]`` ``(B, 3, H, W)`` in ``[0, 1]``."""
        return model(batch["pixel_values"])

    def surface(self, model: nn.Module, batch: dict) -> AttackSurface:
        """Pixel space: one L-inf/L2 ball per image over all of its pixels and channels, box ``[0, 1]``."""
        x = batch["pixel_values"].detach()
        return AttackSurface(x=x, forward=lambda delta: model(x + delta))

    def loss(self, logits: Tensor, batch: dict) -> Tensor:
        """Mean cross-entropy over the batch's non-ignored pixels (0 when every pixel is ignored)."""
        labels = batch["labels"]
        total = F.cross_entropy(logits.float(), labels, ignore_index=self.args.ignore_index, reduction="sum")
        return total / (labels != self.args.ignore_index).sum().clamp_min(1)

    def example_losses(self, logits: Tensor, batch: dict) -> Tensor:
        """``(B,)``: each image's mean cross-entropy over its non-ignored pixels (0 when all are ignored)."""
        labels = batch["labels"]
        ce = F.cross_entropy(logits.float(), labels, ignore_index=self.args.ignore_index, reduction="none")
        return ce.flatten(1).sum(1) / (labels != self.args.ignore_index).flatten(1).sum(1).clamp_min(1)

    def loss_mask(self, batch: dict) -> Tensor:
        """``(B, H, W)`` bool: the pixels that count (not ``ignore_index``), for TRADES' per-pixel KL."""
        return batch["labels"] != self.args.ignore_index

    # ---------------------------------------------------------------------------------------- metrics

    def _num_classes(self, logits: Tensor) -> int:
        return self.state.num_classes if self.state is not None else logits.shape[1]

    def _class_names(self) -> Optional[list[str]]:
        return self.state.class_names if self.state is not None else None

    def example_stats(self, logits: Tensor, batch: dict) -> Tensor:
        """Per-image pixel counts ``(B, K, 3)`` float: tp, fp, fn per class (see :mod:`.metrics`)."""
        return metrics.confusion_counts(logits.argmax(dim=1), batch["labels"], self._num_classes(logits),
                                        self.args.ignore_index)

    def compute_metrics(self, summed_stats: Tensor) -> dict[str, float]:
        """``miou`` (headline), ``pixel_accuracy`` and ``iou/<class>`` for classes present in the set."""
        return metrics.segmentation_metrics(summed_stats, self._class_names())

    # ---------------------------------------------------------------------------------------- attacks

    def extra_attacks(self, evals: Any = None) -> list[AttackSpec]:
        """SegPGD in L-inf at ``--segpgd_linf`` (default: ``evals.eval_linf`` when given, else the task's
        L-inf list)."""
        values = self.args.segpgd_linf
        if values is None and evals is not None:
            values = evals.eval_linf
        eps = parse_eps_list(values, self.default_eval_linf, pixel_space=True, flag="--segpgd_linf")
        if not eps:
            return []
        return [AttackSpec("segpgd-linf", "linf", eps, segpgd_objective(self.args.ignore_index))]

    # ------------------------------------------------------------------------- baseline and pictures

    def extra_evaluation(self, model: nn.Module, accelerator: Any, run: Any) -> dict:
        """``metrics["segmentation"]``: the majority-class baseline on the evaluation masks and whether the
        model is within ``evaluation.COLLAPSE_MARGIN`` of it (then also a ``"warnings"`` line), a 95 %
        bootstrap interval of the clean mIoU over images, and ``figure``: the run folder's
        ``segmentations.png`` (input, truth, clean prediction, PGD and SegPGD at the AT radius).

        Runs on the run's evaluation subset (the engine's, :func:`samat.common.data.eval_subset`);
        one clean pass plus PGD and SegPGD on :data:`evaluation.FIGURE_IMAGES` images.
        """
        if self.state is None:
            return {}
        eval_set = eval_subset(self.state.eval_dataset, run)
        device = next(model.parameters()).device
        num_classes, ignore = self.state.num_classes, self.args.ignore_index
        loader = torch.utils.data.DataLoader(eval_set, batch_size=run.eval_batch_size or 32, shuffle=False,
                                             collate_fn=data.collate)
        per_image, histogram = [], torch.zeros(num_classes, dtype=torch.float64)
        with eval_mode(model), torch.no_grad():
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                per_image.append(self.example_stats(self.forward(model, batch), batch).cpu())
                histogram += evaluation.label_histogram(batch["labels"].cpu(), num_classes, ignore)
        per_image = torch.cat(per_image)
        clean = metrics.segmentation_metrics(per_image.sum(dim=0), self.state.class_names)
        baseline = evaluation.majority_baseline(histogram, self.state.class_names)
        low, high = evaluation.bootstrap_miou(per_image, seed=run.seed)
        warning = evaluation.collapse_warning(clean["miou"], baseline)
        summary = {"majority_baseline": baseline, "near_majority_baseline": warning is not None,
                   "collapse_margin": evaluation.COLLAPSE_MARGIN, "clean_miou": clean["miou"],
                   "clean_miou_ci95": [low, high], "eval_images": len(eval_set), "figure": None}
        warnings = [warning] if warning else []
        if accelerator is None or accelerator.is_main_process:
            try:
                summary["figure"] = self.draw(model, eval_set, run)
            except Exception as err:  # a picture is never worth the run's results
                logger.warning("segmentation picture not written: %s: %s", type(err).__name__, err)
                warnings.append(f"segmentation: {evaluation.FIGURE_FILE} not written ({type(err).__name__})")
        out: dict = {"segmentation": summary}
        if warnings:
            out["warnings"] = warnings
        return out

    def draw(self, model: nn.Module, eval_set: Any, run: Any) -> str:
        """Write ``<output_dir>/segmentations.png`` for the first :data:`evaluation.FIGURE_IMAGES` images of
        ``eval_set``: clean, PGD-L-inf and SegPGD (10 steps of 2.5 eps / 10 from a random start, last
        iterate) at the preset's AT radius. Returns the file name, relative to the run folder."""
        from pathlib import Path

        from samat.common.attacks import pgd
        from samat.common.config import parse_eps

        label = self.defaults.train_eps_linf
        eps = parse_eps(label, pixel_space=True, flag="train_eps_linf")
        steps = 10
        n = min(evaluation.FIGURE_IMAGES, len(eval_set))
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in data.collate([eval_set[i] for i in range(n)]).items()}
        segpgd = segpgd_objective(self.args.ignore_index)
        objectives = {"PGD": lambda logits, step: self.loss(logits, batch),
                      "SegPGD": lambda logits, step: segpgd(logits, batch, step, steps)}
        columns = []
        # manual_seed reseeds the CUDA generator too: fork it as well, so the figure leaves no trace on training
        cuda = [device.index or 0] if device.type == "cuda" else []
        with eval_mode(model), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(run.seed)
            with torch.no_grad():
                columns.append(("clean", batch["pixel_values"], self.forward(model, batch).argmax(dim=1)))
            for name, objective in objectives.items():
                surface = self.surface(model, batch)
                delta = pgd(surface, objective, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm="linf")
                with torch.no_grad():
                    columns.append((f"{name} {label}", surface.x + delta, surface.forward(delta).argmax(dim=1)))
        path = Path(run.output_dir) / evaluation.FIGURE_FILE
        evaluation.draw_segmentations(
            str(path), batch["pixel_values"], batch["labels"], columns, self._class_names(), self.args.ignore_index,
            title=f"{run.method}, seed {run.seed}: L-inf {label}, {steps} steps (last iterate)")
        return evaluation.FIGURE_FILE

    def extra_columns(self, metrics: dict) -> dict[str, float]:
        """``segmentation/majority_baseline_miou`` (and pixel accuracy), ``segmentation/near_majority_baseline``
        (1/0), the clean mIoU's bootstrap interval, and ``segmentation/iou/<class>`` (clean)."""
        seg = metrics.get("segmentation") or {}
        out: dict[str, float] = {}
        baseline = seg.get("majority_baseline")
        if baseline:
            out["segmentation/majority_baseline_miou"] = float(baseline["miou"])
            out["segmentation/majority_baseline_pixel_accuracy"] = float(baseline["pixel_accuracy"])
            out["segmentation/near_majority_baseline"] = float(bool(seg.get("near_majority_baseline")))
        if seg.get("clean_miou_ci95"):
            out["segmentation/clean_miou_ci95_low"], out["segmentation/clean_miou_ci95_high"] = (
                float(v) for v in seg["clean_miou_ci95"])
        for key, value in (metrics.get("clean") or {}).items():
            if key.startswith("iou/"):
                out[f"segmentation/{key}"] = float(value)
        return out

    def save_model(self, model: nn.Module, path: str) -> None:
        """smp/transformers ``save_pretrained`` plus ``samat_segmentation.json`` (see ``models.load_model``).
        Needs the task as built (``TaskData.task``)."""
        if self.state is None:
            raise ValueError("save_model needs the built task (TaskData.task): classes and size come from build")
        models.save_model(model, path, {"class_names": self.state.class_names, "image_size": self.state.image_size,
                                        "ignore_index": self.args.ignore_index})

    def load_model(self, path: str) -> nn.Module:
        return models.load_model(path)
