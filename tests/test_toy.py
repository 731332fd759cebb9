"""The toy model of robust / non-robust features (samat.analysis.toy, scripts/toy.py): the data are what the
docstring says, ERM relies on the non-robust features, AT at a large eps removes most of that reliance,
the exact linear worst case matches PGD, each loss's derivative and worst case are right, m-SAM is SAM at
m = batch, ERM at rho = 0 and per-group at m = 1, and the CLI (sweeps included) writes its outputs or fails
in one line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_script

from samat.analysis import toy

ROOT = Path(__file__).resolve().parents[1]
# Small enough for seconds on a busy 2-core CPU, large enough for stable shares.
SMALL = toy.ToyConfig(n_train=1000, n_test=2000, epochs=10, hidden=16, pgd_steps=5)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_data_follow_the_model():
    x, y = toy.make_data(20000, d=10, p=0.8, eta=0.3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20000, 11) and set(y.unique().tolist()) == {-1.0, 1.0}
    assert set(x[:, 0].unique().tolist()) == {-1.0, 1.0}
    assert (x[:, 0] == y).float().mean().item() == pytest.approx(0.8, abs=0.01)
    signed = x[:, 1:] * y[:, None]
    assert signed.mean().item() == pytest.approx(0.3, abs=0.01)
    assert signed.std().item() == pytest.approx(1.0, abs=0.02)


def test_exact_linear_worst_case_matches_pgd():
    """The closed form f(x) - y eps ||w||_1 used for linear AT and evaluation is PGD's optimum."""
    from samat.common.attacks import pgd
    from samat.common.task import AttackSurface

    torch.manual_seed(0)
    model = toy.build_model("linear", 5, 0)
    x, y = toy.make_data(64, 5, 0.9, 0.5, torch.Generator().manual_seed(1))
    exact = toy.adversarial_logits(model, x, y, 0.2, steps=1)
    surface = AttackSurface(x=x, forward=lambda d: toy.logits(model, x + d), bounds=None)
    delta = pgd(surface, lambda f, _s: torch.nn.functional.softplus(-y * f).sum(), eps=0.2, alpha=0.05, steps=20)
    assert torch.allclose(toy.logits(model, x + delta), exact, atol=1e-5)


def test_robust_share_is_the_weight_share_for_a_linear_model():
    torch.manual_seed(0)
    model = toy.build_model("linear", 7, 0)
    x, _ = toy.make_data(50, 7, 0.9, 0.3, torch.Generator().manual_seed(0))
    w = model.weight.detach().abs().flatten()
    assert toy.robust_share(model, x) == pytest.approx((w[0] / w.sum()).item(), rel=1e-6)
    assert toy.weight_share(model) == pytest.approx((w[0] / w.sum()).item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_erm_relies_on_non_robust_features_and_large_eps_at_removes_it(kind):
    big_eps = 2 * SMALL.eta  # the adversary that flips every non-robust feature
    erm = toy.run_one(SMALL, kind, "erm", 0.0, seed=0, eval_eps=[big_eps])
    at = toy.run_one(SMALL, kind, "at", big_eps, seed=0, eval_eps=[big_eps])
    key = toy.eps_key(big_eps)
    # ERM: most of the model's input sensitivity sits on the 50 non-robust features, and it pays for it.
    assert erm["robust_share"] < 0.2, erm
    assert erm["clean_accuracy"] > 0.95 and erm["robust_accuracy"][key] < 0.2
    # AT at 2 eta: most of that sensitivity is gone; it trades clean accuracy (down to ~p) for robustness.
    assert at["robust_share"] > 0.8, at
    assert 1 - at["robust_share"] < 0.25 * (1 - erm["robust_share"])
    assert at["robust_accuracy"][key] > 0.8 and at["clean_accuracy"] < erm["clean_accuracy"]
    assert not erm["collapsed"] and not at["collapsed"]
    assert erm["sharpness"] > 0 and at["sharpness"] > 0


def test_sam_runs_and_is_not_erm():
    erm = toy.run_one(SMALL, "linear", "sam", 0.0, seed=0, eval_eps=[0.1])
    plain = toy.run_one(SMALL, "linear", "erm", 0.0, seed=0, eval_eps=[0.1])
    sam = toy.run_one(SMALL, "linear", "sam", 1.0, seed=0, eval_eps=[0.1])
    assert erm["robust_share"] == plain["robust_share"]  # rho 0 is ERM, bit for bit
    assert sam["robust_share"] != plain["robust_share"] and sam["rho"] == 1.0


def test_aggregate_means_and_stds_over_seeds():
    rows = [{"model": "linear", "method": "erm", "rho": 0.0, "eps": 0.0, "seed": s, "clean_accuracy": a,
             "robust_accuracy": {"0.1": a / 2}, "robust_share": 0.1, "weight_share": 0.1, "sharpness": 0.01,
             "collapsed": False} for s, a in enumerate([0.8, 1.0])]
    (entry,) = toy.aggregate(rows)
    assert entry["seeds"] == 2 and entry["clean_accuracy"] == pytest.approx(0.9)
    assert entry["clean_accuracy_std"] == pytest.approx(math.sqrt(0.02))
    assert entry["robust_accuracy@0.1"] == pytest.approx(0.45) and entry["robust_share_std"] == 0.0


@pytest.mark.parametrize("name", list(toy.LOSSES))
def test_loss_derivative_and_worst_case(name):
    loss = toy.LOSSES[name]
    m = torch.tensor([-2.0, -0.3, 0.4, 0.9, 1.3, 3.0], requires_grad=True)  # away from the hinge's kink at 1
    (auto,) = torch.autograd.grad(loss.value(m).sum(), m)
    assert torch.allclose(loss.dvalue(m.detach()), auto, atol=1e-6)
    # worst(m, r) is the largest loss over margins in [m - r, m + r] (a linear model's adversary's reach).
    r = torch.tensor(0.7)
    reach = m.detach()[:, None] + torch.linspace(-0.7, 0.7, 1401)[None, :]
    assert torch.allclose(loss.worst(m.detach(), r), loss.value(reach).max(dim=1).values, atol=1e-5)


@pytest.mark.parametrize("kind", toy.MODELS)
@pytest.mark.parametrize("name", list(toy.LOSSES))
def test_msam_at_batch_size_is_sam_and_at_rho_zero_is_erm(kind, name):
    torch.manual_seed(0)
    model = toy.build_model(kind, 4, 6)
    x, y = toy.make_data(10, 4, 0.9, 0.5, torch.Generator().manual_seed(1))
    loss = toy.LOSSES[name]
    loss_fn = lambda: loss.value(y * toy.logits(model, x)).mean()  # noqa: E731
    before = [p.detach().clone() for p in model.parameters()]
    sam = toy.sam_gradient(model, loss_fn, 0.3)
    for m in (10, 25, 0):  # m >= batch, and 0: one group, ordinary SAM
        for a, b in zip(toy.msam_gradient(model, x, y, loss, 0.3, m), sam):
            assert torch.allclose(a, b, atol=1e-6), (m, a, b)
    erm = torch.autograd.grad(loss_fn(), list(model.parameters()))
    for m in (1, 3, 10):  # 3: a smaller last group, weighted by its size
        for a, b in zip(toy.msam_gradient(model, x, y, loss, 0.0, m), erm):
            assert torch.allclose(a, b, atol=1e-6), (m, a, b)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # weights restored


@pytest.mark.parametrize("m", [1, 4])
def test_msam_perturbs_each_group_at_its_own_weights(m):
    """m-SAM is the mean of SAM taken on each group alone (groups of m in batch order, weighted by size),
    and is not SAM on the whole batch."""
    torch.manual_seed(0)
    model = toy.build_model("mlp", 4, 6)
    x, y = toy.make_data(10, 4, 0.9, 0.5, torch.Generator().manual_seed(2))
    loss = toy.LOSSES["logistic"]
    want = [torch.zeros_like(p) for p in model.parameters()]
    for start in range(0, 10, m):
        xg, yg = x[start:start + m], y[start:start + m]
        group = toy.sam_gradient(model, lambda: loss.value(yg * toy.logits(model, xg)).mean(), 0.5)
        for w, g in zip(want, group):
            w += g * xg.shape[0] / 10
    got = toy.msam_gradient(model, x, y, loss, 0.5, m)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    sam = toy.sam_gradient(model, lambda: loss.value(y * toy.logits(model, x)).mean(), 0.5)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, sam))


def test_training_with_m_equal_batch_is_ordinary_sam():
    cfg = toy.ToyConfig(n_train=128, n_test=64, epochs=2, batch_size=32, d=5, eta=0.5)
    a = toy.run_one(cfg, "linear", "sam", 0.5, seed=0, eval_eps=[0.1])
    b = toy.run_one(toy.ToyConfig(**{**cfg.__dict__, "sam_m": 32}), "linear", "sam", 0.5, seed=0, eval_eps=[0.1])
    c = toy.run_one(toy.ToyConfig(**{**cfg.__dict__, "sam_m": 1}), "linear", "sam", 0.5, seed=0, eval_eps=[0.1])
    assert a["robust_share"] == pytest.approx(b["robust_share"], abs=1e-5)
    assert c["robust_share"] != pytest.approx(a["robust_share"], abs=1e-5)


def test_diag_network_is_linear_in_x_with_weights_u_times_v():
    torch.manual_seed(0)
    model = toy.build_model("diag", 6, 0)
    x, y = toy.make_data(40, 6, 0.9, 0.3, torch.Generator().manual_seed(0))
    beta = (model.u * model.v).detach()
    assert torch.allclose(toy.logits(model, x), x @ beta + model.bias.detach(), atol=1e-6)
    assert toy.robust_share(model, x) == pytest.approx((beta[0].abs() / beta.abs().sum()).item(), rel=1e-5)
    assert toy.weight_share(model) == pytest.approx(toy.robust_share(model, x), rel=1e-5)
    exact = toy.adversarial_logits(model, x, y, 0.2, steps=1)
    assert torch.allclose(exact, toy.logits(model, x) - y * 0.2 * beta.abs().sum(), atol=1e-6)


def test_vary_batch_size_keeps_the_number_of_steps():
    cfg = toy.ToyConfig(n_train=2000, batch_size=64, epochs=20)
    full, _ = toy.vary(cfg, "linear", "batch_size", 2000)
    assert full.batch_size == 2000 and full.epochs == 20 * 32
    assert toy.vary(cfg, "linear", "model", "diag") == (cfg, "diag")
    with pytest.raises(ValueError, match="choose one of: sam_m"):
        toy.vary(cfg, "linear", "lr", 1)


def test_aggregate_shift_is_paired_by_seed():
    rows = [{"model": "linear", "method": method, "rho": rho, "eps": 0.0, "seed": s, "clean_accuracy": 0.9,
             "robust_accuracy": {}, "robust_share": share, "weight_share": share, "sharpness": 0.01, "collapsed": False}
            for s, (e, m) in enumerate([(0.1, 0.15), (0.3, 0.32)]) for method, rho, share in
            (("erm", 0.0, e), ("sam", 1.0, m))]
    erm, sam = toy.aggregate(rows)
    assert erm["share_shift"] == 0 and sam["share_shift"] == pytest.approx(0.035)
    assert sam["share_shift_std"] == pytest.approx(math.sqrt(2) * 0.015)
    assert sam["share_shift_ci95"] == pytest.approx(12.706 * sam["share_shift_std"] / math.sqrt(2))


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "toy.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_cli_writes_results_csv_and_figures(tmp_path):
    out = tmp_path / "toy"
    proc = _cli("--output_dir", str(out), "--models", "linear", "--seeds", "0", "1", "--rho", "0.5",
                "--eps", "0.5", "--n_train", "400", "--n_test", "400", "--epochs", "5")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert [(s["method"], s["seeds"]) for s in results["summary"]] == [("erm", 2), ("sam", 2), ("at", 2)]
    assert len(results["runs"]) == 6 and results["config"]["eta"] == pytest.approx(2 / math.sqrt(50))
    assert (out / "results.csv").read_text().count("\n") == 4
    for name in ("toy_sam_rho.png", "toy_at_eps.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "robust_share" in proc.stdout and "linear" in proc.stdout


def test_cli_sweep_writes_one_row_per_variant_and_the_sweep_figure(tmp_path):
    out = tmp_path / "toy"
    proc = _cli("--output_dir", str(out), "--models", "linear", "--seeds", "0", "1", "--rho", "0.5", "--eps", "0.3",
                "--n_train", "200", "--n_test", "200", "--epochs", "2", "--vary", "sam_m=1,batch",
                "--vary", "loss=hinge", "--vary", "batch_size=full")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    names = list(dict.fromkeys(s["variant"] for s in results["summary"]))
    assert names == ["sam_m=1", "sam_m=batch", "loss=hinge", "batch_size=full"]
    full = next(v for v in results["variants"] if v["name"] == "batch_size=full")
    assert full["cfg"]["batch_size"] == 200 and full["cfg"]["epochs"] == 2 * 4
    # ERM and AT do not depend on m: the two sam_m variants share them, seed by seed.
    by = {(s["variant"], s["method"]): s for s in results["summary"]}
    assert by[("sam_m=1", "at")]["robust_share"] == by[("sam_m=batch", "at")]["robust_share"]
    assert by[("sam_m=1", "sam")]["robust_share"] != by[("sam_m=batch", "sam")]["robust_share"]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["variant", "knob", "knob_value"] and "share_shift_ci95" in header
    assert (out / "toy_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "toy_sam_rho.png").exists()


def _script():
    return load_script("toy")


def test_cli_bad_value_is_a_one_line_error(tmp_path):
    out = tmp_path / "toy"
    proc = _cli("--output_dir", str(out), "--rho", "-1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["toy.py: error: --rho: '-1' must be a finite number in (0, inf)"]
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--models", "cnn"], "unknown model 'cnn'"),
    (["--eps", "abc"], "--eps: 'abc' is not a number"),
    (["--eval_eps", "-0.1"], "--eval_eps: '-0.1'"),
    (["--p", "0.4"], "--p: '0.4'"),
    (["--seeds", "1.5"], "--seeds: '1.5' is not an integer"),
    (["--warmup", "2"], "--warmup: '2'"),
    (["--bogus"], "unrecognized arguments"),
    (["--loss", "l1"], "--loss: unknown loss 'l1'; choose one of: logistic, hinge, squared"),
    (["--sam_m", "-2"], "--sam_m: '-2'"),
    (["--sam_m", "half"], "--sam_m: 'half' is not an integer"),
    (["--batch_size", "all"], "--batch_size: 'all' is not an integer"),
    (["--vary", "lr=0.1"], "--vary: unknown knob 'lr'"),
    (["--vary", "sam_m"], "'sam_m' needs values"),
    (["--vary", "sam_m=1", "--vary", "sam_m=2"], "knob 'sam_m' given twice"),
    (["--vary", "model=cnn"], "--vary model: unknown model 'cnn'"),
    (["--vary", "weight_decay=-1"], "--vary weight_decay: '-1'"),
    (["--vary", "epochs=0"], "--vary epochs: '0'"),
])
def test_cli_bad_values_in_process(tmp_path, capsys, args, message):
    out = tmp_path / "toy"
    assert _script().main(["--output_dir", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
