"""ESAM (Du et al. 2022): beta = gamma = 1 is SAM bit for bit, SWP and SDS recomputed by hand, exact pass counts in
examples, resume through scripts/run.py, flags and refusals. (The registry-parametrised tests of
test_efficient_sam.py and test_methods.py cover exact restore, BatchNorm, every objective and the checkpoint.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from samat.common.config import EvalArgs, MethodArgs, RunArgs, validate
from samat.common.cost import PassCounter
from samat.common.efficient_sam import sds_select, swp_keep, update_state
from samat.common.errors import UsageError
from samat.common.methods import resolve_method, train_step
from samat.common.task import Task
from helpers import context, image_batch, resolved, tiny_cnn, tiny_mlp, vision_task


def _batches(n_steps: int, n: int = 8) -> list[list[dict]]:
    return [[image_batch(n=n, seed=20 + i)] for i in range(n_steps)]


def _train(accelerator, model, method, batches, lr=0.2, momentum=0.9):
    ctx = context(accelerator, model, method, lr=lr, momentum=momentum)
    for b in batches:
        assert not train_step(ctx, b).skipped
    return ctx


@pytest.mark.parametrize("name,limit", [("esam", "sam"), ("esam-at", "sam-at")])
def test_beta_and_gamma_one_is_sam_bit_for_bit(accelerator, name, limit):
    """beta = 1 perturbs every tensor by rho g/||g||, gamma = 1 descends on the whole batch: SAM's step, to the
    last bit (BatchNorm model, momentum, five steps; the -at form on the same PGD inputs)."""
    weights = {}
    for label, method in (("esam", resolved(name, rho=0.1, steps=2, esam_beta=1.0, esam_gamma=1.0)),
                          ("sam", resolved(limit, rho=0.1, steps=2))):
        torch.manual_seed(0)  # the same attack random starts
        model = tiny_cnn()
        _train(accelerator, model, method, _batches(5))
        weights[label] = [p.detach().clone() for p in model.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(weights["esam"], weights["sam"]))


def test_defaults_make_esam_differ_from_sam(accelerator):
    runs = {}
    for name in ("esam", "sam"):
        model = tiny_mlp()
        _train(accelerator, model, resolved(name, rho=0.1, esam_beta=0.6, esam_gamma=0.5), _batches(3))
        runs[name] = model
    assert not all(torch.equal(p, q) for p, q in zip(runs["esam"].parameters(), runs["sam"].parameters()))


def test_dropped_tensors_get_no_weight_gradient_and_the_step_is_unchanged(accelerator, monkeypatch):
    """SWP's saving, as in the authors' code: the dropped tensors are out of autograd in pass 1, so their weight
    gradients are never computed (a gradient hook on every parameter counts the kept ones, then all of them in
    pass 2), and five steps end at the same weights, to the last bit, as computing every gradient and dropping
    the masked ones afterwards."""
    import samat.common.efficient_sam as esam_module

    weights, calls = {}, {}
    for skip in (True, False):
        monkeypatch.setattr(esam_module, "SKIP_DROPPED_GRADS", skip)
        torch.manual_seed(0)
        model = tiny_cnn()
        count = [0]
        for p in model.parameters():
            p.register_hook(lambda g: count.__setitem__(0, count[0] + 1))
        ctx = context(accelerator, model, resolved("esam", rho=0.1, esam_beta=0.5, esam_gamma=0.5), lr=0.2,
                      momentum=0.9)
        expected, n = 0, len(list(model.parameters()))
        for i, b in enumerate(_batches(5)):
            state = update_state(ctx.optimizer)
            keep = swp_keep(ctx.optimizer, {**state, "step": state.get("step", 0)}, 0.5)
            expected += (sum(keep) if skip else n) + n
            assert not train_step(ctx, b).skipped
        weights[skip], calls[skip] = [t.detach().clone() for t in model.state_dict().values()], count[0]
        assert count[0] == expected
        assert all(p.requires_grad for p in model.parameters())
    assert calls[True] < calls[False]
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False]))


def test_sds_select_keeps_the_largest_increases():
    increase = torch.tensor([0.1, 0.5, -1.0, 0.3, 0.2])
    assert sds_select(increase, 0.4).tolist() == [1, 3]  # floor(0.4 * 5) = 2, in batch order
    assert sds_select(increase, 0.1).tolist() == [1]  # at least one example
    assert sds_select(increase, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert len(sds_select(torch.zeros(10), 0.7)) == 7  # 0.7 * 10 is 6.999... in floating point


def _loss(model, batch, reduction="mean"):
    return F.cross_entropy(model(batch["pixel_values"]), batch["labels"], reduction=reduction)


def test_one_step_by_hand_swp_and_sds(accelerator):
    """One ESAM step recomputed from its definition on a model without BatchNorm: the kept tensors climb by
    rho/beta along their own normalised gradient, the dropped ones stay; the examples whose loss rises most at
    w + e (floor(gamma B) of them) give the descent gradient there."""
    rho, beta, gamma, lr = 0.3, 0.5, 0.5, 0.5
    batch = image_batch(n=12, seed=7)
    for seed in range(20):  # a run seed whose first mask keeps some tensors and drops others
        torch.manual_seed(seed)
        model = tiny_mlp(seed=seed)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        keep = swp_keep(torch.optim.SGD(model.parameters(), lr=lr), {"step": 0}, beta)
        if any(keep) and not all(keep):
            break
    ref = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)

    before = _loss(ref, batch, "none").detach()
    grads = torch.autograd.grad(_loss(ref, batch), list(ref.parameters()))
    kept = [g for g, k in zip(grads, keep) if k]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in kept]))
    moved = copy.deepcopy(ref)
    with torch.no_grad():
        for p, g, k in zip(moved.parameters(), grads, keep):
            if k:
                p.add_(rho / beta * g / norm)
    after = _loss(moved, batch, "none").detach()
    chosen = torch.topk(after - before, 6).indices
    sub = {k: v[chosen] for k, v in batch.items()}
    descent = torch.autograd.grad(_loss(moved, sub), list(moved.parameters()))
    expected = [p.detach() - lr * g for p, g in zip(ref.parameters(), descent)]

    ctx = context(accelerator, model, resolved("esam", rho=rho, esam_beta=beta, esam_gamma=gamma), lr=lr)
    train_step(ctx, [batch])
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
    assert update_state(ctx.optimizer)["esam_seed"] == seed


@pytest.mark.parametrize("gamma,k", [(0.5, 5), (0.3, 3), (1.0, 10)])
def test_pass_counts_are_exact_in_examples(accelerator, gamma, k):
    """Per micro-batch of B = 10: forward B at w, B at w + e to rank (not at gamma = 1), k = floor(gamma B)
    for the descent; backward B and k. Two micro-batches of 10 count each on its own."""
    model = tiny_mlp()
    counter = PassCounter(model)
    steps, micro = 3, 2
    batches = [[image_batch(n=10, seed=30 + 2 * i), image_batch(n=10, seed=31 + 2 * i)] for i in range(steps)]
    _train(accelerator, model, resolved("esam", rho=0.1, esam_gamma=gamma), batches)
    rank = 0 if gamma == 1 else 10
    assert counter.forward_examples == steps * micro * (10 + rank + k)
    assert counter.backward_examples == steps * micro * (10 + k)
    assert counter.forward_passes == steps * micro * (3 if rank else 2)
    assert counter.backward_passes == steps * micro * 2
    counter.close()


def test_resume_through_scripts_run_is_bit_identical(tmp_path):
    """scripts/run.py with a checkpoint at step 4 of 8; the resumed run draws the same SWP masks and ends with
    the same weights and pass counts: (2 + gamma) B forward and (1 + gamma) B backward examples a step."""
    from test_run_vision import resumed_from_step_4

    ra, rb = resumed_from_step_4(tmp_path, "--method", "esam")
    assert ra["cost"] == {**rb["cost"], "train_wall_s": ra["cost"]["train_wall_s"],
                          "eval_wall_s": ra["cost"]["eval_wall_s"]}
    assert (ra["cost"]["forward_examples"], ra["cost"]["backward_examples"]) == (8 * 40, 8 * 24)
    assert ra["method_resolved"] == {"method": "esam", "rho": 0.05, "sam_sync": "local", "esam_beta": 0.6,
                                     "esam_gamma": 0.5}


def test_defaults_flags_and_refusals():
    task = vision_task()
    esam = resolve_method("esam", MethodArgs(), task, set())
    assert (esam.rho, esam.esam_beta, esam.esam_gamma) == (0.05, 0.6, 0.5)
    at = resolve_method("esam-at", MethodArgs(esam_gamma=1.0), task, {"esam_gamma"})
    assert (at.esam_gamma, at.esam_beta, at.method.objective) == (1.0, 0.6, "pgd")
    with pytest.raises(UsageError, match="--esam_beta does not apply to --method sam"):
        resolve_method("sam", MethodArgs(esam_beta=0.5), task, {"esam_beta"})
    for flag, value in (("esam_beta", 0.0), ("esam_beta", 1.5), ("esam_gamma", 0.0), ("esam_gamma", -0.1),
                        ("esam_gamma", float("nan"))):
        with pytest.raises(UsageError, match=rf"--{flag}: .* must be in \(0, 1\]"):
            validate(RunArgs(), MethodArgs(**{flag: value}), EvalArgs())
    validate(RunArgs(), MethodArgs(esam_beta=1.0, esam_gamma=1.0), EvalArgs())


def test_a_task_without_per_example_losses_is_refused(accelerator):
    class NoExampleLosses(type(vision_task())):
        example_losses = Task.example_losses  # the base class's default, as a task that defines none

    task = NoExampleLosses(vision_task().args)
    with pytest.raises(UsageError, match="--method esam: the vision task gives no per-example loss.*--esam_gamma 1"):
        resolve_method("esam", MethodArgs(), task, set())  # refused before the run builds anything
    assert resolve_method("esam", MethodArgs(esam_gamma=1.0), task, {"esam_gamma"}).esam_gamma == 1.0
    ctx = context(accelerator, tiny_mlp(), resolved("esam"))
    ctx.task = task
    with pytest.raises(UsageError, match="gives no per-example loss"):  # a step built without resolve_method
        train_step(ctx, [image_batch()])
