"""samat.step (Accelerate helper) and samat.SAMTrainer: the same weights as samat's own train_step for sam, asam
and sam-at (text embedding AT), and in the Trainer for the efficient rules (sam-every-k, looksam, ae-sam,
looksam-at); per-micro-batch accumulation in the Trainer, clear errors for bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import samat
from samat.common.config import MethodArgs
from samat.common.efficient_sam import update_state
from samat.common.errors import UsageError
from samat.common.method_config import resolve_method
from samat.common.methods import StepContext, train_step
from samat.common.sam import SAM as Perturbation
from samat.text.task import TextTask
from text_helpers import tiny_bert, tiny_tokenizer

METHODS = {"sam": dict(rho=0.1), "asam": dict(rho=0.5), "sam-at": dict(rho=0.1, train_eps="0.05")}
# The efficient rules over 3 steps, each taking SAM's second pass on some steps and not on others.
# AE-SAM: a short EMA (delta 0.5) and c from 1 to 0.5, so that 3 steps hold both kinds.
EFFICIENT = {"sam-every-k": dict(rho=0.1, sam_interval=2), "looksam": dict(rho=0.1, sam_interval=2),
             "ae-sam": dict(rho=0.1, aesam_delta=0.5, aesam_c_start=1.0, aesam_c_end=0.5),
             "looksam-at": dict(rho=0.1, sam_interval=2, train_eps="0.05")}
SEED = 7
STEPS = 3  # the 3 batches of text_data


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A tokenizer and 12 tokenised sentences of the tiny sentiment vocabulary (3 batches of 4)."""
    import random

    from text_helpers import sentence

    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    rng = random.Random(0)
    rows = []
    for i in range(12):
        enc = tok(sentence(rng, i % 2), truncation=True, max_length=24)
        rows.append({**enc, "labels": i % 2})
    return tok, rows


def _batches(tok, rows, size=4):
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tok)
    return [dict(collate(rows[i:i + size])) for i in range(0, len(rows), size)]


def _engine(accelerator, tok, rows, name, state=None, **kw):
    """samat's own loop, step by step: TextTask + resolve_method + train_step, SGD lr 0.1, a run of STEPS
    steps (AE-SAM's schedule). ``state``: a dict that receives the efficient rules' counters."""
    model = tiny_bert(tok.vocab_size).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    task = TextTask()
    method = resolve_method(name, MethodArgs(**kw), task, set(kw))
    ctx = StepContext(accelerator=accelerator, model=model, optimizer=opt, task=task, method=method,
                      total_steps=STEPS)
    for i, b in enumerate(_batches(tok, rows)):
        torch.manual_seed(SEED + i)  # the PGD start of step i (each entry point reseeds the same way)
        train_step(ctx, [b])
    if state is not None:
        state.update(update_state(opt))
    return accelerator.unwrap_model(model).state_dict()


def _assert_same(a, b, atol=1e-6):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=k)


def _moved(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(METHODS))
def test_accelerate_helper_equals_train_step(accelerator, text_data, name):
    tok, rows = text_data
    expected = _engine(accelerator, tok, rows, name, **METHODS[name])
    model = tiny_bert(tok.vocab_size).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    for i, b in enumerate(_batches(tok, rows)):
        torch.manual_seed(SEED + i)
        result = samat.step(accelerator, model, opt, b, method=name, **METHODS[name])
        assert result.loss > 0 and not result.skipped
    assert _moved(expected, tiny_bert(tok.vocab_size).state_dict())
    _assert_same(expected, accelerator.unwrap_model(model).state_dict())


def _trainer(tok, rows, tmp_path, name, accumulation=1, batch=4, **kw):
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorWithPadding, TrainerCallback, TrainingArguments

    class Reseed(TrainerCallback):  # the engine reference's PGD start per step (the loader draws seeds too)
        def on_step_begin(self, args, state, control, **kwargs):
            torch.manual_seed(SEED + state.global_step)

    class InOrder(samat.SAMTrainer):  # the data order of the engine reference, not a shuffled one
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    model = tiny_bert(tok.vocab_size).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=batch, num_train_epochs=1,
                             gradient_accumulation_steps=accumulation, max_grad_norm=0.0, seed=SEED,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = InOrder(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tok),
                      optimizers=(opt, sched), samat_args=samat.SAMArguments(method=name, **kw),
                      callbacks=[Reseed()])
    return trainer


@pytest.mark.parametrize("name", list(METHODS))
def test_trainer_equals_train_step(accelerator, text_data, tmp_path, name):
    tok, rows = text_data
    expected = _engine(accelerator, tok, rows, name, **METHODS[name])
    trainer = _trainer(tok, rows, tmp_path, name, **METHODS[name])
    trainer.train()
    assert trainer.state.global_step == 3
    assert trainer.state.log_history[0]["loss"] > 0
    _assert_same(expected, trainer.model.state_dict())


@pytest.mark.parametrize("name", list(EFFICIENT))
def test_trainer_efficient_sam_equals_train_step(accelerator, text_data, tmp_path, name):
    """The efficient rules run in the Trainer through the engine's own update rule: same weights and the
    same SAM-step count as train_step, with both kinds of step taken; their counters live in the
    optimizer's state (what the Trainer checkpoints)."""
    tok, rows = text_data
    engine_state = {}
    expected = _engine(accelerator, tok, rows, name, state=engine_state, **EFFICIENT[name])
    trainer = _trainer(tok, rows, tmp_path, name, **EFFICIENT[name])
    trainer.train()
    assert trainer.state.global_step == STEPS
    _assert_same(expected, trainer.model.state_dict())
    state = update_state(trainer.optimizer)
    assert state["step"] == engine_state["step"] == STEPS
    assert 0 < state["sam_steps"] == engine_state["sam_steps"] < STEPS
    assert "samat_efficient_sam" in trainer.optimizer.optimizer.state_dict()["state"]


def test_trainer_accumulation_is_per_micro_batch(text_data, tmp_path):
    """K = 2 micro-batches of 2: the descent gradient is the mean of each micro-batch's own SAM gradient."""
    tok, rows = text_data
    trainer = _trainer(tok, rows[:4], tmp_path, "sam", accumulation=2, batch=2, rho=0.1)
    trainer.train()
    assert trainer.state.global_step == 1

    model = tiny_bert(tok.vocab_size).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    total = [torch.zeros_like(p) for p in model.parameters()]
    loss_of = lambda b: nn.functional.cross_entropy(model(input_ids=b["input_ids"],  # noqa: E731
                                                          attention_mask=b["attention_mask"]).logits, b["labels"])
    for b in _batches(tok, rows[:4], size=2):
        opt.zero_grad()
        loss_of(b).backward()
        sam = Perturbation(opt, rho=0.1)
        sam.perturb()
        opt.zero_grad()
        loss_of(b).backward()
        sam.restore()
        for t, p in zip(total, model.parameters()):
            t += p.grad / 2
    for t, p in zip(total, model.parameters()):
        p.grad = t
    opt.step()
    _assert_same(model.state_dict(), trainer.model.state_dict())


def test_bad_input(text_data, tmp_path):
    tok, rows = text_data
    with pytest.raises(UsageError, match="unknown method 'sma'"):
        _trainer(tok, rows, tmp_path, "sma")
    with pytest.raises(UsageError, match="cannot train with 'saf': it keys its memory .* dataset index"):
        _trainer(tok, rows, tmp_path, "saf")
    with pytest.raises(UsageError, match="cannot train with 'mesa-at': it updates its EMA weights after"):
        _trainer(tok, rows, tmp_path, "mesa-at")
    with pytest.raises(UsageError, match="'looksam' counts optimizer steps .* gradient_accumulation_steps=1"):
        _trainer(tok, rows, tmp_path, "looksam", accumulation=2, batch=2)
    with pytest.raises(UsageError, match="sam_interval does not apply to --method sam"):
        _trainer(tok, rows, tmp_path, "sam", sam_interval=3).train()
    with pytest.raises(UsageError, match="unknown samat argument 'rhoo'"):
        samat.step(None, None, None, {}, rhoo=0.1)

    class NoEmbeddings(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids.float()

    batch = _batches(tok, rows)[0]
    with pytest.raises(UsageError, match="NoEmbeddings has no get_input_embeddings"):
        samat.step(None, NoEmbeddings(), None, batch, method="sam-at")
    with pytest.raises(UsageError, match="needs input_ids"):
        samat.step(None, NoEmbeddings(), None, {"pixel_values": torch.zeros(1), "labels": torch.zeros(1)},
                   method="pgd-at")


def test_import_samat_is_light():
    import subprocess
    import sys

    code = "import sys, samat; assert 'transformers' not in sys.modules and 'torch' not in sys.modules; samat.SAM"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_evaluate_model_in_memory_gives_the_results_record(text_data):
    tok, rows = text_data
    from transformers import DataCollatorWithPadding

    model = tiny_bert(tok.vocab_size)
    record = samat.evaluate_model(model, rows, collate_fn=DataCollatorWithPadding(tok), eval_l2=["0.02", "0.5"],
                                  steps=3, batch_size=4, attack_collapsed=True)
    assert record["task"] == "text" and record["headline_metric"] == "accuracy"
    clean = record["metrics"]["clean"]["accuracy"]
    robust = record["metrics"]["robust"]["pgd-l2"]
    assert set(robust) == {"0.02", "0.5"}
    assert 0 <= robust["0.5"]["accuracy"] <= robust["0.02"]["accuracy"] <= clean <= 1
    assert "sanity" in record and record["suite"]["name"] == "pgd"


def test_evaluate_model_counts_every_example_after_an_unfinished_loader(accelerator, text_data):
    """A loader another part of the process left on its last, shorter batch (the Trainer stops at max_steps
    without finishing its iterator) must not cut evaluate_model's batches to that loader's remainder."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    tok, rows = text_data
    left = iter(accelerator.prepare_data_loader(DataLoader(list(range(5)), batch_size=4)))
    next(left), next(left)  # the last batch (remainder 1), iterator not exhausted
    record = samat.evaluate_model(tiny_bert(tok.vocab_size), rows, collate_fn=DataCollatorWithPadding(tok),
                                  eval_l2=["0.02"], steps=1, batch_size=4, attack_collapsed=True)
    assert sum(record["predicted_class_counts"].values()) == len(rows) == 12
