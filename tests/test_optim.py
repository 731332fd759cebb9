"""samat.SAM, the torch optimizer: the same weights as samat's own update rules (train_step), fp16 with a
GradScaler, gradient accumulation, BatchNorm, state_dict, DDP's no_sync, pytorch_optimizer's SAM, bad input."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samat import SAM
from samat.common.errors import UsageError
from samat.common.methods import train_step
from helpers import context, image_batch, resolved, tiny_cnn, tiny_mlp

STEPS = 3


def _batches(n: int = STEPS) -> list[dict]:
    return [image_batch(seed=10 + i) for i in range(n)]


def _closure(model, opt, micro_batches):
    """Forward + backward over the micro-batches, loss / K each (samat's accumulation)."""
    def closure():
        total = 0.0
        for b in micro_batches:
            loss = F.cross_entropy(model(b["pixel_values"]), b["labels"]) / len(micro_batches)
            opt.backward(loss) if hasattr(opt, "backward") else loss.backward()
            total += loss.detach()
        return total
    return closure


def _engine(accelerator, name, groups, **kw):
    """Weights and buffers after train_step over ``groups`` (each a list of micro-batches)."""
    model = tiny_cnn()
    ctx = context(accelerator, model, resolved(name, **kw), lr=0.1, momentum=0.9)
    for group in groups:
        train_step(ctx, group)
    return accelerator.unwrap_model(ctx.model).state_dict()


def _assert_same(a: dict, b: dict) -> None:
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("name,kw", [("sam", dict(rho=0.1)), ("asam", dict(rho=0.5)),
                                     ("looksam", dict(rho=0.1, sam_interval=2, looksam_alpha=0.7)),
                                     ("esam", dict(rho=0.1, esam_beta=0.5, esam_gamma=1.0))])
def test_closure_step_equals_train_step(accelerator, name, kw):
    expected = _engine(accelerator, name, [[b] for b in _batches()], **kw)
    model = tiny_cnn()
    flags = {k: v for k, v in kw.items() if k != "rho"}
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, name, rho=kw["rho"], **flags)
    for b in _batches():
        loss = opt.step(_closure(model, opt, [b]))
        assert loss > 0
    start = tiny_cnn().state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())  # it trained
    _assert_same(expected, model.state_dict())  # weights, momentum-driven, and BatchNorm running stats


def test_gradient_accumulation_equals_train_step(accelerator):
    halves = [[{k: v[:4] for k, v in b.items()}, {k: v[4:] for k, v in b.items()}] for b in _batches(2)]
    expected = _engine(accelerator, "sam", halves, rho=0.1)
    model = tiny_cnn()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.1)
    for group in halves:
        opt.step(_closure(model, opt, group))
    _assert_same(expected, model.state_dict())


def test_two_step_api_and_precomputed_gradient_equal_closure():
    runs = []
    for mode in ("closure", "precomputed", "two-step"):
        model = tiny_cnn()
        opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.1)
        for b in _batches():
            closure = _closure(model, opt, [b])
            if mode == "closure":
                opt.step(closure)
            elif mode == "precomputed":  # davda54 / pytorch_optimizer habit: first backward outside
                closure()
                assert opt.step(closure) is None
            else:
                closure()
                assert opt.first_step()
                closure()
                assert not opt.second_step()
        runs.append(model.state_dict())
    _assert_same(runs[0], runs[1])
    _assert_same(runs[0], runs[2])


def test_fp16_scaler_matches_fp32_and_overflow_skips():
    fp32 = tiny_mlp()
    opt = SAM(torch.optim.SGD(fp32.parameters(), lr=0.5), fp32, rho=0.1)
    scaled = tiny_mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt16 = SAM(torch.optim.SGD(scaled.parameters(), lr=0.5), scaled, rho=0.1, scaler=scaler)
    for b in _batches():
        opt.step(_closure(fp32, opt, [b]))
        opt16.step(_closure(scaled, opt16, [b]))
        assert not opt16.last_result.skipped
    _assert_same(fp32.state_dict(), scaled.state_dict())

    before = copy.deepcopy(scaled.state_dict())
    bad = {**image_batch(), "pixel_values": image_batch()["pixel_values"] * float("inf")}
    scale = scaler.get_scale()
    opt16.step(_closure(scaled, opt16, [bad]))
    assert opt16.last_result.skipped
    assert scaler.get_scale() == scale * 0.5
    assert all(torch.equal(v, before[k]) for k, v in scaled.state_dict().items())


def test_matches_pytorch_optimizer_sam():
    from pytorch_optimizer import SAM as PeerSAM

    ours, peer = tiny_cnn(), tiny_cnn()
    opt = SAM(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), ours, rho=0.05)
    popt = PeerSAM(peer.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for b in _batches():
        opt.step(_closure(ours, opt, [b]))
        peer_closure = _closure(peer, popt, [b])
        popt.zero_grad()
        peer_closure()
        popt.step(peer_closure)
    # pytorch_optimizer updates BatchNorm running stats on both passes; samat keeps the first pass's.
    for k, v in ours.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(v, peer.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)


def test_state_dict_keeps_momentum_and_resumes_exactly():
    model = tiny_cnn()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, "looksam", rho=0.1,
              sam_interval=2)
    batches = _batches(4)
    for b in batches[:2]:
        opt.step(_closure(model, opt, [b]))
    state = copy.deepcopy(opt.state_dict())
    assert any("momentum_buffer" in s for s in state["state"].values() if isinstance(s, dict))
    snapshot = copy.deepcopy(model.state_dict())
    for b in batches[2:]:
        opt.step(_closure(model, opt, [b]))

    resumed = tiny_cnn()
    resumed.load_state_dict(snapshot)
    opt2 = SAM(torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9), resumed, "looksam", rho=0.1,
               sam_interval=2)
    opt2.load_state_dict(state)
    assert opt2.state is opt2.base_optimizer.state
    for b in batches[2:]:
        opt2.step(_closure(resumed, opt2, [b]))
    _assert_same(model.state_dict(), resumed.state_dict())


class _RecordingDDP(nn.Module):
    """A stand-in for DDP: records whether each backward ran under no_sync."""

    def __init__(self, module):
        super().__init__()
        self.module, self.in_no_sync, self.calls = module, False, []

    def forward(self, x):
        self.calls.append(self.in_no_sync)
        return self.module(x)

    @contextlib.contextmanager
    def no_sync(self):
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False


@pytest.mark.parametrize("sync,first", [("local", True), ("global", False)])
def test_ddp_first_pass_local_or_global(sync, first):
    model = _RecordingDDP(tiny_mlp())
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.1, sync=sync)
    opt.step(_closure(model, opt, [image_batch()]))
    assert model.calls == [first, False]  # the descent gradient is always all-reduced


def test_bad_input_gives_clear_messages():
    model = tiny_mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(RuntimeError, match="needs a closure.*SAMTrainer"):
        opt.step()
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer"):
        SAM(model.parameters(), model)
    with pytest.raises(TypeError, match="model must be"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD)
    with pytest.raises(UsageError, match="unknown optimizer method 'sma'; choose one of: sam, asam"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, "sma")
    with pytest.raises(UsageError, match="SAMTrainer or samat.step"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, "sam-at")
    with pytest.raises(UsageError, match="sam_interval does not apply to method 'sam'"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, "sam", sam_interval=3)
    with pytest.raises(UsageError, match="'esam' in samat.SAM needs esam_gamma=1"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, "esam")
    with pytest.raises(UsageError, match="unknown sync"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, sync="all")


def test_plain_loop_ends_with_the_weights_of_a_run_folder(tmp_path):
    """A whole ``scripts/run.py`` run (vision, small_cnn, SAM, seed 3, the recipe's SGD + momentum + weight decay
    + warm-up/cosine schedule, 4 steps) against the same data order and initial weights stepped by
    ``samat.SAM`` in a plain loop with the user's own closure: the model saved in the run folder is the one the
    loop ends with, to float tolerance."""
    from accelerate.utils import set_seed

    from helpers import load_script
    from samat.common.experiment import build, make_accelerator
    from samat.common.model_io import load_run_model
    from test_run_vision import run

    flags = ["--task", "vision", "--method", "sam", "--rho", "0.1", "--model", "small_cnn", "--width", "4",
             "--seed", "3", "--max_train_samples", "32", "--batch_size", "8", "--max_steps", "4",
             "--max_eval_samples", "8", "--eval_linf", "2/255", "--eval_l2", "0.25", "--eval_steps", "1",
             "--sharpness_examples", "0", "--log_with", "none", "--cpu_threads", "1"]
    out = tmp_path / "run"
    proc = run(*flags, "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, saved, info = load_run_model(out)
    assert info["results"].cost.optimizer_steps == 4

    # The same flags, resolved and built as scripts/run.py builds them (data order, init, optimizer, schedule).
    resolved_run, task = load_script("run").resolve([*flags, "--output_dir", str(tmp_path / "loop")])
    settings = resolved_run.run
    torch.set_num_threads(1)
    accelerator = make_accelerator(settings)
    set_seed(settings.seed)
    built = build(settings, task, accelerator)
    model = accelerator.unwrap_model(built.model)
    initial = copy.deepcopy(model.state_dict())
    base = built.optimizer.optimizer  # the recipe's SGD (two weight-decay groups), as run.py makes it
    opt = SAM(base, model, "sam", rho=0.1, max_grad_norm=settings.max_grad_norm)

    model.train()
    built.train_loader.set_epoch(0)
    for step, batch in enumerate(built.train_loader):
        def closure():
            loss = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
            loss.backward()
            return loss
        opt.step(closure)
        built.scheduler.step()
        if step + 1 == 4:
            break
    assert step == 3
    trained = model.state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    _assert_same(saved.state_dict(), trained)
