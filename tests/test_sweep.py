"""scripts/sweep.py: the grid it plans, skip / resume on re-run, flags that reach only the methods that read
them, one-line errors before anything runs, and a real two-run sweep whose runs the report builds from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    return load_script(name)


@pytest.fixture(scope="module")
def sweep():
    return _script("sweep")


class FakeRunner:
    """Stands in for scripts/run.py: records each command and 'finishes' the run (writes results.json),
    or fails for the methods in ``fail``."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.commands: list[list[str]] = []
        self.fail = fail

    def __call__(self, command: list[str]) -> int:
        self.commands.append(command)
        method = command[command.index("--method") + 1]
        if method in self.fail:
            return 1
        out = Path(command[command.index("--output_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"task": "vision", "method": method}))
        return 0


def _flag(command: list[str], flag: str):
    return command[command.index(flag) + 1] if flag in command else None


def test_grid_methods_get_only_their_hyperparameters(sweep, tmp_path):
    runner = FakeRunner()
    argv = ["--methods", "erm", "sam", "pgd-at", "sam-at", "fgsm-at", "--rho", "0.1", "0.2", "--train_eps",
            "2/255", "--seeds", "0", "1", "--root", str(tmp_path / "runs")]
    assert sweep.main(argv, runner=runner) == 0
    names = [Path(_flag(c, "--output_dir")).name for c in runner.commands]
    # erm: 2 seeds; sam: 2 rho x 2 seeds; pgd-at, fgsm-at: 1 eps x 2 seeds; sam-at: 2 rho x 1 eps x 2 seeds
    assert len(names) == 2 + 4 + 2 + 4 + 2 and len(set(names)) == len(names)
    assert names[:3] == ["erm_s0", "erm_s1", "sam_rho0.1_s0"]
    assert "sam-at_rho0.2_eps2-255_s1" in names and "pgd-at_eps2-255_s0" in names
    by_name = dict(zip(names, runner.commands))
    erm, sam, at, fgsm = by_name["erm_s0"], by_name["sam_rho0.2_s1"], by_name["pgd-at_eps2-255_s0"], \
        by_name["fgsm-at_eps2-255_s0"]
    assert _flag(erm, "--rho") is None and _flag(erm, "--train_eps") is None and _flag(erm, "--seed") == "0"
    assert _flag(sam, "--rho") == "0.2" and _flag(sam, "--train_eps") is None and _flag(sam, "--seed") == "1"
    assert _flag(at, "--train_eps") == "2/255" and _flag(at, "--rho") is None
    assert _flag(at, "--train_alpha") == "1/510" and _flag(at, "--train_norm") == "linf"  # eps / 4
    assert _flag(fgsm, "--train_alpha") is None  # fast AT keeps its own 1.25 eps step
    assert _flag(by_name["sam-at_rho0.1_eps2-255_s0"], "--rho") == "0.1"
    assert all(c[1].endswith("run.py") and c[0] == sys.executable for c in runner.commands)


def test_rerun_skips_finished_and_resumes_interrupted(sweep, tmp_path, capsys):
    root = tmp_path / "runs"
    argv = ["--methods", "erm", "sam", "--rho", "0.05", "--root", str(root)]
    first = FakeRunner()
    assert sweep.main(argv, runner=first) == 0 and len(first.commands) == 2
    assert "2 finished now, 0 skipped, 0 failed" in capsys.readouterr().out
    again = FakeRunner()
    assert sweep.main(argv, runner=again) == 0 and again.commands == []
    assert "2 already finished (skipped), 0 to run" in capsys.readouterr().out
    # SAM was interrupted: its results are gone, a checkpoint is left
    (root / "sam_rho0.05_s0" / "results.json").unlink()
    (root / "sam_rho0.05_s0" / "checkpoints" / "step_4").mkdir(parents=True)
    third = FakeRunner()
    assert sweep.main(argv, runner=third) == 0
    (command,) = third.commands
    assert _flag(command, "--method") == "sam" and command[-1] == "--resume"
    assert "resuming sam_rho0.05_s0" in capsys.readouterr().out


def test_a_finished_run_made_with_other_method_flags_is_refused_not_skipped(sweep, tmp_path, capsys):
    root = tmp_path / "runs"
    argv = ["--methods", "sam", "--rho", "0.05", "--root", str(root)]
    assert sweep.main(argv, runner=FakeRunner()) == 0
    path = root / "sam_rho0.05_s0" / "results.json"
    # what scripts/run.py records: every method flag as given (here the run had --sam_sync global)
    doc = json.loads(path.read_text())
    doc["config"] = {"method": {"rho": 0.05, "sam_sync": "global"}, "run": {"seed": 0, "output_dir": "elsewhere"}}
    path.write_text(json.dumps(doc))
    capsys.readouterr()
    runner = FakeRunner()
    assert sweep.main(argv, runner=runner) == 2 and runner.commands == []
    err = capsys.readouterr().err
    assert "sam_rho0.05_s0 finished with other flags than this request plans for it (--sam_sync 'global' " \
           "there, None here)" in err
    # asked for what it was made with, it counts as finished (where it was written is not compared)
    again = FakeRunner()
    assert sweep.main(argv + ["--", "--sam_sync", "global"], runner=again) == 0 and again.commands == []


def test_passthrough_method_flags_reach_only_their_methods(sweep, tmp_path):
    runner = FakeRunner()
    argv = ["--methods", "erm", "pgd-at", "trades", "--train_eps", "8/255", "--root", str(tmp_path), "--",
            "--max_steps", "2", "--train_steps", "3", "--trades_beta", "1", "--eval_linf", "1/255", "2/255"]
    assert sweep.main(argv, runner=runner) == 0
    erm, at, trades = runner.commands
    assert erm[-5:] == ["--max_steps", "2", "--eval_linf", "1/255", "2/255"] and "--train_steps" not in erm
    assert _flag(at, "--train_steps") == "3" and "--trades_beta" not in at
    assert _flag(trades, "--trades_beta") == "1" and _flag(trades, "--train_alpha") == "2/255"
    assert _flag(at, "--max_steps") == "2" and at[-2:] == ["1/255", "2/255"]


def test_failure_stops_unless_keep_going(sweep, tmp_path, capsys):
    argv = ["--methods", "erm", "sam", "pgd-at", "--rho", "0.1", "--train_eps", "8/255", "--root", str(tmp_path)]
    runner = FakeRunner(fail=("sam",))
    assert sweep.main(argv, runner=runner) == 1 and len(runner.commands) == 2
    assert "1 finished now, 0 skipped, 1 failed (sam_rho0.1_s0)" in capsys.readouterr().out
    runner = FakeRunner(fail=("sam",))
    assert sweep.main([*argv, "--keep_going"], runner=runner) == 1
    # erm was finished by the first sweep and is skipped; sam fails again, pgd-at runs
    assert [_flag(c, "--method") for c in runner.commands] == ["sam", "pgd-at"]


def test_print_writes_portable_commands_and_nothing_else(sweep, tmp_path, capsys):
    root = tmp_path / "runs"
    argv = ["--methods", "erm", "sam", "--rho", "0.1", "--root", str(root), "--launcher", "accelerate",
            "--accelerate_args", "--num_processes 2", "--print", "--", "--max_steps", "5"]
    assert sweep.main(argv, runner=FakeRunner()) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and not root.exists()
    assert lines[0].startswith("accelerate launch --num_processes 2 ")
    assert "run.py --task vision --method erm --seed 0 --output_dir" in lines[0] and lines[0].endswith("--max_steps 5")


def test_text_and_segmentation_defaults(sweep, tmp_path, capsys):
    assert sweep.main(["--task", "text", "--methods", "pgd-at", "--root", str(tmp_path), "--print"]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    # text's own threat model (L2), grid and ratio (eps / 2), all read from its recipe
    assert [_flag(line.split(), "--train_eps") for line in text] == ["0.005", "0.01", "0.02", "0.04"]
    assert {_flag(line.split(), "--train_norm") for line in text} == {"l2"}
    assert _flag(text[2].split(), "--train_alpha") == "1/100"
    assert sweep.main(["--task", "text", "--methods", "pgd-at", "--train_norm", "linf", "--root", str(tmp_path),
                       "--print"]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    assert [_flag(line.split(), "--train_eps") for line in text] == ["0.00025", "0.0005", "0.001", "0.002"]
    assert _flag(text[2].split(), "--train_alpha") == "1/2000"
    # segmentation trains PGD-3 AT with steps of eps/2 (its recipe), never the images' eps/4
    assert sweep.main(["--task", "segmentation", "--methods", "pgd-at", "--root", str(tmp_path), "--print"]) == 0
    seg = capsys.readouterr().out.strip().splitlines()
    assert [_flag(line.split(), "--train_alpha") for line in seg] == ["1/510", "1/255", "2/255", "4/255"]
    assert sweep.main(["--task", "segmentation", "--methods", "sam", "--root", str(tmp_path), "--print"]) == 0
    assert [_flag(line.split(), "--rho") for line in capsys.readouterr().out.strip().splitlines()] == \
        ["0.05", "0.1", "0.2", "0.5"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "erm", "adam"], "--methods: unknown method 'adam'; choose one of: erm, sam"),
    (["--rho", "0.1", "-1"], "--rho: '-1' must be in (0, 10]"),
    (["--rho", "x"], "--rho: 'x' is not a number"),
    (["--rho", "50"], "--rho: '50' must be in (0, 10]"),
    (["--train_eps", "8"], "did you mean 8/255?"),
    (["--train_eps", "0"], "--train_eps: '0' must be > 0"),
    (["--train_eps", "1/0"], "--train_eps: '1/0' is not a number"),
    (["--seeds", "-1"], "--seeds: '-1' is not a non-negative integer"),
    (["--task", "audio"], "--task: unknown task 'audio'"),
    (["--train_norm", "l1"], "--train_norm: unknown value 'l1'; choose one of: linf, l2"),
    (["--alpha_ratio", "2"], "--alpha_ratio: 2.0 must be in [0, 1]"),
    (["--accelerate_args", "--num_processes 2"], "--accelerate_args needs --launcher accelerate"),
    (["--", "--seed", "3"], "--seed is set by the sweep itself"),
    (["--", "steps"], "expected a flag"),
])
def test_bad_grid_is_one_line_error_before_anything_runs(sweep, tmp_path, capsys, argv, message):
    runner = FakeRunner()
    assert sweep.main([*argv, "--root", str(tmp_path / "runs")] if "--" not in argv
                      else ["--root", str(tmp_path / "runs"), *argv], runner=runner) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert runner.commands == [] and not (tmp_path / "runs").exists()


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep.py"), "--methods", "nope", "--root",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("sweep.py: error: --methods: unknown method 'nope'")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_end_to_end_two_runs_skip_on_rerun_and_report(tmp_path):
    """Real scripts/run.py: erm and sam (rho 0.05) on the vision task, two steps each."""
    root = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--task", "vision", "--model", "small_cnn",
           "--methods", "erm", "sam", "--rho", "0.05", "--seeds", "0", "--root", str(root), "--",
           "--width", "4", "--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "32",
           "--batch_size", "32", "--eval_linf", "2/255", "8/255", "--eval_l2", "none", "--eval_steps", "2",
           "--log_with", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/results.json")}
    assert set(results) == {"erm_s0", "sam_rho0.05_s0"}
    assert results["sam_rho0.05_s0"]["method"] == "sam" and results["erm_s0"]["cost"]["optimizer_steps"] == 2
    stamps = {name: (root / name / "results.json").stat().st_mtime_ns for name in results}

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert again.returncode == 0 and "2 already finished (skipped), 0 to run" in again.stdout
    assert stamps == {name: (root / name / "results.json").stat().st_mtime_ns for name in results}

    report = _script("report")
    assert report.main([str(root), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| erm |" in md and "| sam rho=0.05 |" in md and "pgd-linf 8/255" in md
    assert "sam@0.05" in md  # the engine's sharpness probe reaches the report
    for name in ("clean_vs_robust.png", "robust_vs_eps.png", "sweep_rho_eps.png", "cost.png",
                 "sharpness_vs_robust.png", "results.csv", "summary.csv"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
