"""Segmentation models: names, weights, input sizes, normalisation inside, save/load, SegFormer, flags."""

from __future__ import annotations

import time
from dataclasses import fields

import pytest
import torch

from samat.common.config import RunArgs
from samat.common.errors import UsageError
from samat.segmentation import models
from samat.segmentation.task import SegmentationArgs, SegmentationTask
from segmentation_helpers import one_thread, save_shapes, tiny_task  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(classes: int = 3, **kw) -> models.NormalizedSegmenter:
    torch.manual_seed(0)
    return models.build_smp("unet", "resnet18", "none", classes, encoder_depth=3, decoder_channels=[16, 8, 8],
                            **kw)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UsageError, match=r"unknown architecture 'unett'; choose one of: unet, unetplusplus,.*fpn"):
        models.build_model("unett", 3, {}, encoder="resnet18", weights="none")
    with pytest.raises(UsageError, match=r"unknown encoder 'resnet19'; choose one of: .*resnet18.*tu-<any timm"):
        models.build_model("unet", 3, {}, encoder="resnet19", weights="none")
    with pytest.raises(UsageError, match="timm has no model 'not_a_net'"):
        models.build_model("unet", 3, {}, encoder="tu-not_a_net", weights="none")
    with pytest.raises(UsageError, match="resnet18 has weights: none, imagenet"):
        models.build_model("unet", 3, {}, encoder="resnet18", weights="imagenett")
    with pytest.raises(UsageError, match="unet takes no argument 'no_such_argument'.*decoder_attention_type"):
        models.build_smp("unet", "resnet18", "none", 3, extra={"no_such_argument": 1})
    with pytest.raises(UsageError, match="smp rejected the arguments"):
        models.build_smp("unet", "resnet18", "none", 3, extra={"decoder_attention_type": "nonsense"})


def test_imagenet_weights_offline_is_a_quick_one_line_error():
    started = time.perf_counter()  # conftest sets HF_HUB_OFFLINE=1: no 20 s of retries
    with pytest.raises(UsageError, match="could not fetch resnet18 weights .*use --encoder_weights none") as err:
        models.build_model("unet", 3, {}, encoder="resnet18", weights="imagenet")
    assert "\n" not in str(err.value) and time.perf_counter() - started < 20


def test_input_sizes_the_architecture_cannot_take():
    torch.manual_seed(0)
    fpn = models.build_smp("fpn", "resnet18", "none", 3)
    assert models.size_multiple(fpn) == 32
    with pytest.raises(UsageError, match="--image_size: 48 is not a multiple of 32.*use 32 or 64"):
        models.check_input_size(fpn, 48, "--image_size")
    models.check_input_size(fpn, 64, "--image_size")
    unet = tiny_unet()  # smp's U-Net interpolates skips, so any size works
    models.check_input_size(unet, 30, "--image_size")


def test_normalisation_inside_and_unused_stages_frozen():
    model = tiny_unet().eval()
    x = torch.rand(2, 3, 32, 32)
    expected = model.net((x - torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1))
                         / torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1))
    assert torch.allclose(model(x), expected) and model(x).shape == (2, 3, 32, 32)
    assert models.freeze_unused(model, 32) > 0  # ResNet-18's layer3/layer4 at encoder_depth 3
    assert not model.net.encoder.layer4[0].conv1.weight.requires_grad
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_save_and_load_round_trip(tmp_path):
    save_shapes(tmp_path / "d", n_train=4, n_test=4)
    task, built = tiny_task(tmp_path / "d")
    model = built.model.eval()
    task.save_model(model, str(tmp_path / "model"))
    loaded = models.load_model(str(tmp_path / "model"))
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert loaded.config["class_names"] == ["0", "1", "2"] and loaded.config["image_size"] == 32


def test_transformers_segformer_through_the_same_task(tmp_path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             num_attention_heads=[1, 1], decoder_hidden_size=16, patch_sizes=[7, 3],
                             strides=[4, 2], num_labels=5)
    SegformerForSemanticSegmentation(config).save_pretrained(str(tmp_path / "segformer"))
    save_shapes(tmp_path / "d", n_train=4, n_test=4)
    task = SegmentationTask(SegmentationArgs(image_size=32, check_samples=4))
    built = task.build(RunArgs(task="segmentation", dataset=str(tmp_path / "d"),
                               model=str(tmp_path / "segformer")), None)
    model = built.model.eval()
    assert model.config["kind"] == "transformers" and model.net.config.num_labels == 3  # new 3-class head
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 3, 32, 32)  # 1/4-resolution logits upsampled
    built.task.save_model(model, str(tmp_path / "saved"))
    assert torch.allclose(models.load_model(str(tmp_path / "saved"))(x), model(x), atol=1e-6)
    with pytest.raises(UsageError, match="no transformers semantic-segmentation model could be loaded"):
        models.build_model(str(tmp_path / "d"), 3, {}, encoder="resnet18", weights="none")


def test_flags_have_help_and_do_not_collide_with_common_ones():
    from transformers import HfArgumentParser

    from samat.common.config import EvalArgs, MethodArgs

    assert all(f.metadata.get("help") for f in fields(SegmentationArgs))
    parser = HfArgumentParser([RunArgs, MethodArgs, EvalArgs, SegmentationArgs])  # raises on a clash
    *_, seg = parser.parse_args_into_dataclasses(
        args=["--task", "segmentation", "--decoder_channels", "16", "8", "8", "--no_hflip", "--segpgd_linf", "none"])
    assert seg.decoder_channels == [16, 8, 8] and seg.hflip is False
    assert SegmentationTask(seg).extra_attacks() == []
    defaults = SegmentationTask.defaults
    for key in ("optimizer", "lr", "weight_decay", "lr_scheduler", "warmup_ratio", "epochs", "batch_size",
                "eval_batch_size", "train_eps", "cpu_max_train_samples", "cpu_max_eval_samples"):
        assert hasattr(defaults, key), key  # a typed TaskDefaults (common.config)


def test_cpu_epochs_shorten_only_an_unset_schedule_without_a_gpu():
    """The default preset trains a shorter schedule on CPU (cpu_epochs) and its full one on a GPU; a user's
    --epochs always wins, and a task without cpu_epochs trains the same everywhere."""
    from dataclasses import replace

    from samat.common.config import EvalArgs, resolve_defaults

    defaults = SegmentationTask.defaults
    assert defaults.cpu_epochs is not None and defaults.cpu_epochs < defaults.epochs

    def resolved(on_gpu, task_defaults=defaults, **flags):
        given = RunArgs(task="segmentation", **flags)
        run, _, notes = resolve_defaults(given, EvalArgs(), task_defaults, on_gpu=on_gpu)
        assert given == RunArgs(task="segmentation", **flags)  # the parsed flags are not changed
        return run.epochs, notes

    epochs, notes = resolved(on_gpu=False)
    assert epochs == defaults.cpu_epochs and any("--epochs defaults to" in n for n in notes)
    assert resolved(on_gpu=True) == (defaults.epochs, [])
    assert resolved(on_gpu=False, epochs=7.0)[0] == 7.0
    assert resolved(on_gpu=False, task_defaults=replace(defaults, cpu_epochs=None))[0] == defaults.epochs
