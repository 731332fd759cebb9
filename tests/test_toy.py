"""The toy model of robust / non-robust features (samat.analysis.toy, scripts/toy.py): the data are what the
docstring says, ERM relies on the non-robust features, AT at a large eps removes most of that reliance,
the exact linear worst case matches PGD, and the CLI writes its outputs or fails in one line."""

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
])
def test_cli_bad_values_in_process(tmp_path, capsys, args, message):
    out = tmp_path / "toy"
    assert _script().main(["--output_dir", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
