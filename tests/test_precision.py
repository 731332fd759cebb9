"""Mixed precision on CPU (bf16 autocast works there): SAM's perturbed pass sees w + e exactly, evaluation runs
in fp32 whatever the training precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import image_batch, resolved, tiny_cnn, vision_task
from samat.common.methods import StepContext, train_step


@pytest.fixture
def bf16_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(reset_partial_state=True)


def _cosine(a: list, b: list) -> float:
    dot = sum((x * y).sum() for x, y in zip(a, b))
    return float(dot / (torch.sqrt(sum((x ** 2).sum() for x in a)) * torch.sqrt(sum((y ** 2).sum() for y in b))))


@pytest.mark.parametrize("method", ["sam", "sam-at"])
def test_bf16_sam_descent_pass_sees_w_plus_e(bf16_accelerator, method):
    """Under bf16 autocast the ascent pass runs in bf16, the pass at w + e in fp32: each conv and linear op of
    pass 2 computes (fp32 output) with the fp32 weights w + e, so the perturbation it sees is e itself. Under
    autocast it would have seen bf16(w + e) - bf16(w): at this small rho that has cosine < 0.99 with e (0.61
    at rho 0.05 on PreAct ResNet-18, bench/bf16_sam_fidelity.py)."""
    acc = bf16_accelerator
    rho = 0.005
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    prepared, optimizer = acc.prepare(model, optimizer)
    ctx = StepContext(accelerator=acc, model=prepared, optimizer=optimizer, task=vision_task(),
                      method=resolved(method, rho=rho, steps=2))
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weights, dtypes = [], []
    for m in layers:
        m.register_forward_pre_hook(lambda module, inputs: weights.append(
            [p.detach().double().clone() for p in module.parameters(False)]))
        m.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
    train_step(ctx, [image_batch(n=8)])
    n = len(layers)
    # the last two passes are SAM's (sam-at's attack passes come first)
    assert set(dtypes[-2 * n:-n]) == {torch.bfloat16} and set(dtypes[-n:]) == {torch.float32}
    w = [p for ps in weights[-2 * n:-n] for p in ps]
    at = [p for ps in weights[-n:] for p in ps]
    e = [b - a for a, b in zip(w, at)]
    size = float(torch.sqrt(sum((t ** 2).sum() for t in e)))
    assert 0.5 * rho < size <= rho * (1 + 1e-5)  # the conv/linear share of the rho-ball step
    cast = [b.float().bfloat16().double() - a.float().bfloat16().double() for a, b in zip(w, at)]
    assert _cosine(cast, e) < 0.99
    # Accelerate's autocast forward is back for the next step
    assert model.forward is not model._original_forward


def test_evaluation_is_fp32_by_default_under_bf16_training(bf16_accelerator):
    """evaluate_all on a bf16-prepared model: fp32 (the default, after loop.evaluate takes Accelerate's autocast
    off) gives the fp32 model's logits exactly; "train" gives the bf16 ones."""
    from samat.common.evaluate import evaluate_all
    from samat.common.task import AttackSpec

    acc = bf16_accelerator
    task, batch = vision_task(), image_batch(n=16)
    model = tiny_cnn()
    reference = tiny_cnn()
    reference.eval()
    prepared = acc.prepare(model)
    logits = []
    hook = model.register_forward_hook(lambda m, i, out: logits.append(out.detach().float()))
    spec = AttackSpec("pgd-linf", "linf", [("2/255", 2 / 255)], lambda lg, b, s, n: task.loss(lg, b))
    out_train = evaluate_all(prepared, task, [batch], acc, [spec], steps=1, precision="train")
    bf16_logits = logits[0]
    acc.unwrap_model(prepared, keep_fp32_wrapper=False)  # what loop.evaluate does for --eval_precision fp32
    logits.clear()
    out_fp32 = evaluate_all(prepared, task, [batch], acc, [spec], steps=1)
    hook.remove()
    with torch.no_grad():
        expected = reference(batch["pixel_values"])
    torch.testing.assert_close(logits[0], expected, rtol=0, atol=0)
    assert not torch.equal(bf16_logits, expected)
    assert out_fp32["metrics"]["clean"]["examples"] == out_train["metrics"]["clean"]["examples"] == 16


@pytest.mark.slow
def test_bf16_run_records_fp32_evaluation_and_a_bf16_one_on_request(tmp_path, monkeypatch):
    """``accelerate launch --mixed_precision bf16`` of a SAM run on CPU: results.json says bf16 training, fp32
    evaluation; the same saved model evaluated with --eval_precision train says bf16, on the same examples."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from accelerate.state import AcceleratorState

    from samat.scripts.evaluate import main as evaluate_saved

    root = Path(__file__).resolve().parents[1]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    out = tmp_path / "sam-bf16"
    proc = subprocess.run([accelerate, "launch", "--num_processes", "1", "--cpu", "--mixed_precision", "bf16",
                           str(root / "scripts" / "run.py"), "--task", "vision", "--method", "sam", "--model",
                           "small_cnn", "--width", "4", "--max_train_samples", "64", "--max_eval_samples", "24",
                           "--batch_size", "16", "--max_steps", "2", "--eval_linf", "2/255", "--eval_l2", "none",
                           "--eval_steps", "1", "--sharpness_examples", "8", "--sharpness_steps", "1",
                           "--attack_collapsed", "true", "--divergence_guard", "false", "--log_with", "none",
                           "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((out / "results.json").read_text())
    assert (trained["mixed_precision"], trained["eval_precision"]) == ("bf16", "fp32")
    assert trained["config"]["eval"]["eval_precision"] == "fp32"
    assert trained["sharpness"] is not None
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    try:
        evaluate_saved([str(out), "--eval_precision", "train", "--eval_linf", "2/255", "--eval_l2", "none",
                        "--eval_steps", "1", "--sharpness_examples", "0", "--attack_collapsed", "true"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    again = json.loads(next((out / "evaluations").glob("*.json")).read_text())
    assert (again["mixed_precision"], again["eval_precision"]) == ("bf16", "bf16")
    assert again["metrics"]["clean"]["examples"] == trained["metrics"]["clean"]["examples"] == 24



@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_fp16_attack_gradients_do_not_underflow(norm, eps):
    """Confidently classified examples: their unscaled fp16 input gradient is exactly zero (PGD would stand
    still on them and overstate robustness). samat's PGD rescales each example's gradient on its way back, so
    its fp16 step equals the fp32 step on every example (same sign for L-inf, same direction for L2)."""
    import copy

    import torch.nn.functional as F

    from samat.common.attacks import pgd
    from samat.common.task import AttackSurface

    torch.manual_seed(0)
    net = nn.Linear(8, 3)
    with torch.no_grad():
        net.weight.mul_(40)  # margins of 20-35 logits: the wrong classes' probabilities are 1e-10 .. 1e-16
    half, x = copy.deepcopy(net).half(), torch.rand(6, 8)
    labels = net(x).argmax(1)
    probe = torch.zeros_like(x, requires_grad=True)
    (unscaled,) = torch.autograd.grad(F.cross_entropy(half((x + probe).half()).float(), labels, reduction="sum"),
                                      probe)
    assert (unscaled.abs().sum(1) == 0).any()  # the failure exists here: some example gets no gradient at all

    def objective(logits, step):
        return F.cross_entropy(logits.float(), labels, reduction="none")

    steps = dict(eps=eps, alpha=eps, steps=1, norm=norm, random_init=False)
    fp32 = pgd(AttackSurface(x=x, forward=lambda d: net(x + d), bounds=None), objective, **steps)
    fp16 = pgd(AttackSurface(x=x, forward=lambda d: half((x + d).half()), bounds=None), objective, **steps)
    assert (fp16.abs().sum(1) > 0).all()
    if norm == "linf":
        assert torch.equal(fp16, fp32)
    else:
        assert (F.cosine_similarity(fp16, fp32, dim=1) > 0.999).all()
