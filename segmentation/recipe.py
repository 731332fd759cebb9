"""The segmentation task's recipe (:class:`samat.common.recipe.TaskRecipe`) and its named model/data presets
(``--preset``): torch-free, read by the task class, the sweep and reproduce grids, model cards and the
evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from samat.common.recipe import TaskDefaults, TaskRecipe


@dataclass(frozen=True)
class Preset:
    """A named recipe: the engine's :class:`TaskDefaults` plus the segmentation flags it sets when unset.

    ``decoder_channels`` applies to the preset's own U-Net only (``--model unet`` at the preset's
    ``encoder_depth``); any other model keeps smp's defaults.
    """

    summary: str
    defaults: TaskDefaults
    encoder_depth: int
    decoder_channels: tuple[int, ...]
    canvas_size: int
    canvas_train_size: int
    canvas_test_size: int
    scale: tuple[float, float]

    def fill(self, args: Any) -> None:
        """Set the flags of ``args`` (a ``SegmentationArgs``) left at ``None`` (except ``decoder_channels``, see :meth:`decoder_for`)."""
        for name in ("encoder_depth", "canvas_size", "canvas_train_size", "canvas_test_size"):
            if getattr(args, name) is None:
                setattr(args, name, getattr(self, name))
        if args.scale_min is None:
            args.scale_min = min(self.scale[0], args.scale_max) if args.scale_max is not None else self.scale[0]
        if args.scale_max is None:
            args.scale_max = max(self.scale[1], args.scale_min)

    def decoder_for(self, model: str, encoder_depth: int) -> Optional[list[int]]:
        if model.lower() == "unet" and encoder_depth == self.encoder_depth:
            return list(self.decoder_channels)
        return None


# The default recipe, chosen by measurement (RESULTS.md, "Segmentation"): a ResNet-18 U-Net cut to 4 encoder
# stages (3.6 M trained parameters) on 48 px canvases. Its last decoder stages keep 32 channels: with 8 (smp's
# widths scaled down) the per-pixel class decision starves and the model learns to find items long before it
# learns to name them. Random-init U-Nets converge far faster with AdamW than with SGD; small batches (16)
# gave more mIoU per CPU second than 32, and scale/crop augmentation is left out because the canvases
# already place and size items at random.
# Schedule: on CPU, 5 epochs of the 8,000-canvas subset (2,500 steps, 14 minutes with evaluation on 2 idle
# cores) reach clean mIoU 0.42-0.44; 10 epochs reach 0.47 in twice the time (RESULTS.md, section D). A GPU
# trains the full 10 epochs on all 20,000 canvases.
# PGD-AT: the L-inf budget of segmentation AT papers (8/255, Xu et al. 2021; Gu et al. 2022) with 3 steps
# of eps/2 (SegPGD-AT's 3 training steps), 4 passes per step instead of PGD-10's 11.
PRESETS: dict[str, Preset] = {
    "default": Preset(
        summary="ResNet-18 U-Net (4 stages, decoder 128-64-32-32) on 48 px canvases, 10 epochs; CPU: 5 epochs "
                "on 8,000 train / 400 eval canvases",
        defaults=TaskDefaults(
            optimizer="adamw", lr=2e-3, weight_decay=1e-4, lr_scheduler="cosine", warmup_ratio=0.05,
            epochs=10, batch_size=16, eval_batch_size=50, train_eps_linf="8/255", train_eps_l2="0.5",
            train_steps=3, train_alpha_ratio=0.5, cpu_max_train_samples=8000, cpu_max_eval_samples=400,
            cpu_sharpness_examples=64, cpu_epochs=5),
        encoder_depth=4, decoder_channels=(128, 64, 32, 32), canvas_size=48, canvas_train_size=20000,
        canvas_test_size=3000, scale=(1.0, 1.0)),
    "smoke": Preset(
        summary="SMOKE TEST ONLY: a tiny U-Net (3 stages, decoder 16-8-8) for a few steps on 64 canvases",
        defaults=TaskDefaults(
            optimizer="adamw", lr=1e-3, weight_decay=1e-4, lr_scheduler="cosine", warmup_ratio=0.05,
            epochs=1, batch_size=8, eval_batch_size=16, train_eps_linf="8/255", train_eps_l2="0.5",
            train_steps=3, train_alpha_ratio=0.5, cpu_max_train_samples=64, cpu_max_eval_samples=16,
            cpu_sharpness_examples=16),
        encoder_depth=3, decoder_channels=(16, 8, 8), canvas_size=48, canvas_train_size=64,
        canvas_test_size=32, scale=(0.75, 1.25)),
}



RECIPE = TaskRecipe(
    name="segmentation",
    headline_metric="miou",
    pixel_space=True,
    input_key="pixel_values",
    pipeline_tag="image-segmentation",
    saved_config="samat_segmentation.json",
    defaults=PRESETS["default"].defaults,
    eps_grid_linf=("1/255", "2/255", "4/255", "8/255"),
    eps_grid_l2=("0.125", "0.25", "0.5", "1.0"),
    # L-inf only by default: segmentation robustness is reported in L-inf (Xu et al. 2021, Gu et al. 2022),
    # and on a CPU every extra radius costs as much as the training run's last minutes; --eval_l2 adds L2.
    eval_linf=("1/255", "2/255", "4/255", "8/255"),
    eval_l2=(),
)
