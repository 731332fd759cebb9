"""SAF and MESA (common/saf.py): the trajectory loss, passes per step, state through a checkpoint, refusals."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from samat.common.config import MethodArgs
from samat.common.cost import PassCounter
from samat.common.efficient_sam import STATE_KEY, update_state
from samat.common.errors import UsageError
from samat.common.methods import resolve_method, train_step
from samat.common.saf import INDEX_KEY, IndexedDataset, indexed_collate, trajectory_kl
from helpers import context, image_batch, resolved, tiny_cnn, tiny_mlp, vision_task

ON = {"traj_lambda": 0.5, "traj_start_epoch": 0, "saf_delay_epochs": 1}


def _batches(n_steps: int, n: int = 8, same: bool = False) -> list[list[dict]]:
    """``n_steps`` one-micro-batch steps over examples 0..n-1 (the same images each step if ``same``)."""
    out = []
    for i in range(n_steps):
        b = image_batch(n=n, seed=10 if same else 10 + i)
        b[INDEX_KEY] = torch.arange(n)
        out.append([b])
    return out


def _weights_equal(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_trajectory_kl_is_zero_on_equal_outputs_and_matches_its_formula():
    torch.manual_seed(0)
    logits, ref = torch.randn(6, 5), torch.randn(6, 5)
    assert trajectory_kl(logits, logits.clone(), 5.0).item() == 0.0
    expected = F.kl_div(F.log_softmax(logits / 5, 1), F.softmax(ref / 5, 1), reduction="none").sum(1).mean() * 25
    torch.testing.assert_close(trajectory_kl(logits, ref, 5.0), expected)
    assert trajectory_kl(logits, ref, 5.0).item() > 0


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_with_lr_zero_the_trajectory_term_is_zero_and_the_loss_is_erms(accelerator, name):
    """lr 0: the stored (SAF) and EMA (MESA) outputs equal the current ones, so the KL adds exactly 0. (MESA on
    a model without BatchNorm: its EMA model runs in eval mode, as the authors', on running statistics.)"""
    batches = _batches(4, same=True)
    build = tiny_cnn if name == "saf" else tiny_mlp
    model, plain = build(), build()
    ctx = context(accelerator, model, resolved(name, **ON), lr=0.0)
    ctx_plain = context(accelerator, plain, resolved("erm"), lr=0.0)
    for b in batches:
        assert train_step(ctx, b).loss == train_step(ctx_plain, b).loss
    state = update_state(ctx.optimizer)
    assert state["step"] == 4
    if name == "saf":
        assert state["saf_visits"].tolist() == [4] * 8


def test_saf_reference_is_the_output_from_delay_visits_ago(accelerator):
    """delay 2: at visit v the KL targets the logits stored at visit v - 2 (the ring of 3 slots)."""
    model = tiny_mlp()
    ctx = context(accelerator, model, resolved("saf", traj_lambda=1.0, traj_start_epoch=0, saf_delay_epochs=2),
                  lr=0.1)
    seen = []
    for b in _batches(3, same=True):
        with torch.no_grad():
            seen.append(model(b[0]["pixel_values"]).clone())  # train-mode outputs before the step (no BN)
        train_step(ctx, b)
    past = update_state(ctx.optimizer)["saf_logits"]
    assert past.shape == (8, 3, 4)
    for visit in range(3):
        torch.testing.assert_close(past[:, visit], seen[visit])


@pytest.mark.parametrize("name,forwards", [("saf", 1), ("mesa", 2)])
def test_passes_per_step(accelerator, name, forwards):
    model = tiny_mlp()
    counter = PassCounter(model)
    ctx = context(accelerator, model, resolved(name, **ON), lr=0.1)
    for b in _batches(5):
        train_step(ctx, b)
    assert (counter.forward_passes, counter.backward_passes) == (5 * forwards, 5)
    counter.close()


def test_mesa_ema_follows_the_weights(accelerator):
    model = tiny_mlp()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = context(accelerator, model, resolved("mesa", mesa_decay=0.5, **ON), lr=0.1)
    train_step(ctx, _batches(1)[0])
    ema = update_state(ctx.optimizer)["mesa_ema"]
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema[n], 0.5 * start[n] + 0.5 * p.detach())


@pytest.mark.parametrize("name", ["saf", "mesa", "saf-at"])
def test_state_survives_a_checkpoint_bit_identically(accelerator, name):
    """Six steps straight = three, optimizer state through torch.save/load (weights_only), three more."""
    batches = _batches(6)
    method = resolved(name, steps=2, **ON)
    torch.manual_seed(1)
    straight = tiny_cnn()
    ctx = context(accelerator, straight, method, lr=0.1, momentum=0.9)
    for b in batches:
        train_step(ctx, b)

    torch.manual_seed(1)
    first = tiny_cnn()
    ctx1 = context(accelerator, first, method, lr=0.1, momentum=0.9)
    for b in batches[:3]:
        train_step(ctx1, b)
    blob = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": ctx1.optimizer.state_dict(),
                "rng": torch.get_rng_state()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    assert STATE_KEY in saved["optimizer"]["state"]
    second = tiny_cnn(seed=5)
    second.load_state_dict(saved["model"])
    ctx2 = context(accelerator, second, method, lr=0.1, momentum=0.9)
    ctx2.optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    for b in batches[3:]:
        train_step(ctx2, b)
    assert _weights_equal(second, straight)


def test_saf_without_indices_or_on_segmentation_is_refused_in_one_line(accelerator):
    ctx = context(accelerator, tiny_mlp(), resolved("saf", **ON))
    with pytest.raises(UsageError, match="no 'sample_index'") as err:
        train_step(ctx, [image_batch(n=8)])
    assert "\n" not in str(err.value)
    from samat.segmentation.task import SegmentationArgs, SegmentationTask

    with pytest.raises(UsageError, match="--method saf: .*needs a classification task") as err:
        resolve_method("saf", MethodArgs(), SegmentationTask(SegmentationArgs()), set())
    assert "\n" not in str(err.value)


def test_resolve_fills_each_rules_defaults_and_refuses_foreign_flags():
    task = vision_task()
    saf = resolve_method("saf", MethodArgs(), task, set())
    mesa = resolve_method("mesa-at", MethodArgs(traj_lambda=0.1), task, {"traj_lambda"})
    assert (saf.traj_lambda, saf.traj_temperature, saf.traj_start_epoch, saf.saf_delay_epochs) == (0.3, 5.0, 5, 3)
    assert (mesa.traj_lambda, mesa.mesa_decay) == (0.1, 0.9998)
    assert saf.describe()["saf_delay_epochs"] == 3 and "mesa_decay" not in saf.describe()
    with pytest.raises(UsageError, match="--rho does not apply to --method saf"):
        resolve_method("saf", MethodArgs(rho=0.1), task, {"rho"})
    with pytest.raises(UsageError, match="--mesa_decay does not apply to --method saf"):
        resolve_method("saf", MethodArgs(mesa_decay=0.9), task, {"mesa_decay"})


def test_indexed_dataset_and_collate_add_positions():
    items = [{"x": torch.tensor([float(i)])} for i in range(5)]
    data = IndexedDataset(items)
    collate = indexed_collate(lambda xs: {"x": torch.stack([it["x"] for it in xs])})
    batch = collate([data[3], data[1]])
    assert batch[INDEX_KEY].tolist() == [3, 1] and batch["x"].flatten().tolist() == [3.0, 1.0]
    assert list(batch)[-1] == INDEX_KEY
    # a DataLoader fetches through __getitems__ (a Subset has one): the positions must survive it
    subset = torch.utils.data.Subset(items, [4, 2, 0])
    loader = torch.utils.data.DataLoader(IndexedDataset(subset), batch_size=3, collate_fn=collate)
    batch = next(iter(loader))
    assert batch[INDEX_KEY].tolist() == [0, 1, 2] and batch["x"].flatten().tolist() == [4.0, 2.0, 0.0]
