"""SAM / ASAM update rule: the perturbation, exact restore, an independent reference, BatchNorm, accumulation,
precision."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from samat.common.methods import train_step
from samat.common.sam import SAM, frozen_batchnorm_stats
from helpers import context, image_batch, resolved, tiny_cnn, tiny_mlp


def _grads(model, batch):
    model.zero_grad()
    F.cross_entropy(model(batch["pixel_values"]), batch["labels"]).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_sam_perturbation_is_rho_times_unit_gradient():
    model, batch = tiny_mlp(), image_batch()
    grads = _grads(model, batch)
    before = [p.detach().clone() for p in model.parameters()]
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    assert sam.perturb()
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    for p, w, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach() - w, 0.05 * g / norm, rtol=1e-4, atol=1e-7)
    total = torch.sqrt(sum(((p.detach() - w) ** 2).sum() for p, w in zip(model.parameters(), before)))
    assert abs(total.item() - 0.05) < 1e-5
    sam.restore()
    for p, w in zip(model.parameters(), before):
        assert torch.equal(p.detach(), w)  # bit-exact, not approximately


def test_asam_perturbation_formula():
    model, batch = tiny_mlp(), image_batch()
    grads = _grads(model, batch)
    before = [p.detach().clone() for p in model.parameters()]
    eta, rho = 0.01, 0.5
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=rho, adaptive=True, eta=eta)
    sam.perturb()
    t = [w.abs() + eta for w in before]
    norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, g in zip(t, grads)))
    for p, w, ti, g in zip(model.parameters(), before, t, grads):
        torch.testing.assert_close(p.detach() - w, rho * ti ** 2 * g / norm, rtol=1e-4, atol=1e-7)
    sam.restore()


def test_nonfinite_gradient_does_not_move_weights():
    model, batch = tiny_mlp(), image_batch()
    _grads(model, batch)
    next(model.parameters()).grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    assert not SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05).perturb(check_finite=True)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))


def _reference_sam_step(model, batch, rho, lr):
    """An independent SAM step with torch.func: w - lr * grad L(w + rho g/||g||)."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p):
        logits = torch.func.functional_call(model, p, (batch["pixel_values"],))
        return F.cross_entropy(logits, batch["labels"])

    g = torch.func.grad(loss)(params)
    norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
    g_adv = torch.func.grad(loss)({k: params[k] + rho * g[k] / norm for k in params})
    return {k: params[k] - lr * g_adv[k] for k in params}


@pytest.mark.parametrize("method", ["sam", "sam-at"])
def test_sam_step_matches_independent_reference(accelerator, method):
    model, batch = tiny_mlp(), image_batch()
    if method == "sam":
        expected = _reference_sam_step(copy.deepcopy(model), batch, rho=0.1, lr=0.5)
        ctx = context(accelerator, model, resolved("sam", rho=0.1), lr=0.5)
        train_step(ctx, [batch])
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)
    else:
        # sam-at = SAM on the loss at fixed adversarial inputs made at w: check against the reference on x_adv.
        ctx = context(accelerator, model, resolved("sam-at", rho=0.1, steps=2), lr=0.5)
        torch.manual_seed(3)
        from samat.common.methods import OBJECTIVES

        delta = OBJECTIVES["pgd"].prepare(ctx, batch)
        adv_batch = {**batch, "pixel_values": batch["pixel_values"] + delta}
        expected = _reference_sam_step(copy.deepcopy(model), adv_batch, rho=0.1, lr=0.5)
        torch.manual_seed(3)
        train_step(ctx, [batch])
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)


def test_second_pass_leaves_batchnorm_running_stats_alone(accelerator):
    model, batch = tiny_cnn(), image_batch()
    reference = copy.deepcopy(model)
    reference.train()
    with torch.no_grad():
        reference(batch["pixel_values"])  # what ONE forward (the first SAM pass) does to running stats
    ctx = context(accelerator, model, resolved("sam", rho=0.05))
    train_step(ctx, [batch])
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    ref_bns = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn, ref in zip(bns, ref_bns):
        torch.testing.assert_close(bn.running_mean, ref.running_mean)
        torch.testing.assert_close(bn.running_var, ref.running_var)
        assert bn.num_batches_tracked.item() == 1 and bn.momentum == ref.momentum


def test_frozen_batchnorm_stats_with_cumulative_momentum():
    bn = torch.nn.BatchNorm1d(3, momentum=None)
    bn(torch.randn(5, 3))
    mean, tracked = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    with frozen_batchnorm_stats(bn):
        bn(torch.randn(5, 3) + 10)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.num_batches_tracked, tracked)
    assert bn.momentum is None


@pytest.mark.parametrize("method", ["sam", "asam", "erm"])
def test_accumulation_equals_one_big_batch(accelerator, method):
    batch = image_batch(n=8)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    big, small = tiny_mlp(), tiny_mlp()
    train_step(context(accelerator, big, resolved(method, rho=0.2), lr=0.3, momentum=0.9), [batch])
    train_step(context(accelerator, small, resolved(method, rho=0.2), lr=0.3, momentum=0.9), halves)
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clipping_applies_to_the_descent_gradient(accelerator):
    model, batch = tiny_mlp(), image_batch()
    expected = copy.deepcopy(model)
    # reference: descent gradient at w + e, clipped to norm 0.01, then SGD
    ref = _reference_sam_step(copy.deepcopy(model), batch, rho=0.1, lr=1.0)  # w - g_adv
    g_adv = {k: p.detach() - ref[k] for k, p in expected.named_parameters()}
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_adv.values()))
    clip = min(1.0, 0.01 / (norm.item() + 1e-6))
    ctx = context(accelerator, model, resolved("sam", rho=0.1), lr=1.0, max_grad_norm=0.01)
    train_step(ctx, [batch])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), dict(expected.named_parameters())[name].detach()
                                   - clip * g_adv[name], rtol=1e-4, atol=1e-6)


def test_bf16_and_fp32_sam_steps_agree():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from samat.common.methods import StepContext
    from helpers import vision_task

    batch = image_batch()
    results = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(cpu=True, mixed_precision=precision)
        model = tiny_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model, opt = acc.prepare(model, opt)
        ctx = StepContext(accelerator=acc, model=model, optimizer=opt, task=vision_task(),
                          method=resolved("sam", rho=0.1))
        train_step(ctx, [batch])
        results[precision] = [p.detach().float().clone() for p in acc.unwrap_model(model).parameters()]
    AcceleratorState._reset_state(reset_partial_state=True)
    start = [p.detach() for p in tiny_mlp().parameters()]
    for fp32, bf16, w0 in zip(results["no"], results["bf16"], start):
        assert not torch.equal(fp32, w0)  # the step moved the weights
        torch.testing.assert_close(bf16 - w0, fp32 - w0, rtol=0.05, atol=2e-3)


class _ScaledAccelerator:
    """The slice of Accelerate's fp16 path that the SAM update touches, with a real GradScaler on CPU."""

    num_processes = 1

    def __init__(self, scale: float):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=scale)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def no_sync(self, model):
        import contextlib

        return contextlib.nullcontext()

    def unwrap_model(self, model):
        return model

    def clip_grad_norm_(self, params, max_norm):
        raise AssertionError("not used")


class _ScaledOptimizer:
    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler, self.step_was_skipped = optimizer, scaler, False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self):
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_was_skipped = self.scaler.get_scale() < before

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def test_fp16_loss_scaling_unscaled_by_hand_and_overflow_skips():
    from samat.common.methods import StepContext
    from helpers import vision_task

    batch = image_batch()
    expected = _reference_sam_step(tiny_mlp(), batch, rho=0.1, lr=0.5)
    model = tiny_mlp()
    acc = _ScaledAccelerator(scale=2.0 ** 12)
    ctx = StepContext(accelerator=acc, model=model, optimizer=_ScaledOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), acc.scaler), task=vision_task(),
        method=resolved("sam", rho=0.1))
    assert not train_step(ctx, [batch]).skipped
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-4, atol=1e-6)

    # An overflow in the first pass: no update, and the loss scale backs off.
    before = [p.detach().clone() for p in model.parameters()]
    bad = {**batch, "pixel_values": batch["pixel_values"] * float("inf")}
    scale = acc.scaler.get_scale()
    assert train_step(ctx, [bad]).skipped
    assert acc.scaler.get_scale() == scale * 0.5
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))
