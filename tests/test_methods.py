"""Every method trains on the vision task: a few steps lower the loss on a fixed batch."""

from __future__ import annotations

import os

import pytest
import torch

from samat.common.config import MethodArgs
from samat.common.errors import UsageError
from samat.common.methods import METHODS, resolve_method, train_step
from samat.common.registry import UPDATE_RULES
from samat.common.saf import INDEX_KEY
from helpers import context, eval_loss, image_batch, resolved, tiny_cnn, vision_task


def test_every_update_rule_of_the_registry_is_implemented_under_its_name():
    from samat.common.methods import UPDATES
    from samat.common.registry import UPDATE_RULES

    assert set(UPDATES) == set(UPDATE_RULES)
    assert {m.update for m in METHODS.values()} <= set(UPDATES)
    assert all(callable(rule) for rule in UPDATES.values())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_lowers_the_loss_on_a_fixed_batch(accelerator, name):
    torch.manual_seed(0)
    model, batch = tiny_cnn(), image_batch(n=16)
    rule = UPDATE_RULES[METHODS[name].update]
    # SAF/MESA: the trajectory loss on from the first step (SAF: a reference one visit back), at the paper's lambda
    traj = ({"traj_lambda": rule.defaults["traj_lambda"], "traj_start_epoch": 0, "saf_delay_epochs": 1}
            if "traj_lambda" in rule.defaults else {})
    if rule.needs_index:
        batch[INDEX_KEY] = torch.arange(16)
    # ESAM descends on the half of the batch whose loss rises most, with that half's BatchNorm statistics; on one
    # batch of 16 repeated, momentum 0.9 overshoots at eval (running statistics), 0.5 does not
    ctx = context(accelerator, model, resolved(name, rho=0.05, eps=2 / 255, alpha=1 / 255, steps=2, **traj),
                  lr=0.05, momentum=0.5 if rule.name == "esam" else 0.9)
    task = vision_task()

    before = eval_loss(task, model, batch)
    for _ in range(8):
        result = train_step(ctx, [batch])
        assert not result.skipped and result.loss == result.loss  # finite, not NaN
        # StepResult's contract: a 0-dim float tensor that the loop stacks when it logs (a float crashed SAF and
        # MESA runs at their 10th step)
        assert isinstance(result.loss, torch.Tensor) and result.loss.dim() == 0, type(result.loss)
    assert eval_loss(task, model, batch) < before - 0.05


def test_resolve_method_defaults_and_unused_flags():
    task = vision_task()
    sam = resolve_method("sam", MethodArgs(), task, set())
    assert sam.rho == 0.05
    at = resolve_method("pgd-at", MethodArgs(), task, set())
    assert (at.eps, at.alpha, at.steps) == (8 / 255, 2 / 255, 10)
    fgsm = resolve_method("fgsm-at", MethodArgs(train_eps="4/255"), task, {"train_eps"})
    assert fgsm.steps == 1 and abs(fgsm.alpha - 1.25 * 4 / 255) < 1e-12
    with pytest.raises(UsageError, match="--rho does not apply to --method erm"):
        resolve_method("erm", MethodArgs(rho=0.1), task, {"rho"})
    with pytest.raises(UsageError, match="did you mean 8/255"):
        resolve_method("pgd-at", MethodArgs(train_eps="8"), task, {"train_eps"})
    with pytest.raises(UsageError, match="choose one of"):
        resolve_method("sgd-at", MethodArgs(), task, set())


def test_at_clean_weight_defaults_per_task_and_explicit_value_wins():
    from samat.text.task import TextTask

    text = TextTask()
    assert resolve_method("pgd-at", MethodArgs(), vision_task(), set()).clean_weight == 0  # Madry
    text_weight = TextTask.defaults.at_clean_weight
    assert 0 < text_weight < 1  # the text recipe mixes clean and adversarial loss
    for name in ("pgd-at", "fgsm-at", "sam-at"):
        assert resolve_method(name, MethodArgs(), text, set()).clean_weight == text_weight
    explicit = resolve_method("pgd-at", MethodArgs(at_clean_weight=0.0), text, {"at_clean_weight"})
    assert explicit.clean_weight == 0
    # methods without the flag never mix, whatever the task default
    assert resolve_method("trades", MethodArgs(), text, set()).clean_weight == 0
    assert resolve_method("sam", MethodArgs(), text, set()).clean_weight == 0


def test_trades_kl_ignores_masked_positions():
    from samat.common.methods import _kl

    torch.manual_seed(0)
    adv, clean = torch.randn(2, 3, 4, 4), torch.softmax(torch.randn(2, 3, 4, 4), 1)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    full = _kl(adv, clean)
    masked = _kl(adv, clean, mask)
    assert torch.allclose(masked, _kl(adv[:, :, :2], clean[:, :, :2]))
    assert not torch.allclose(full, masked)


def test_at_clean_weight_mixes_clean_and_adversarial_loss(accelerator):
    from samat.common.methods import OBJECTIVES

    torch.manual_seed(0)
    model, batch = tiny_cnn(), image_batch(n=8)
    model.eval()  # BatchNorm on running stats: the doubled batch then equals two separate forwards
    ctx = context(accelerator, model, resolved("pgd-at", clean_weight=0.25, steps=2))
    delta = OBJECTIVES["pgd"].prepare(ctx, batch)
    task = vision_task()
    clean = task.loss(model(batch["pixel_values"]), batch)
    adv = task.loss(model(batch["pixel_values"] + delta), batch)
    mixed = OBJECTIVES["pgd"].loss(ctx, batch, delta)
    torch.testing.assert_close(mixed, 0.75 * adv + 0.25 * clean, rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="--at_clean_weight does not apply to --method trades"):
        resolve_method("trades", MethodArgs(at_clean_weight=0.5), task, {"at_clean_weight"})


def test_set_cpu_threads_uses_every_core_only_for_a_single_cpu_process(accelerator):  # (state for logging)
    from types import SimpleNamespace

    from samat.common.experiment import set_cpu_threads

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        torch.set_num_threads(1)
        assert set_cpu_threads(None, SimpleNamespace(device=torch.device("cpu"), num_processes=2)) == 1
        assert set_cpu_threads(None, SimpleNamespace(device=torch.device("cpu"), num_processes=1)) == cores
        torch.set_num_threads(1)
        assert set_cpu_threads(None, SimpleNamespace(device=torch.device("cuda"), num_processes=1)) == 1
        # an explicit --cpu_threads wins everywhere
        assert set_cpu_threads(3, SimpleNamespace(device=torch.device("cuda"), num_processes=4)) == 3
    finally:
        torch.set_num_threads(before)
