"""Efficient SAM updates (sam-every-k, looksam, ae-sam, esam; test_esam.py has ESAM's own): their limits are SAM
or ERM bit for bit, exact restore, BatchNorm, accumulation, fp16, every objective, checkpoint state, pass counts,
flags, an independent LookSAM."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samat.common.config import MethodArgs, RunArgs, EvalArgs, validate
from samat.common.cost import PassCounter
from samat.common.efficient_sam import EFFICIENT_UPDATES, STATE_KEY, aesam_threshold_c, update_state
from samat.common.errors import UsageError
from samat.common.methods import METHODS, Method, ResolvedMethod, StepContext, resolve_method, train_step
from helpers import context, eval_loss, image_batch, resolved, tiny_cnn, tiny_mlp, vision_task

EFFICIENT = sorted(EFFICIENT_UPDATES)


def _train(accelerator, model, method, batches, lr=0.2, momentum=0.9, total_steps=0):
    ctx = context(accelerator, model, method, lr=lr, momentum=momentum)
    ctx.total_steps = total_steps
    results = [train_step(ctx, b) for b in batches]
    return ctx, results


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _batches(n_steps: int, n: int = 8) -> list[list[dict]]:
    return [[image_batch(n=n, seed=10 + i)] for i in range(n_steps)]


# ------------------------------------------------------------------------------------- limiting settings


@pytest.mark.parametrize("name,limit,kw", [
    ("sam-every-k", "sam", {"sam_interval": 1}),
    ("looksam", "sam", {"sam_interval": 1}),
    ("ae-sam", "sam", {"aesam_c_start": -math.inf, "aesam_c_end": -math.inf}),
    ("ae-sam", "erm", {"aesam_c_start": math.inf, "aesam_c_end": math.inf}),
    ("looksam", "sam-every-k", {"sam_interval": 3, "looksam_alpha": 0.0}),
    ("sam-every-k-at", "sam-at", {"sam_interval": 1}),
    ("looksam-at", "sam-at", {"sam_interval": 1}),
    ("ae-sam-at", "pgd-at", {"aesam_c_start": math.inf, "aesam_c_end": math.inf}),
])
def test_limits_are_sam_or_erm_bit_for_bit(accelerator, name, limit, kw):
    """k = 1 is SAM; AE-SAM with threshold -inf is SAM, +inf is ERM; LookSAM with alpha 0 is SAM every k."""
    batches = _batches(5)
    runs = {}
    for label, method in (("variant", resolved(name, rho=0.1, steps=2, **kw)),
                          ("limit", resolved(limit, rho=0.1, steps=2, sam_interval=kw.get("sam_interval", 5)))):
        torch.manual_seed(0)  # the same attack random starts in both runs
        model = tiny_cnn()
        _train(accelerator, model, method, batches)
        runs[label] = model
    assert _same_weights(runs["variant"], runs["limit"])


def test_sam_every_k_alternates_and_differs_from_sam(accelerator):
    batches = _batches(4)
    every, sam = tiny_mlp(), tiny_mlp()
    ctx, _ = _train(accelerator, every, resolved("sam-every-k", rho=0.1, sam_interval=2), batches)
    _train(accelerator, sam, resolved("sam", rho=0.1), batches)
    assert update_state(ctx.optimizer) == {"step": 4, "sam_steps": 2}
    assert not _same_weights(every, sam)


# ------------------------------------------------------------------------------------- exact restore, BN


@pytest.mark.parametrize("name", EFFICIENT)
def test_weights_come_back_exactly_with_lr_zero(accelerator, name):
    """With lr 0 nothing may move: every perturbation is undone bit for bit, on SAM and cheap steps."""
    model = tiny_cnn()
    before = copy.deepcopy(model)
    ctx, _ = _train(accelerator, model, resolved(name, rho=0.5, sam_interval=2, aesam_c_start=0.0,
                                                  aesam_c_end=0.0), _batches(4), lr=0.0, momentum=0.0)
    params = [p for p in model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(params, before.parameters()))
    assert update_state(ctx.optimizer)["sam_steps"] >= 1  # a perturbation did happen


@pytest.mark.parametrize("name", EFFICIENT)
def test_extra_pass_leaves_batchnorm_running_stats_alone(accelerator, name):
    """Running stats after N steps (lr 0) = N train-mode forwards of the same batches: the SAM pass at
    w + e adds nothing, on SAM steps and cheap ones alike."""
    batches = _batches(4)
    model = tiny_cnn()
    reference = copy.deepcopy(model).train()
    method = resolved(name, rho=0.5, sam_interval=2, aesam_c_start=-math.inf, aesam_c_end=-math.inf)
    ctx, _ = _train(accelerator, model, method, batches, lr=0.0, momentum=0.0)
    assert update_state(ctx.optimizer)["sam_steps"] >= 2
    with torch.no_grad():
        for [b] in batches:
            reference(b["pixel_values"])
    for bn, ref in zip(_bns(model), _bns(reference)):
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=0, atol=0)
        assert bn.num_batches_tracked.item() == len(batches) and bn.momentum == ref.momentum


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


# ------------------------------------------------------------------------------------- passes per step


@pytest.mark.parametrize("name,k", [("sam-every-k", 3), ("looksam", 3), ("ae-sam", None)])
def test_pass_counter_counts_one_extra_pass_per_sam_step(accelerator, name, k):
    model = tiny_mlp()
    counter = PassCounter(model)
    ctx, _ = _train(accelerator, model, resolved(name, rho=0.1, sam_interval=k or 5), _batches(7),
                    total_steps=7)
    sam_steps = update_state(ctx.optimizer)["sam_steps"]
    if k:
        assert sam_steps == 3  # steps 0, 3, 6
    assert counter.forward_passes == counter.backward_passes == 7 + sam_steps
    counter.close()


# ------------------------------------------------------------------------------------- LookSAM and AE-SAM rules


def test_looksam_cheap_step_follows_the_cached_orthogonal_direction(accelerator):
    """By hand on one model: g_v from the SAM step, then the reuse step's descent direction."""
    model, (b0, b1) = tiny_mlp(), [image_batch(seed=3), image_batch(seed=4)]
    alpha, rho, lr = 0.7, 0.2, 0.5
    ref = copy.deepcopy(model)

    def grad(m, batch):
        m.zero_grad()
        F.cross_entropy(m(batch["pixel_values"]), batch["labels"]).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    def flat(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    def assign(m, vec):
        torch.nn.utils.vector_to_parameters(vec, m.parameters())

    w0 = flat(ref)
    g = grad(ref, b0)
    assign(ref, w0 + rho * g / g.norm())
    g_s = grad(ref, b0)
    g_v = g_s - (g_s @ g) / (g @ g) * g
    w1 = w0 - lr * g_s
    assign(ref, w1)
    g1 = grad(ref, b1)
    w2 = w1 - lr * (g1 + alpha * g1.norm() * g_v / g_v.norm())

    _train(accelerator, model, resolved("looksam", rho=rho, sam_interval=2, looksam_alpha=alpha),
           [[b0], [b1]], lr=lr, momentum=0.0)
    torch.testing.assert_close(flat(model), w2, rtol=1e-5, atol=1e-6)


def test_looksam_matches_pytorch_optimizer(accelerator):
    """pytorch_optimizer's LookSAM projects per parameter tensor; on a model with one weight tensor that is
    the paper's whole-vector rule, so the two must agree step for step (k = 3, SGD with momentum)."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4, bias=False))
    torch.manual_seed(0)
    nn.init.normal_(model[1].weight, std=0.05)
    ref, start = copy.deepcopy(model), model[1].weight.detach().clone()
    batches = _batches(7, n=32)
    # (a small lr keeps g_v well away from 0: where g_s is nearly parallel to g its direction is rounding noise)
    rho, alpha, k, lr = 0.1, 0.7, 3, 0.05

    opt = pytorch_optimizer.LookSAM(ref.parameters(), torch.optim.SGD, rho=rho, k=k, alpha=alpha, lr=lr,
                                    momentum=0.9, foreach=False)

    def loss_backward(batch):
        opt.zero_grad()
        F.cross_entropy(ref(batch["pixel_values"]), batch["labels"]).backward()

    for step, [batch] in enumerate(batches):
        loss_backward(batch)
        opt.first_step()
        if step % k == 0:
            loss_backward(batch)
        opt.second_step()
    _train(accelerator, model, resolved("looksam", rho=rho, sam_interval=k, looksam_alpha=alpha), batches,
           lr=lr, momentum=0.9)
    torch.testing.assert_close(model[1].weight, ref[1].weight, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model[1].weight, start, atol=1e-3)


def test_aesam_decides_from_the_ema_of_the_squared_gradient_norm(accelerator):
    """The EMAs and decisions follow Jiang et al.'s rule, recomputed by hand from each step's gradient."""
    model = tiny_mlp()
    method = resolved("ae-sam", rho=0.1, aesam_delta=0.5, aesam_c_end=-1.0)  # the paper's schedule
    ctx = context(accelerator, model, method, lr=0.3, momentum=0.0)
    ctx.total_steps = 6
    mean = var = 0.0
    for step, [batch] in enumerate(_batches(6)):
        probe = copy.deepcopy(model)
        F.cross_entropy(probe(batch["pixel_values"]), batch["labels"]).backward()
        sq = sum((p.grad.double() ** 2).sum() for p in probe.parameters()).item()
        mean = 0.5 * mean + 0.5 * sq
        var = 0.5 * var + 0.5 * (sq - mean) ** 2
        c = 1.0 - 2.0 * step / 5  # 1 -> -1 over the six steps
        expected_sam = sq >= mean + c * math.sqrt(var)
        before = update_state(ctx.optimizer)["sam_steps"]
        train_step(ctx, [batch])
        state = update_state(ctx.optimizer)
        assert state["sam_steps"] - before == int(expected_sam), step
        assert state["aesam_mean"] == pytest.approx(mean, rel=1e-5)
        assert state["aesam_var"] == pytest.approx(var, rel=1e-4, abs=1e-12)
    assert 0 < state["sam_steps"] < 6


def test_aesam_threshold_schedule():
    paper = resolved("ae-sam", aesam_c_end=-1.0)
    assert aesam_threshold_c(paper, 0, 11) == 1.0 and aesam_threshold_c(paper, 10, 11) == -1.0
    assert aesam_threshold_c(paper, 5, 11) == pytest.approx(0.0)
    assert aesam_threshold_c(paper, 3, 0) == 0.0  # no run length: the schedule's mean
    budget = resolved("ae-sam")  # samat's default: c from 1 to -0.5
    assert aesam_threshold_c(budget, 0, 11) == 1.0 and aesam_threshold_c(budget, 10, 11) == -0.5
    assert aesam_threshold_c(budget, 5, 11) == pytest.approx(0.25)
    assert aesam_threshold_c(resolved("ae-sam", aesam_c_start=math.inf, aesam_c_end=math.inf), 3, 10) == math.inf


# ------------------------------------------------------------------------------------- composition


@pytest.mark.parametrize("update", EFFICIENT)
@pytest.mark.parametrize("objective", ["clean", "pgd", "fgsm", "trades"])
def test_every_objective_composes_and_lowers_its_loss(accelerator, update, objective):
    torch.manual_seed(0)
    method = Method(f"{update}/{objective}", objective, update, "test", frozenset())
    m = ResolvedMethod(method=method, rho=0.05, eps=2 / 255, alpha=1 / 255, steps=1 if objective == "fgsm" else 2,
                       sam_interval=2)
    model, batch = tiny_cnn(), image_batch(n=16)
    task = vision_task()

    before = eval_loss(task, model, batch)
    # ESAM's descent pass normalises with the BatchNorm statistics of the selected half of the batch (the
    # examples whose loss rises most), the eval loss with running statistics of whole batches: on one batch of
    # 16 repeated, momentum 0.9 overshoots (the loss at eval rises), 0.5 does not
    ctx, results = _train(accelerator, model, m, [[batch]] * 8, lr=0.05, total_steps=8,
                          momentum=0.5 if update == "esam" else 0.9)
    assert all(not r.skipped and math.isfinite(r.loss) for r in results)
    assert eval_loss(task, model, batch) < before - 0.05
    assert update_state(ctx.optimizer)["sam_steps"] >= 1


@pytest.mark.parametrize("name", EFFICIENT)
def test_accumulation_equals_one_big_batch(accelerator, name):
    big, small = tiny_mlp(), tiny_mlp()
    batches = _batches(4, n=8)
    halves = [[{k: v[:4] for k, v in b.items()}, {k: v[4:] for k, v in b.items()}] for [b] in batches]
    # ESAM's data selection ranks within each micro-batch (as within each process's batch under DDP), so only
    # its gamma = 1 form equals one big batch; SWP's masks are per step and the same in both
    method = resolved(name, rho=0.2, sam_interval=2, esam_gamma=1.0)
    _train(accelerator, big, method, batches, lr=0.3, total_steps=4)
    _train(accelerator, small, method, halves, lr=0.3, total_steps=4)
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["looksam", "ae-sam", "esam"])
def test_fp16_loss_scale_changes_nothing_and_overflow_skips(name):
    """Under a GradScaler the variants take the same steps as in fp32 (the scale is divided out of every
    norm, LookSAM's cached direction is a unit vector); an overflow skips the step and moves nothing."""
    from test_sam import _ScaledAccelerator, _ScaledOptimizer

    batches = _batches(4)
    method = resolved(name, rho=0.1, sam_interval=2)
    plain_model = tiny_mlp()
    plain = StepContext(accelerator=_ScaledAccelerator(scale=1.0), model=plain_model, optimizer=None,
                        task=vision_task(), method=method, total_steps=4)
    plain.optimizer = _ScaledOptimizer(torch.optim.SGD(plain_model.parameters(), lr=0.5), plain.accelerator.scaler)
    scaled_model = tiny_mlp()
    acc = _ScaledAccelerator(scale=2.0 ** 12)
    scaled = StepContext(accelerator=acc, model=scaled_model, task=vision_task(), method=method, total_steps=4,
                         optimizer=_ScaledOptimizer(torch.optim.SGD(scaled_model.parameters(), lr=0.5), acc.scaler))
    for b in batches:
        assert not train_step(plain, b).skipped and not train_step(scaled, b).skipped
    for p, q in zip(plain_model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    for key, value in update_state(plain.optimizer).items():
        if key != "looksam_u":
            assert update_state(scaled.optimizer)[key] == pytest.approx(value, rel=1e-4), key

    before = [p.detach().clone() for p in scaled_model.parameters()]
    bad = {**batches[0][0], "pixel_values": batches[0][0]["pixel_values"] * float("inf")}
    assert train_step(scaled, [bad]).skipped
    assert all(torch.equal(p, w) for p, w in zip(scaled_model.parameters(), before))


@pytest.mark.parametrize("name", ["looksam", "ae-sam", "esam"])
def test_bf16_autocast_steps_agree_with_fp32(name):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    results = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(cpu=True, mixed_precision=precision)
        model = tiny_mlp()
        _train(acc, model, resolved(name, rho=0.1, sam_interval=2), _batches(3), lr=0.5, momentum=0.0)
        results[precision] = [p.detach().float().clone() for p in acc.unwrap_model(model).parameters()]
    AcceleratorState._reset_state(reset_partial_state=True)
    start = [p.detach() for p in tiny_mlp().parameters()]
    for fp32, bf16, w0 in zip(results["no"], results["bf16"], start):
        assert not torch.equal(fp32, w0)
        torch.testing.assert_close(bf16 - w0, fp32 - w0, rtol=0.05, atol=5e-3)


# ------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", EFFICIENT)
def test_state_survives_a_checkpoint_bit_identically(accelerator, name):
    """Six steps straight = three steps, optimizer state through torch.save/load (what accelerator.save_state
    writes, read back with weights_only as load_state does) into a fresh model and optimizer, three more."""
    batches = _batches(6)
    method = resolved(name, rho=0.1, sam_interval=4)  # the cut at step 3 falls inside LookSAM's cycle
    straight = tiny_cnn()
    ctx, _ = _train(accelerator, straight, method, batches, total_steps=6)

    first = tiny_cnn()
    ctx1, _ = _train(accelerator, first, method, batches[:3], total_steps=6)
    blob = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": ctx1.optimizer.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    assert STATE_KEY in saved["optimizer"]["state"]
    second = tiny_cnn(seed=5)
    second.load_state_dict(saved["model"])
    ctx2 = context(accelerator, second, method, lr=0.2, momentum=0.9)
    ctx2.total_steps = 6
    ctx2.optimizer.load_state_dict(saved["optimizer"])
    state = update_state(ctx2.optimizer)
    assert state["step"] == 3 and _comparable(state) == _comparable(update_state(ctx1.optimizer))
    for b in batches[3:]:
        train_step(ctx2, b)
    assert _same_weights(second, straight)
    assert _comparable(update_state(ctx2.optimizer)) == _comparable(update_state(ctx.optimizer))


def _comparable(state: dict) -> dict:
    """The state with LookSAM's cached tensors as lists (tensors compare elementwise)."""
    return {k: ({i: t.tolist() for i, t in v.items()} if k == "looksam_u" else v) for k, v in state.items()}


@pytest.mark.parametrize("name", ["looksam", "ae-sam"])
def test_resume_through_scripts_run_is_bit_identical(tmp_path, name):
    """scripts/run.py with a checkpoint at step 4 of 8; the run resumed from it ends with the same weights."""
    from test_run_vision import resumed_from_step_4

    ra, rb = resumed_from_step_4(tmp_path, "--method", name, *(["--sam_interval", "3"] if name == "looksam" else []))
    assert ra["cost"]["forward_passes"] == rb["cost"]["forward_passes"]
    assert 8 < ra["cost"]["forward_passes"] < 16  # some steps took the SAM pass, some did not
    assert ra["method_resolved"]["rho"] == 0.05


# ------------------------------------------------------------------------------------- flags


def test_defaults_flags_and_bad_values():
    task = vision_task()
    look = resolve_method("looksam", MethodArgs(), task, set())
    assert (look.rho, look.sam_interval, look.looksam_alpha) == (0.05, 5, 0.7)
    assert look.describe() == {"method": "looksam", "rho": 0.05, "sam_interval": 5, "looksam_alpha": 0.7}
    ae = resolve_method("ae-sam-at", MethodArgs(aesam_c_start=0.5), task, {"aesam_c_start"})
    assert (ae.aesam_delta, ae.aesam_c_start, ae.aesam_c_end, ae.steps) == (0.9, 0.5, -0.5, 10)
    paper = resolve_method("ae-sam", MethodArgs(aesam_c_end=-1.0), task, {"aesam_c_end"})
    assert paper.describe()["aesam_c_end"] == -1.0
    every = resolve_method("sam-every-k", MethodArgs(sam_interval=2), task, {"sam_interval"})
    assert every.sam_interval == 2 and "looksam_alpha" not in every.describe()
    with pytest.raises(UsageError, match="--looksam_alpha does not apply to --method sam-every-k"):
        resolve_method("sam-every-k", MethodArgs(looksam_alpha=0.5), task, {"looksam_alpha"})
    with pytest.raises(UsageError, match="--sam_sync does not apply to --method looksam"):
        resolve_method("looksam", MethodArgs(sam_sync="global"), task, {"sam_sync"})
    with pytest.raises(UsageError, match="--sam_interval does not apply to --method sam"):
        resolve_method("sam", MethodArgs(sam_interval=2), task, {"sam_interval"})
    for bad, match in ((MethodArgs(sam_interval=0), "--sam_interval: 0 must be > 0"),
                       (MethodArgs(looksam_alpha=-0.1), "--looksam_alpha: -0.1 must be >= 0"),
                       (MethodArgs(aesam_delta=1.0), r"--aesam_delta: 1.0 must be in \[0, 1\)"),
                       (MethodArgs(aesam_c_start=math.nan), "--aesam_c_start: nan must be a number"),
                       (MethodArgs(aesam_c_start=-math.inf), "inf or -inf only with the same value")):
        with pytest.raises(UsageError, match=match):
            validate(RunArgs(), bad, EvalArgs())
    validate(RunArgs(), MethodArgs(aesam_c_start=-math.inf, aesam_c_end=-math.inf), EvalArgs())
    for name in ("sam-every-k", "looksam", "ae-sam", "esam"):  # the reference is in the --help summary
        assert "et al." in METHODS[name].summary and METHODS[name + "-at"].objective == "pgd"


def test_method_flag_help_states_the_registry_default():
    """Each method flag's --help names the default the registry holds (UPDATE_RULES[...].defaults), so the two
    cannot drift: a changed registry value shows up in --help, and a flag whose help has no default fails."""
    from dataclasses import fields

    from samat.common.registry import UPDATE_RULES

    helps = {f.name: f.metadata["help"] for f in fields(MethodArgs)}
    for rule in UPDATE_RULES.values():
        for flag, value in rule.defaults.items():
            assert f"{value:g}" in helps[flag].split("efault", 1)[1], (flag, value, helps[flag])
