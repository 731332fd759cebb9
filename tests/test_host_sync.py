"""Host syncs in the training hot path, counted: the calls that make the host wait for the device (``.item()``,
``.tolist()``, ``float()``/``int()``/``bool()`` of a tensor, ``.cpu()``, ``.nonzero()``) during optimizer steps
with the divergence guard attached, pinned per update rule. (On a GPU each one stalls the launch queue; the
CPU cannot see a sync, so the calls that cause one are counted instead.)"""

from __future__ import annotations

import collections

import pytest
import torch

from helpers import image_batch, resolved, tiny_cnn, vision_task
from samat.common.guard import WINDOW, DivergenceGuard, label_prior
from samat.common.methods import StepContext, train_step

SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero")


@pytest.fixture
def count_syncs(monkeypatch):
    counts: collections.Counter = collections.Counter()
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


# syncs per optimizer step away from the guard's check and poll steps; AE-SAM's choice is a Python branch on
# the gradient norm, one read per step
PER_STEP = {"erm": 0, "pgd-at": 0, "sam": 0, "sam-every-k": 0, "looksam": 0, "ae-sam": 1, "esam": 0, "trades": 0}


@pytest.mark.parametrize("method", list(PER_STEP))
def test_host_syncs_per_step(accelerator, method, request):
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ctx = StepContext(accelerator=accelerator, model=model, optimizer=optimizer, task=vision_task(),
                      method=resolved(method, steps=2, sam_interval=2))
    check = 4 + 2 * WINDOW
    guard = DivergenceGuard(accelerator.unwrap_model(model), check_steps=(check,), lr=0.1, warmup_ratio=0.0,
                            prior=label_prior(torch.arange(4), 4), poll_every=100)
    batches = [image_batch(n=8, seed=s) for s in range(2)]
    labels = torch.cat([b["labels"] for b in batches])
    train_step(ctx, batches)  # the first step builds the optimizer state
    counts = request.getfixturevalue("count_syncs")
    for step in range(1, 5):  # steps 1..4: outside the check's window, no poll
        result = train_step(ctx, batches)
        assert guard.failure(step, result.loss, result.skipped, labels) is None
    assert sum(counts.values()) == 4 * PER_STEP[method], dict(counts)
    # the check's window: the hook marks classes on the device, still no sync until the check step reads them
    counts.clear()
    for step in range(5, check):
        result = train_step(ctx, batches)
        guard.failure(step, result.loss, result.skipped, labels)
    assert sum(counts.values()) == (check - 5) * PER_STEP[method], dict(counts)
    guard.close()


def test_text_embedding_norm_is_read_once_per_version_of_the_matrix(count_syncs):
    from text_helpers import tiny_bert

    from samat.text.task import embedding_scale

    model = tiny_bert(vocab_size=50)
    weight = model.get_input_embeddings().weight
    first = embedding_scale(model)
    assert first == pytest.approx(float(weight.detach().norm(dim=-1).mean()))
    count_syncs.clear()
    assert [embedding_scale(model) for _ in range(3)] == [first] * 3 and not count_syncs  # no read while unchanged
    with torch.no_grad():
        weight.mul_(2.0)  # an optimizer step updates it in place (its _version moves)
    assert embedding_scale(model) == pytest.approx(2 * first)
