"""Image classification: pixels in ``[0, 1]`` are the attack surface, accuracy is the metric."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor, nn

from samat.common.data import find_column, pick_split
from samat.common.errors import UsageError
from samat.common.classification import ClassificationTask
from samat.common.task import AttackSurface, TaskData

from . import data as vdata
from . import models as vmodels
from .models import build_model, model_channels
from .recipe import RECIPE


@dataclass
class VisionArgs:
    image_column: Optional[str] = field(
        default=None, metadata={"help": "Image column. Default: found by name ('image', 'img') or type."}
    )
    image_size: Optional[int] = field(
        default=None,
        metadata={"help": "Resize images to this side. Default: the model's input size for pretrained hub "
                  "models, the data's own size otherwise."},
    )
    augment: bool = field(
        default=True, metadata={"help": "Random crop with padding + horizontal flip on training images."}
    )
    pretrained: bool = field(
        default=False, metadata={"help": "Load pretrained weights for timm:<name> models (needs the hub)."}
    )
    width: Optional[int] = field(
        default=None, metadata={"help": "Channels of the first stage of built-in models (preact_resnet18: 64)."}
    )


@dataclass(frozen=True)
class VisionBuild:
    """What :meth:`VisionTask.build` learned that :meth:`VisionTask.save_model` records: the model as first
    built (name, classes, channels, width, input size, class names; a saved folder keeps its own recipe)."""

    model_spec: dict


class VisionTask(ClassificationTask):
    recipe = RECIPE
    Args = VisionArgs
    default_model = "preact_resnet18"
    default_dataset = "fashion_mnist"

    def check_args(self) -> None:
        args: VisionArgs = self.args
        if args.image_size is not None and not 4 <= args.image_size <= 1024:
            raise UsageError(f"--image_size: {args.image_size} must be in [4, 1024]")
        if args.width is not None and not 1 <= args.width <= 1024:
            raise UsageError(f"--width: {args.width} must be in [1, 1024]")

    def build(self, run: Any, accelerator: Any) -> TaskData:
        args: VisionArgs = self.args
        model_name = run.model or self.default_model
        dataset_name = run.dataset or self.default_dataset
        self.check_args()
        import datasets

        dataset = vdata.load_dataset_dict(dataset_name, run.dataset_config)
        train_split = pick_split(dataset, run.train_split, ("train",), "--train_split")
        eval_split = pick_split(dataset, run.eval_split, ("test", "validation", "valid"), "--eval_split")
        features = dataset[train_split].features
        of_type = lambda kind: [n for n, f in features.items() if isinstance(f, kind)]  # noqa: E731
        image_col = find_column(features, args.image_column, vdata.IMAGE_COLUMNS, "image", "--image_column",
                                of_type(datasets.Image))
        label_col = find_column(features, run.label_column, vdata.LABEL_COLUMNS, "label", "--label_column",
                                of_type(datasets.ClassLabel))
        label_feature = features[label_col]
        if isinstance(label_feature, datasets.ClassLabel):
            class_names = list(label_feature.names)
        else:
            labels = dataset[train_split][label_col]
            if not all(isinstance(v, int) and v >= 0 for v in labels[:1000]):
                raise UsageError(f"--label_column {label_col!r} must hold class indices 0..K-1")
            class_names = [str(i) for i in range(max(labels) + 1)]
        data_channels = vdata.to_chw_float(dataset[train_split][0][image_col]).shape[0]
        channels = model_channels(model_name, data_channels)
        model, model_size = build_model(model_name, len(class_names), channels, pretrained=args.pretrained,
                                        width=args.width)
        size = args.image_size or model_size
        saved = vmodels.read_spec(model_name) if vmodels.is_saved_model(model_name) else None
        spec = {"name": saved["name"] if saved else model_name, "num_classes": len(class_names),
                "channels": channels, "width": saved.get("width") if saved else args.width,
                "image_size": size, "class_names": class_names}
        train = vdata.ImageClassification(dataset[train_split], image_col, label_col, channels, size,
                                          augment=args.augment, seed=run.seed)
        evals = vdata.ImageClassification(dataset[eval_split], image_col, label_col, channels, size,
                                          augment=False)
        info = {"model": model_name, "dataset": dataset_name, "train_split": train_split, "eval_split": eval_split,
                "num_classes": len(class_names), "class_names": class_names, "channels": channels,
                "image_size": size or list(evals[0]["pixel_values"].shape[-2:]),
                "parameters": sum(p.numel() for p in model.parameters())}
        spec["input_size"] = info["image_size"]  # the size trained on (timm's config.json records it)
        return TaskData(model=model, train_dataset=train, eval_dataset=evals, collate_fn=vdata.collate, info=info,
                        task=self.learned(VisionBuild(model_spec=spec)))

    def forward(self, model: nn.Module, batch: dict) -> Tensor:
        return model(batch["pixel_values"])

    def surface(self, model: nn.Module, batch: dict) -> AttackSurface:
        x = batch["pixel_values"].detach()
        return AttackSurface(x=x, forward=lambda delta: model(x + delta), bounds=(0.0, 1.0))


    def save_model(self, model: nn.Module, path: str) -> None:
        """``samat_model.json`` (name, classes, channels, width, input size, normalisation) and the weights
        (``model.safetensors``, or transformers ``save_pretrained``); see :func:`vision.models.save_model`.
        Needs the task as built (``TaskData.task``)."""
        if self.state is None:
            raise ValueError("save_model needs the built task (TaskData.task): the model spec comes from build")
        vmodels.save_model(model, path, self.state.model_spec)

    def load_model(self, path: str) -> nn.Module:
        return vmodels.load_model(path)[0]
