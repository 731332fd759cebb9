"""PGD and SegPGD on a briefly trained tiny U-Net, the engine's evaluation on it, and every method's step."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from samat.common.attacks import eval_mode, pgd
from samat.common.evaluate import evaluate_all
from samat.common.methods import METHODS, StepContext, train_step
from samat.common.registry import UPDATE_RULES
from segmentation_helpers import (batches, one_thread, resolved_for, save_shapes,  # noqa: F401 (fixture)
                                  tiny_task, train_briefly)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny U-Net trained for 12 short epochs on 128 shape images: clean mIoU well above chance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, for the whole module's shared model
    folder = save_shapes(tmp_path_factory.mktemp("shapes") / "d", n_train=128, n_test=32)
    task, built = tiny_task(folder)
    train_briefly(task, built.model, batches(built.train_dataset, 16, built.collate_fn), epochs=12)
    yield task, built, batches(built.eval_dataset, 32, built.collate_fn)
    torch.set_num_threads(threads)


def miou(task, model, loader, attack=None) -> float:
    stats = 0
    for batch in loader:
        delta = attack(batch) if attack else 0
        with torch.no_grad():
            stats = stats + task.example_stats(model(batch["pixel_values"] + delta), batch).sum(0)
    return task.compute_metrics(stats)["miou"]


def test_pgd_and_segpgd_stay_in_their_ball_and_lower_miou(trained):
    task, built, loader = trained
    model = built.model
    segpgd = task.extra_attacks()[0]
    assert segpgd.name == "segpgd-linf" and [label for label, _ in segpgd.eps] == \
        ["1/255", "2/255", "4/255", "8/255"]
    eps, steps = 8 / 255, 10
    deltas = []

    def attack(objective, norm="linf", radius=eps):
        def run(batch):
            with eval_mode(model):
                surface = task.surface(model, batch)
                delta = pgd(surface, lambda logits, step: objective(logits, batch, step, steps), eps=radius,
                            alpha=2.5 * radius / steps, steps=steps, norm=norm)
            x = batch["pixel_values"]
            deltas.append((norm, radius, delta, x))
            return delta
        return run

    clean = miou(task, model, loader)
    assert clean > 0.35, clean
    task_loss = lambda logits, batch, step, steps: task.loss(logits, batch)
    robust = {"pgd-linf": miou(task, model, loader, attack(task_loss)),
              "segpgd-linf": miou(task, model, loader, attack(segpgd.objective)),
              "pgd-l2": miou(task, model, loader, attack(task_loss, "l2", 0.5))}
    for name, value in robust.items():
        assert value < clean - 0.03, (name, value, clean)
    for norm, radius, delta, x in deltas:
        assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
        if norm == "linf":
            assert delta.abs().max() <= radius + 1e-6 and delta.abs().max() > radius / 2
        else:
            assert delta.flatten(1).norm(dim=1).max() <= radius + 1e-5


def test_engine_evaluation_reports_segpgd_with_sane_numbers(trained, accelerator):
    from samat.common.config import EvalArgs
    from samat.common.resolve import attack_specs

    task, built, _ = trained
    loader = torch.utils.data.DataLoader(built.eval_dataset, batch_size=16, collate_fn=built.collate_fn)
    specs = attack_specs(task, EvalArgs(eval_linf=["4/255"], eval_l2=["none"]))
    specs[-1].eps = [("2/255", 2 / 255), ("8/255", 8 / 255)]
    assert [s.name for s in specs] == ["pgd-linf", "segpgd-linf"]
    result = evaluate_all(built.model, task, loader, accelerator, specs, steps=5)
    clean = result["metrics"]["clean"]
    assert set(clean) >= {"miou", "pixel_accuracy", "iou/0", "iou/1", "iou/2"}
    segpgd = result["metrics"]["robust"]["segpgd-linf"]
    assert segpgd["8/255"]["miou"] < segpgd["2/255"]["miou"] < clean["miou"]
    assert result["sanity"]["passed"], result["sanity"]
    assert not result["collapsed"]


# SAF keys stored outputs by example and is refused for per-pixel outputs (tests/test_saf.py); MESA runs here.
@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if not UPDATE_RULES[m.update].needs_index))
def test_every_method_trains(name, trained, accelerator, tmp_path):
    task, built, _ = trained
    model = copy.deepcopy(built.model)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    ctx = StepContext(accelerator=accelerator, model=model, optimizer=optimizer, task=task,
                      method=resolved_for(name))
    model.train()
    batch = built.collate_fn([built.train_dataset[i] for i in range(8)])
    for _ in range(2):
        result = train_step(ctx, [batch])
        assert math.isfinite(result.loss) and not result.skipped
    after = dict(accelerator.unwrap_model(model).named_parameters())
    assert any(not torch.equal(after[n], before) for n, before in trainable.items())
    assert all(torch.equal(after[n], before) for n, before in frozen.items())  # unused stages stay put
