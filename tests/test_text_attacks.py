"""TextAttack on a tiny BERT: our wrapper, every offline recipe, fast failure of download recipes."""

from __future__ import annotations

import time

import pytest
import torch
from text_helpers import tiny_checkpoint, tiny_dataset

from samat.text import data as text_data
from samat.text import models as text_models
from samat.text import resources
from samat.text import textattack as te


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("textattack")
    folder = tiny_checkpoint(root / "model")
    loaded = text_models.load_classifier(str(folder), ["neg", "pos"], 32, require_classifier=True)
    dsd = text_data.load_raw(str(tiny_dataset(root / "data")))
    cols = text_data.resolve_columns(dsd, "test", None, None, None)
    examples = text_data.to_examples(dsd["test"], cols)
    # Two sentences the (untrained) model gets right, so every attack has something to flip.
    wrapper = te.BatchedModelWrapper(loaded.model, loaded.tokenizer)
    preds = wrapper(examples["text"]).argmax(1).tolist()
    right = [i for i, (p, y) in enumerate(zip(preds, examples["label"])) if p == y][:2]
    assert len(right) == 2
    return {"root": root, "folder": folder, "loaded": loaded, "examples": examples.select(right)}


def test_wrapper_matches_stock_huggingface_wrapper(setup):
    ta = resources.import_textattack()
    loaded = setup["loaded"]
    texts = ["good movie .", "the plot was very dull and the acting was flat , really bad .", "fine"]
    pairs = [("good movie .", "bad story"), ("the cast is superb", "dull")]
    ours = te.BatchedModelWrapper(loaded.model, loaded.tokenizer, max_length=64, batch_size=2)
    stock = ta.models.wrappers.HuggingFaceModelWrapper(loaded.model, loaded.tokenizer)
    for inputs in (texts, pairs):
        torch.testing.assert_close(ours(inputs), torch.as_tensor(stock(inputs)).float(), atol=1e-5, rtol=1e-4)
    assert not loaded.model.training
    grad = ours.get_grad("good movie .")
    assert grad["gradient"].shape == (len(grad["ids"]), 32)


@pytest.mark.parametrize("recipe", ["deepwordbug", "pruthi", "pwws", "embedding-swap-model",
                                    pytest.param("embedding-swap", marks=pytest.mark.slow)])
def test_offline_recipe_on_two_sentences(setup, recipe):
    loaded = setup["loaded"]
    summaries, records = te.attack_model(loaded.model, loaded.tokenizer, setup["examples"], [recipe], 2,
                                         max_length=32, batch_size=16)
    s = summaries[recipe]
    assert s["num_examples"] == 2 and len(records[recipe]) == 2
    assert s["successful"] + s["failed"] + s["skipped"] == 2
    assert s["original_accuracy"] == 1.0 and s["skipped"] == 0
    assert s["accuracy_under_attack"] <= s["original_accuracy"]
    assert s["attack_success_rate"] == pytest.approx(s["successful"] / 2)
    assert s["avg_queries"] > 0
    for r in records[recipe]:
        if r["result"] == "successful":
            assert r["perturbed_output"] != r["label"] and r["words_changed"] >= 1
            assert r["perturbed_text"] != r["original_text"]
        else:
            assert r["perturbed_output"] == r["label"]


def test_deterministic_per_example_seeding(setup):
    loaded = setup["loaded"]
    runs = [te.attack_model(loaded.model, loaded.tokenizer, setup["examples"], ["deepwordbug"], 2)[1]
            for _ in range(2)]
    assert runs[0]["deepwordbug"] == [{**r, "seconds": runs[0]["deepwordbug"][i]["seconds"]}
                                      for i, r in enumerate(runs[1]["deepwordbug"])]


@pytest.mark.parametrize("recipe, resource", [("textfooler", "paragramcf"), ("bae", "bert-base-uncased"),
                                              ("a2t", "stsb-distilbert-base"), ("pso", "hownet")])
def test_download_recipes_fail_at_once_with_one_line(recipe, resource):
    started = time.perf_counter()
    with pytest.raises(resources.MissingResource) as err:
        te.check_recipes([recipe])
    assert time.perf_counter() - started < 10
    assert resource in str(err.value) and "\n" not in str(err.value)


def test_sentence_pair_attack(setup, tmp_path):
    dsd = text_data.load_raw(str(tiny_dataset(tmp_path / "pairs", pairs=True)))
    cols = text_data.resolve_columns(dsd, "test", None, None, None)
    examples = text_data.to_examples(dsd["test"], cols)
    loaded = setup["loaded"]
    summaries, records = te.attack_model(loaded.model, loaded.tokenizer, examples, ["deepwordbug"], 4)
    s = summaries["deepwordbug"]
    assert s["successful"] + s["failed"] + s["skipped"] == 4
    assert s["accuracy_under_attack"] <= s["original_accuracy"]
    assert all("\n" in r["original_text"] for r in records["deepwordbug"])  # both sentences, one per line
