"""scripts/reproduce.py: --print lists each preset's grid, a fake runner's grid ends in verdicts.md/json with
progress across the grid, re-runs skip finished runs, a failed run is left out and named, and bad input is one
`error:` line and exit 2 before anything is run or written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from helpers import load_script
from test_verdicts import results

from samat.analysis.reproduce import PRESETS, resolve_preset
from samat.common.registry import task_recipe
from samat.common.cli import main_guard

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    return load_script("reproduce")


def _flag(command: list[str], flag: str):
    return command[command.index(flag) + 1] if flag in command else None


def _print(reproduce, capsys, *argv: str) -> list[list[str]]:
    assert reproduce.main(["--print", *argv]) == 0
    return [line.split() for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("task, scale, runs, steps, attacks", [
    ("vision", "quick", 3 * (1 + 1 + 1), "3", "pgd"),
    ("vision", "cpu", 3 * (1 + 1 + 1), "3", "apgd"),
    ("vision", "gpu", 3 * (1 + 4 + 4), "10", "apgd"),
    ("text", "quick", 3 * 3, None, "pgd"),
    ("segmentation", "cpu", 3 * (1 + 1 + 1), None, "pgd"),
    ("text", "cpu", 3 * (1 + 1 + 1), None, "apgd"),
    ("text", "gpu", 3 * (1 + 4 + 4), None, "apgd"),
    ("segmentation", "quick", 3 * (1 + 1 + 1), "2", "pgd"),
    ("segmentation", "gpu", 3 * (1 + 4 + 4), None, "apgd"),
])
def test_print_lists_the_preset_grid(reproduce, capsys, tmp_path, task, scale, runs, steps, attacks):
    commands = _print(reproduce, capsys, "--task", task, "--scale", scale, "--root", str(tmp_path / "r"))
    preset = resolve_preset(task, PRESETS[(task, scale)])
    assert len(commands) == runs
    names = [Path(_flag(c, "--output_dir")).name for c in commands]
    assert len(set(names)) == runs and names[0] == "erm_s0"
    assert {_flag(c, "--seed") for c in commands} == {"0", "1", "2"}
    assert {_flag(c, "--rho") for c in commands if _flag(c, "--method") == "sam"} == set(preset.rho)
    at = [c for c in commands if _flag(c, "--method") == "pgd-at"]
    assert {_flag(c, "--train_eps") for c in at} == set(preset.train_eps)
    assert all(_flag(c, "--train_norm") == preset.train_norm for c in at)
    # the AT step is the preset's stated ratio, else the task recipe's, of each eps (no copy can drift)
    ratio = PRESETS[(task, scale)].alpha_ratio or task_recipe(task).alpha_ratio
    assert all(Fraction(_flag(c, "--train_alpha")) == Fraction(_flag(c, "--train_eps")) * Fraction(ratio) for c in at)
    assert all(_flag(c, "--eval_attacks") == attacks for c in commands)
    if steps:  # a method flag: only the AT runs get it
        assert all(_flag(c, "--train_steps") == steps for c in at)
        assert all(_flag(c, "--train_steps") is None for c in commands if c not in at)
    assert not (tmp_path / "r").exists()  # --print writes nothing


def test_print_seeds_attacks_and_passthrough(reproduce, capsys, tmp_path):
    commands = _print(reproduce, capsys, "--seeds", "2", "--eval_attacks", "apgd", "--root", str(tmp_path),
                      "--", "--epochs", "9", "--lr", "0.05")
    assert len(commands) == 2 * 3 and {_flag(c, "--seed") for c in commands} == {"0", "1"}
    assert all(_flag(c, "--eval_attacks") == "apgd" for c in commands)
    assert all(c.count("--epochs") == 1 and _flag(c, "--epochs") == "9" for c in commands)  # the user's wins
    assert all(_flag(c, "--lr") == "0.05" for c in commands)
    commands = _print(reproduce, capsys, "--root", str(tmp_path), "--launcher", "accelerate", "--accelerate_args",
                      "--num_processes 2")
    assert all(c[:4] == ["accelerate", "launch", "--num_processes", "2"] for c in commands)


class FakeRunner:
    """Stands in for scripts/run.py: writes a results.json for the run (SAM +3 pts robust, AT +10 pts robust
    and -4 pts clean, a per-seed wobble), or fails for the run names in ``fail``."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.names: list[str] = []
        self.fail = fail

    def __call__(self, command: list[str]) -> int:
        out = Path(_flag(command, "--output_dir"))
        self.names.append(out.name)
        if out.name in self.fail:
            return 1
        method, seed = _flag(command, "--method"), int(_flag(command, "--seed"))
        wobble = (0.0, 0.004, -0.003, 0.002)[seed]
        kw = {}
        clean, robust = 0.85 + 0.01 * seed, 0.3 + 0.02 * seed
        if method == "sam":
            kw["rho"] = float(_flag(command, "--rho"))
            clean, robust = clean + wobble, robust + 0.03 - wobble
        elif method == "pgd-at":
            kw.update(eps=2 / 255, steps=int(_flag(command, "--train_steps")))
            clean, robust = clean - 0.04 + wobble, robust + 0.10 + wobble
        doc = results(method, seed, clean, robust, **kw)
        doc["config"]["method"] = recorded_method_flags(command)
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps(doc))
        return 0


def recorded_method_flags(command: list[str]) -> dict:
    """The method block of results.json's config as scripts/run.py records it for ``command``: every method
    flag as given (reproduce compares a finished run's record with the flags it plans for it)."""
    from dataclasses import asdict

    from samat.scripts.run import parse

    start = next(i for i, t in enumerate(command) if t.endswith("run.py")) + 1
    return asdict(parse(command[start:])[1])


def test_grid_to_verdicts_with_progress_resume_and_a_failed_run(reproduce, capsys, tmp_path):
    root = tmp_path / "grid"
    runner = FakeRunner(fail=("sam_rho0.1_s2",))
    assert reproduce.main(["--root", str(root)], runner=runner) == 1  # a run failed
    out = capsys.readouterr().out
    assert "reproduce: run 1/9 erm_s0" in out and "reproduce: run 9/9 pgd-at_eps2-255_s2" in out
    assert "LOW-POWERED" in out and "| (a) SAM raises robustness" in out
    md = (root / "verdicts.md").read_text()
    assert "LOW-POWERED" in md
    assert "Unfinished runs (left out; rerun the same command to finish them): sam_rho0.1_s2" in md
    assert "erm_s2 (erm, seed 2): no usable run of seed 2 in sam rho=0.1" in md
    data = json.loads((root / "verdicts.json").read_text())
    assert data["scale"] == "quick" and data["low_powered"] and data["unfinished"] == ["sam_rho0.1_s2"]
    claims = {c["claim"]: c for c in data["claims"]}
    assert claims["a"]["effects"][0]["seeds"] == [0, 1]
    assert claims["c"]["verdict"] == "holds"  # ERM 1, SAM 2, PGD-3 4 passes per step
    assert claims["b"]["verdict"] == "holds"

    again = FakeRunner()
    assert reproduce.main(["--root", str(root)], runner=again) == 0
    assert again.names == ["sam_rho0.1_s2"]  # finished runs are skipped
    data = json.loads((root / "verdicts.json").read_text())
    assert data["unfinished"] == [] and {c["claim"]: c for c in data["claims"]}["a"]["effects"][0]["seeds"] == [0, 1, 2]
    assert not (root / "runs").exists()  # the root holds the runs themselves: no copies to be read twice


def test_verdicts_and_every_runs_results_json_go_to_the_results_folder(reproduce, tmp_path):
    """Issue 25: the evidence behind the verdicts (every run's results.json, with no absolute path) is written
    next to them, in the folder meant to be committed."""
    root, results = tmp_path / "grid", tmp_path / "results" / "reproduce-vision-quick"
    assert reproduce.main(["--root", str(root), "--results_dir", str(results)], runner=FakeRunner()) == 0
    copies = sorted(p.parent.name for p in (results / "runs").glob("*/results.json"))
    assert copies == sorted(p.parent.name for p in root.glob("*/results.json")) and len(copies) == 9
    assert (results / "verdicts.md").is_file() and not list(results.rglob("model"))
    for path in [*results.rglob("*.json"), results / "verdicts.md"]:
        assert str(tmp_path) not in path.read_text(), path  # portable: relative paths only
    # and the sentence that points to them names a path that exists there
    assert "one folder per run under `runs/` (e.g. `runs/erm_s0/results.json`" in (results / "verdicts.md").read_text()
    assert (results / "runs" / "erm_s0" / "results.json").is_file()


def _guarded(reproduce, *argv: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: reproduce.main(list(argv), runner=FakeRunner()))
    return exit_.value.code


@pytest.mark.parametrize("argv, message", [
    (["--task", "audio"], "--task: unknown task 'audio'; choose one of: vision, text, segmentation"),
    (["--scale", "huge"], "--scale: unknown scale 'huge'; choose one of: quick, cpu, gpu"),
    (["--seeds", "0"], "--seeds: 0 must be >= 1"),
    (["--seeds", "two"], "--seeds: invalid int value"),
    (["--eval_attacks", "fgsm"], "--eval_attacks: unknown suite or attack 'fgsm'"),
    (["--task", "text", "--eval_attacks", "autoattack"], "pixel-space image classifiers only"),
    (["--", "--seed", "3"], "--seed is set by reproduce itself"),
    (["--", "--eval_attacks", "apgd"], "--eval_attacks is a flag of reproduce itself"),
    (["--accelerate_args", "--num_processes 2"], "--accelerate_args needs --launcher accelerate"),
])
def test_bad_input_is_one_line_and_exit_2(reproduce, capsys, tmp_path, argv, message):
    root = tmp_path / "r"
    assert _guarded(reproduce, "--root", str(root), *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not root.exists()


def test_a_finished_run_made_with_other_flags_is_refused_not_reported(reproduce, capsys, tmp_path):
    root = tmp_path / "r"
    assert reproduce.main(["--root", str(root), "--seeds", "2", "--efficient_sam", "mesa"],
                          runner=FakeRunner()) == 0
    verdicts = (root / "verdicts.md").read_text()
    # the same request again: every finished run matches its planned flags, nothing to refuse
    assert reproduce.main(["--root", str(root), "--seeds", "2", "--efficient_sam", "mesa", "--verdicts_only"],
                          runner=FakeRunner()) == 0
    # one MESA run was made with another EMA decay (copied in, or a root filled by hand: no manifest)
    path = root / "mesa_s1" / "results.json"
    doc = json.loads(path.read_text())
    doc["config"]["method"]["mesa_decay"] = 0.99
    path.write_text(json.dumps(doc))
    (root / "reproduce.json").unlink()
    (root / "verdicts.md").write_text(verdicts)
    assert _guarded(reproduce, "--root", str(root), "--seeds", "2", "--efficient_sam", "mesa",
                    "--verdicts_only") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert ("mesa_s1 finished with other flags than this request plans for it (--mesa_decay 0.99 there, None here)"
            in err)
    assert (root / "verdicts.md").read_text() == verdicts  # nothing rewritten
    # asking for what that run was made with: the other seed's run (default decay) is the mismatch now
    assert _guarded(reproduce, "--root", str(root), "--seeds", "2", "--efficient_sam", "mesa", "--verdicts_only",
                    "--", "--mesa_decay", "0.99") == 2
    assert "mesa_s0 finished with other flags than this request plans for it (--mesa_decay None there, 0.99 here)" \
        in capsys.readouterr().err


def test_root_with_another_tasks_runs_is_refused(reproduce, capsys, tmp_path):
    other = tmp_path / "r" / "erm_s0"
    other.mkdir(parents=True)
    data = results("erm", 0, 0.8, 0.3)
    data["task"] = "text"
    (other / "results.json").write_text(json.dumps(data))
    assert _guarded(reproduce, "--root", str(tmp_path / "r")) == 2
    assert "holds a 'text' run" in capsys.readouterr().err
    # and a root filled by another scale or task (its manifest)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "reproduce.json").write_text(json.dumps({"task": "vision", "scale": "cpu",
                                                              "eval_attacks": "apgd", "passthrough": []}))
    assert _guarded(reproduce, "--root", str(tmp_path / "q")) == 2
    assert "holds runs of another request (scale, eval_attacks" in capsys.readouterr().err
    assert _guarded(reproduce, "--task", "text", "--root", str(tmp_path / "q")) == 2
    assert "holds a reproduction of task 'vision'" in capsys.readouterr().err


@pytest.mark.slow  # six real runs: about a minute on an idle CPU (runs in CI; -m "not slow" skips it locally)
def test_end_to_end_tiny_runs(tmp_path):
    """The real thing on 2 seeds with 2 optimizer steps per run: six scripts/run.py subprocesses, then verdicts
    from their results.json (cost from the engine's exact pass counts)."""
    root = tmp_path / "e2e"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--seeds", "2", "--root", str(root), "--",
         "--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "16", "--batch_size", "16",
         "--eval_linf", "8/255", "--eval_l2", "none", "--sharpness_examples", "0", "--log_with", "none",
         "--divergence_guard", "false"],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reproduce: run 6/6 pgd-at_eps2-255_s1" in proc.stdout
    data = json.loads((root / "verdicts.json").read_text())
    cost = {c["claim"]: c for c in data["claims"]}["c"]
    assert cost["verdict"] == "holds", cost  # ERM 1, SAM 2, PGD-3 4 forward-backward passes per step
    assert [round(e["mean"], 6) for e in cost["effects"]] == [2.0, 4.0]


def test_few_step_presets_take_a_half_eps_step(reproduce, capsys, tmp_path):
    """PGD-3 AT with the pixel grid's eps/4 step cannot leave a 3/4-eps ball around its start; the cpu preset
    asks for eps/2 (its alpha_ratio), which the runs receive as --train_alpha."""
    commands = _print(reproduce, capsys, "--scale", "cpu", "--root", str(tmp_path / "r"))
    at = [c for c in commands if _flag(c, "--method") == "pgd-at"]
    assert at and all(_flag(c, "--train_alpha") == "1/255" and _flag(c, "--train_eps") == "2/255" for c in at)
    gpu = [c for c in _print(reproduce, capsys, "--scale", "gpu", "--root", str(tmp_path / "g"))
           if _flag(c, "--method") == "pgd-at" and _flag(c, "--train_eps") == "8/255"]
    assert gpu and all(_flag(c, "--train_alpha") == "2/255" for c in gpu)  # PGD-10: the grid's eps/4


def test_verdicts_only_trains_nothing(reproduce, capsys, tmp_path):
    root = tmp_path / "grid"
    first = FakeRunner(fail=tuple(f"pgd-at_eps2-255_s{s}" for s in range(3)))
    assert reproduce.main(["--root", str(root)], runner=first) == 1
    capsys.readouterr()
    idle = FakeRunner()
    assert reproduce.main(["--root", str(root), "--verdicts_only"], runner=idle) == 0
    assert idle.names == []  # nothing trained
    data = json.loads((root / "verdicts.json").read_text())
    assert sorted(data["unfinished"]) == [f"pgd-at_eps2-255_s{s}" for s in range(3)]
    assert {c["claim"]: c["verdict"] for c in data["claims"]}["b"] == "inconclusive at this sample size"
    assert _guarded(reproduce, "--root", str(tmp_path / "empty"), "--verdicts_only") == 2
    assert "no finished runs" in capsys.readouterr().err


class DataRunner(FakeRunner):
    """A FakeRunner whose results say which data and model they ran on (from the command's flags)."""

    def __call__(self, command: list[str]) -> int:
        code = super().__call__(command)
        path = Path(_flag(command, "--output_dir")) / "results.json"
        record = json.loads(path.read_text())
        record["data"] = {"dataset": _flag(command, "--dataset") or "fashion_mnist",
                          "model": _flag(command, "--model"),
                          "train_examples": int(_flag(command, "--max_train_samples")), "eval_examples": 500}
        path.write_text(json.dumps(record))
        return code


def test_the_summary_names_the_dataset_the_user_gave(reproduce, capsys, tmp_path):
    """Issue 24: `-- --dataset <other>` is what the headline, verdicts.md and verdicts.json describe."""
    root = tmp_path / "other"
    argv = ["--root", str(root), "--seeds", "1", "--", "--dataset", "my/leaves", "--max_train_samples", "300"]
    assert reproduce.main(argv, runner=DataRunner()) == 0
    out = capsys.readouterr().out
    headline = next(line for line in out.splitlines() if line.startswith("reproduce: vision at scale quick"))
    assert "small_cnn on my/leaves, 300 training examples, 6 epochs, 500 evaluation examples" in headline
    assert "Fashion-MNIST" not in headline and "LOW-POWERED" in headline
    md = (root / "verdicts.md").read_text()
    assert "small_cnn on my/leaves" in md and "Fashion-MNIST" not in md
    assert "`my/leaves` with `small_cnn` (300 training, 500 evaluation examples)" in md
    verdicts = json.loads((root / "verdicts.json").read_text())
    assert "my/leaves" in verdicts["preset"]["summary"] and "Fashion-MNIST" not in verdicts["preset"]["summary"]
    assert verdicts["data_used"] == [{"dataset": "my/leaves", "model": "small_cnn", "train_examples": 300,
                                      "eval_examples": 500}]
    # without such flags the preset's own summary stands
    assert reproduce.main(["--root", str(tmp_path / "plain"), "--seeds", "1"], runner=DataRunner()) == 0
    out = capsys.readouterr().out
    assert "5,000 Fashion-MNIST images" in out
    # and it names the seeds that ran, not the preset's default count
    assert "; 1 seed (--seeds; the preset's 3)" in out and "3 seeds" not in out
    # the preset's own count, named once, from its field
    from samat.analysis.reproduce import PRESETS, plan_reproduction, summary
    for task, scale in PRESETS:
        text = summary(plan_reproduction(task, scale, root=str(tmp_path / task / scale)))
        assert text.endswith("; 3 seeds") and len(re.findall(r"\d seeds?\b", text)) == 1, text
