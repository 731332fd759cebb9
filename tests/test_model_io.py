"""Saved models reload from their folder alone with bit-identical logits (every model kind), the run-level
reload and the model card, and --push_to_hub refused offline."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from samat.common.errors import UsageError
from samat.common.model_io import check_push_to_hub, load_run_model, model_card
from samat.common.results import RunResults
from samat.vision import models as vmodels
from samat.vision.task import VisionArgs, VisionBuild, VisionTask


def _scramble_batchnorm(model: torch.nn.Module) -> None:
    """Non-default BatchNorm statistics, so a reload that dropped the buffers would show."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _vision_roundtrip(model, spec, folder, x):
    model.eval()
    vmodels.save_model(model, folder, spec)
    loaded, saved = vmodels.load_model(folder)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training and saved["class_names"] == spec["class_names"]
    assert saved["mean"] == model.mean.flatten().tolist() and saved["std"] == model.std.flatten().tolist()
    return loaded


@pytest.mark.parametrize("name,channels,width", [("small_cnn", 1, 4), ("preact_resnet18", 3, 2)])
def test_builtin_models_reload_bit_identical(tmp_path, name, channels, width):
    torch.manual_seed(0)
    model, _ = vmodels.build_model(name, 4, channels, width=width)
    _scramble_batchnorm(model)
    spec = {"name": name, "num_classes": 4, "channels": channels, "width": width, "image_size": None,
            "class_names": list("abcd")}
    x = torch.rand(3, channels, 8, 8)
    _vision_roundtrip(model, spec, tmp_path / "m", x)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors", "samat_model.json"]
    # the saved folder is a --model: same classes reload, other classes are refused
    again, size = vmodels.build_model(str(tmp_path / "m"), 4, channels)
    assert size is None and torch.equal(again.eval()(x), model(x))
    with pytest.raises(UsageError, match="predicts 4 classes, but the dataset has 10"):
        vmodels.build_model(str(tmp_path / "m"), 10, channels)


def test_transformers_vit_reloads_and_from_pretrained_works(tmp_path):
    from transformers import AutoModelForImageClassification, ViTConfig

    ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
              num_attention_heads=2, intermediate_size=32, num_labels=3).save_pretrained(tmp_path / "cfg")
    torch.manual_seed(0)
    model, size = vmodels.build_model(str(tmp_path / "cfg"), 3, 3)
    assert size == 8
    spec = {"name": str(tmp_path / "cfg"), "num_classes": 3, "channels": 3, "width": None, "image_size": 8,
            "class_names": ["cat", "dog", "emu"]}
    x = torch.rand(2, 3, 8, 8)
    _vision_roundtrip(model, spec, tmp_path / "m", x)
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "m").eval()  # no samat needed
    assert plain.config.id2label == {0: "cat", 1: "dog", 2: "emu"}
    with torch.no_grad():
        assert torch.equal(plain(pixel_values=(x - model.mean) / model.std).logits, model(x))


def _timm_loads_it(folder, samat_model, x):
    """timm's own loader (the one behind ``timm.create_model("hf-hub:...")``, from a local folder, offline)
    rebuilds the bare network; normalised with the mean/std of its data config it gives samat's logits."""
    import timm

    net = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data = timm.data.resolve_data_config({}, model=net)
    mean = torch.tensor(data["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net((x - mean) / std), samat_model.eval()(x), rtol=1e-5, atol=1e-6)
    return net, data


def test_timm_model_reloads_bit_identical_and_with_timm(tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model, _ = vmodels.build_model("timm:resnet10t", 2, 1)
    _scramble_batchnorm(model)
    spec = {"name": "timm:resnet10t", "num_classes": 2, "channels": 1, "width": None, "image_size": None,
            "input_size": [16, 16], "class_names": ["no", "yes"]}
    x = torch.rand(2, 1, 16, 16)
    _vision_roundtrip(model, spec, tmp_path / "m", x)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors",
                                                                 "samat_model.json"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architecture"] == "resnet10t" and config["num_classes"] == 2
    assert config["label_names"] == ["no", "yes"] and config["model_args"]["in_chans"] == 1
    net, data = _timm_loads_it(tmp_path / "m", model, x)
    assert net.num_classes == 2 and data["input_size"] == (1, 16, 16) and data["crop_pct"] == 1.0


def test_timm_model_timm_cannot_export_still_reloads_with_samat(tmp_path, monkeypatch):
    """A timm model whose arguments timm refuses to export keeps its trained weights in samat's own format."""
    timm = pytest.importorskip("timm")

    def refuse(*args, **kwargs):
        raise ValueError("Model argument 'act_layer' is not serializable")

    monkeypatch.setattr(timm.models, "save_for_hf", refuse)
    torch.manual_seed(0)
    model, _ = vmodels.build_model("timm:resnet10t", 2, 1)
    spec = {"name": "timm:resnet10t", "num_classes": 2, "channels": 1, "width": None, "image_size": None,
            "class_names": ["no", "yes"]}
    _vision_roundtrip(model, spec, tmp_path / "m", torch.rand(2, 1, 16, 16))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors", "samat_model.json"]


def test_timm_run_folder_loads_with_timm_and_samat(tmp_path):
    """A whole ``scripts/run.py`` run with a timm model: its ``model/`` is timm's hub layout (config.json +
    model.safetensors) under a ``library_name: timm`` card, and loads with timm and with samat alike."""
    pytest.importorskip("timm")
    from test_run_vision import FAST, run

    out = tmp_path / "run"
    fast = [a for a in FAST if a not in ("--model", "small_cnn", "--width", "8")]
    proc = run("--task", "vision", "--method", "sam", "--max_steps", "1", *fast, "--model", "timm:resnet10t",
               "--max_train_samples", "16", "--max_eval_samples", "8", "--batch_size", "8",
               "--sharpness_examples", "0", "--cpu_threads", "1", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in (out / "model").iterdir()} == {"config.json", "model.safetensors", "samat_model.json",
                                                           "README.md"}
    card = (out / "model" / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["library_name"] == "timm"
    _, model, info = load_run_model(out)
    x = torch.rand(3, 1, 28, 28)  # fashion_mnist's images, as trained
    _, data = _timm_loads_it(out / "model", model, x)
    assert data["input_size"] == (1, 28, 28)


def test_text_model_reloads_bit_identical_with_label_names(tmp_path):
    from samat.text import models as text_models
    from samat.text.task import TextArgs, TextBuild, TextTask
    from text_helpers import tiny_checkpoint

    folder = tiny_checkpoint(tmp_path / "tiny")
    loaded = text_models.load_classifier(str(folder), ["neg", "pos"], 32)
    task = TextTask(TextArgs()).learned(TextBuild(tokenizer=loaded.tokenizer, columns=None, attack_examples=None,
                                                  info={"label_names": ["neg", "pos"]}))
    task.save_model(loaded.model, str(tmp_path / "saved"))
    other = TextTask(TextArgs())
    again = other.load_model(str(tmp_path / "saved"))
    batch = loaded.tokenizer(["a good film .", "the plot was dull ."], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, again(**batch).logits)
    assert again.config.id2label == {0: "neg", 1: "pos"} and other.state is None  # loading learns nothing


def test_segmentation_unet_reloads_bit_identical(tmp_path):
    from samat.segmentation import models as smodels
    from samat.segmentation.task import SegmentationArgs, SegmentationBuild, SegmentationTask

    torch.manual_seed(0)
    model = smodels.build_smp("unet", "resnet18", "none", 3, encoder_depth=3, decoder_channels=[16, 8, 8])
    _scramble_batchnorm(model)
    model.eval()
    task = SegmentationTask(SegmentationArgs()).learned(SegmentationBuild(
        num_classes=3, class_names=["background", "square", "disc"], image_size=32, eval_dataset=None))
    task.save_model(model, str(tmp_path / "m"))
    again = task.load_model(str(tmp_path / "m"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert (tmp_path / "m" / "config.json").is_file()  # smp's own save_pretrained format
    # the saved folder is a --model; another number of classes is refused
    assert smodels.build_model(str(tmp_path / "m"), 3, {}, encoder="resnet18", weights="none") is not None
    with pytest.raises(UsageError, match="predicts 3 classes, but the dataset has 5"):
        smodels.build_model(str(tmp_path / "m"), 5, {}, encoder="resnet18", weights="none")


def _results(method: str = "sam") -> RunResults:
    return RunResults.from_dict({
        "task": "vision", "method": method, "headline_metric": "accuracy",
        "metrics": {"clean": {"accuracy": 0.9}, "robust": {"pgd-linf": {"8/255": {"accuracy": 0.4}}}},
        "config": {"run": {"lr": 0.1, "seed": 0, "model": "small_cnn"}, "task": {"width": 4},
                   "eval": {"eval_steps": 10}},
        "method_resolved": {"method": method, "rho": 0.05},
        "data": {"dataset": "fashion_mnist", "eval_split": "test", "eval_examples": 64, "num_classes": 4,
                 "class_names": list("abcd")},
        "schema_version": 1})


def test_load_run_model_needs_only_the_folder(tmp_path):
    run = tmp_path / "run"
    torch.manual_seed(0)
    model, _ = vmodels.build_model("small_cnn", 4, 1, width=4)
    task = VisionTask(VisionArgs(width=4)).learned(VisionBuild(model_spec={
        "name": "small_cnn", "num_classes": 4, "channels": 1, "width": 4, "image_size": None,
        "class_names": list("abcd")}))
    task.save_model(model.eval(), str(run / "model"))
    _results().write(run / "results.json")
    task2, loaded, info = load_run_model(run)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert task2.name == "vision" and task2.args.width == 4 and info["method"] == "sam"

    (run / "model" / "model.safetensors").unlink()
    (run / "model" / "samat_model.json").unlink()
    torch.save(model.state_dict(), run / "model" / "model.pt")  # what older versions saved
    with pytest.raises(UsageError, match="bare state_dict"):
        load_run_model(run)
    with pytest.raises(UsageError, match="not a finished samat run"):
        load_run_model(tmp_path)


def test_model_card_front_matter_and_table(tmp_path):
    (tmp_path / "samat_model.json").write_text(json.dumps({"kind": "builtin"}))
    card = model_card(_results("sam-at"), tmp_path)
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "samat" and meta["datasets"] == ["fashion_mnist"]
    assert {"samat", "sam", "adversarial-training"} <= set(meta["tags"]) and meta["metrics"] == ["accuracy"]
    assert "| pgd-linf | 8/255 | 0.4000" in body and "| rho " in body and "attack suite `pgd`" in body


def test_push_to_hub_offline_is_refused(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run = type("Run", (), {"push_to_hub": True, "output_dir": "x"})()
    with pytest.raises(UsageError, match="--push_to_hub: the Hugging Face hub cannot be reached"):
        check_push_to_hub(run)


def test_model_card_model_index_parses_back_with_the_results(tmp_path):
    from huggingface_hub import ModelCard

    results = _results("sam-at")
    (tmp_path / "samat_model.json").write_text(json.dumps({"kind": "builtin"}))
    (tmp_path / "README.md").write_text(model_card(results, tmp_path))
    card = ModelCard.load(tmp_path / "README.md")
    rows = card.data.eval_results
    assert len(rows) == 1 + len(results.robust())
    assert rows[0].metric_name == "clean accuracy" and rows[0].metric_value == results.clean
    robust = {(r.metric_args["attack"], r.metric_args["eps"]): r.metric_value for r in rows[1:]}
    assert robust == {(a, e): v for a, e, v in results.robust()}
    assert all(r.metric_args["suite"] == "pgd" and r.metric_args["examples"] == results.data.get("eval_examples")
               for r in rows[1:])
    assert "pypi.org" not in card.text


def test_card_links_only_to_the_repository_the_package_declares(tmp_path, monkeypatch):
    """The card's one link to samat comes from the installed package's Project-URL metadata (pyproject.toml's
    [project.urls]); with none declared it links nowhere, and never to a package-index page."""
    import re
    import tomllib
    from importlib import metadata
    from pathlib import Path

    from samat.common import model_io

    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert all(u.startswith("https://") and "pypi.org" not in u for u in declared.get("urls", {}).values())
    (tmp_path / "samat_model.json").write_text(json.dumps({"kind": "builtin"}))
    links = lambda: re.findall(r"\]\((https?://[^)\s]+)\)", model_card(_results(), tmp_path))  # noqa: E731
    url = model_io.repository_url()
    assert links() == ([url] if url else []) and not any("pypi.org" in link for link in links())

    class Declared:
        def get_all(self, key):
            return ["Homepage, https://example.org/samat", "Repository, https://git.example.org/samat",
                    "Download, ftp://x"] if key == "Project-URL" else None

    monkeypatch.setattr(metadata, "metadata", lambda name: Declared())
    assert model_io.project_links() == {"Homepage": "https://example.org/samat",
                                        "Repository": "https://git.example.org/samat"}
    assert links() == ["https://git.example.org/samat"]

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "metadata", not_installed)
    assert model_io.repository_url() is None and links() == []
