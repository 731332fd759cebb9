"""scripts/report.py on synthetic results.json files: the tables carry the right means and stds, every
figure is written, the three tasks' shapes are understood, and bad input is a one-line error with nothing
written."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

from samat.common.cli import main_guard

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("clean_vs_robust.png", "robust_vs_eps.png", "sweep_rho_eps.png", "cost.png", "sharpness_vs_robust.png")


def _script():
    return load_script("report")


def _guarded_main(*argv: str) -> int:
    """The exit status of scripts/report.py's main run as its command line runs it (through main_guard)."""
    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: _script().main(list(argv)))
    return exit_.value.code


def fake_results(task: str, method: str, seed: int, clean: float, robust_drop: float, *, rho=None, eps=None,
                 sharp: float | None = 0.01, fwd: int = 100) -> dict:
    """A results.json as scripts/run.py writes it, with robust = clean - robust_drop * k at the k-th eps."""
    headline = "miou" if task == "segmentation" else "accuracy"
    linf = ["1/255", "2/255", "4/255", "8/255"] if task != "text" else ["0.001"]
    l2 = ["0.25", "0.5"] if task != "text" else ["0.02", "0.05"]
    robust = {"pgd-linf": {e: {headline: clean - robust_drop * (k + 1)} for k, e in enumerate(linf)},
              "pgd-l2": {e: {headline: clean - robust_drop * (k + 1)} for k, e in enumerate(l2)}}
    if task == "segmentation":
        robust["segpgd-linf"] = {e: {headline: clean - 2 * robust_drop * (k + 1)} for k, e in enumerate(linf)}
    metrics = {"clean": {headline: clean}, "robust": robust}
    if task == "text":
        metrics["textattack"] = {"deepwordbug": {"accuracy_under_attack": clean - 0.3, "attack_success_rate": 0.4,
                                                 "avg_perturbed_word_pct": 12.0, "avg_queries": 40.0,
                                                 "num_examples": 50}}
    resolved = {"method": method}
    if rho is not None:
        resolved.update(rho=rho, sam_sync="local")
    if eps is not None:
        resolved.update(eps=eps, alpha=eps / 4, steps=10, norm="linf")
    out = {"task": task, "method": method, "headline_metric": headline,
           "config": {"run": {"seed": seed, "task": task, "method": method},
                      "method": {"rho": rho, "train_eps": None}, "eval": {}, "task": {}},
           "method_resolved": resolved, "metrics": metrics,
           "cost": {"train_wall_s": 10.0 * fwd / 100 + seed, "eval_wall_s": 2.0, "optimizer_steps": 50,
                    "forward_passes": fwd, "backward_passes": fwd, "forward_examples": 32 * fwd,
                    "backward_examples": 32 * fwd, "train_examples": 3200},
           "device": "cpu", "num_processes": 1, "mixed_precision": "no", "versions": {"python": "3.11"},
           "sanity": {"passed": True, "checks": [{"name": "pgd-linf_le_clean", "passed": True}]},
           "finished_at": "2026-11-25T18:00:00+00:00"}
    if sharp is not None:
        out["sharpness"] = {"estimator": "...", "steps": 5, "eta": 0.01, "num_examples": 256, "loss": 0.3,
                            "sam": {"0.05": {"perturbed_loss": 0.3 + sharp, "sharpness": sharp,
                                             "perturbation_norm": 0.05},
                                    "0.1": {"perturbed_loss": 0.3 + 3 * sharp, "sharpness": 3 * sharp,
                                            "perturbation_norm": 0.1}},
                            "asam": {"0.5": {"perturbed_loss": 0.3 + 2 * sharp, "sharpness": 2 * sharp,
                                             "perturbation_norm": 0.2}}}
    return out


def write_sweep(root: Path, task: str = "vision") -> None:
    """ERM, SAM at two rho and PGD-AT at two eps, two seeds each, written as a sweep would."""
    settings = [("erm", None, None, 0.90, 0.20, 0.05, 100), ("sam", 0.05, None, 0.91, 0.15, 0.02, 200),
                ("sam", 0.1, None, 0.90, 0.12, 0.01, 200), ("pgd-at", None, 2 / 255, 0.85, 0.05, 0.08, 1100),
                ("pgd-at", None, 8 / 255, 0.80, 0.02, 0.12, 1100)]
    for method, rho, eps, clean, drop, sharp, fwd in settings:
        for seed in (0, 1):
            name = f"{method}" + (f"-rho{rho:g}" if rho else "") + (f"-eps{round(eps * 255)}" if eps else "")
            d = root / f"{name}-s{seed}"
            d.mkdir(parents=True)
            data = fake_results(task, method, seed, clean + 0.01 * seed, drop, rho=rho, eps=eps, sharp=sharp,
                                fwd=fwd)
            (d / "results.json").write_text(json.dumps(data))


def test_report_builds_tables_csv_and_every_figure(tmp_path):
    runs = tmp_path / "runs"
    write_sweep(runs)
    # an interrupted run: checkpoints, no results.json
    (runs / "sam-rho0.2-s0" / "checkpoints" / "step_10").mkdir(parents=True)
    out = tmp_path / "rep"
    assert _script().main([str(runs), "--out", str(out)]) == 0
    for name in FIGURES:
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    md = (out / "report.md").read_text()
    assert "# samat report: vision" in md and "10 run(s) in 5 setting(s)" in md
    # SAM rho 0.05: clean 0.91 and 0.92 over seeds 0/1 -> mean 0.915, std 0.00707
    row = next(line for line in md.splitlines() if line.startswith("| sam rho=0.05 |"))
    assert "2 (0, 1)" in row and "0.9150 ± 0.0071" in row
    assert "| pgd-at eps=8/255 |" in md and "pgd-linf 8/255" in md
    assert "sam@0.05" in md and "asam@0.5" in md
    # cost: SAM's forward passes are 2x ERM's, AT's 11x
    cost_row = next(line for line in md.splitlines() if line.startswith("| pgd-at eps=2/255 |") and "1100" in line)
    assert cost_row.rstrip(" |").endswith("| 11.00 | 11.00")  # passes and examples × ERM
    assert "sam-rho0.2-s0" in md  # listed as unfinished
    for name in FIGURES:
        assert f"]({name})" in md
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r["method"] for r in rows} == {"erm", "sam", "pgd-at"}
    erm0 = next(r for r in rows if r["setting"] == "erm" and r["seed"] == "0")
    assert float(erm0["clean_accuracy"]) == 0.90
    assert float(erm0["pgd-linf@8/255_accuracy"]) == pytest.approx(0.90 - 4 * 0.20)
    assert float(erm0["sharpness_sam@0.05"]) == 0.05 and erm0["rho"] == "" and erm0["train_eps"] == ""
    with open(out / "summary.csv") as f:
        summary = {r["setting"]: r for r in csv.DictReader(f)}
    assert list(summary) == ["erm", "sam rho=0.05", "sam rho=0.1", "pgd-at eps=2/255", "pgd-at eps=8/255"]
    assert float(summary["sam rho=0.1"]["clean_accuracy_mean"]) == pytest.approx(0.905)


@pytest.mark.parametrize("task, expect", [
    ("segmentation", ["clean miou", "segpgd-linf 8/255"]),
    ("text", ["deepwordbug acc. under attack", "## TextAttack", "pgd-l2 0.05"]),
])
def test_other_tasks(tmp_path, task, expect):
    runs = tmp_path / "runs"
    write_sweep(runs, task)
    assert _script().main([str(runs), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    for text in expect:
        assert text in md, text
    header = (tmp_path / "rep" / "results.csv").read_text().splitlines()[0]
    if task == "text":
        assert "textattack_deepwordbug_accuracy_under_attack" in header
        assert "eps=0.00784314" in md and "/255" not in md  # embedding radii are not pixel fractions
    else:
        assert "clean_miou" in header and "segpgd-linf@8/255_miou" in header


def test_without_sharpness_or_erm_still_builds(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0,):
        d = runs / f"sam-s{seed}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(fake_results("vision", "sam", seed, 0.9, 0.1, rho=0.05,
                                                                sharp=None)))
    assert _script().main([str(runs)]) == 0  # default --out: <runs>/report
    out = runs / "report"
    assert not (out / "sharpness_vs_robust.png").exists() and (out / "sweep_rho_eps.png").exists()
    assert "0.9000 |" in (out / "report.md").read_text()  # one seed: no ± std


def test_runs_differing_in_another_hyper_parameter_are_separate_settings(tmp_path):
    """Two pgd-at runs at one eps and seed, one with a clean term, are two settings, not two 'seeds'."""
    runs = tmp_path / "runs"
    for weight, clean in ((0.0, 0.80), (0.5, 0.90)):
        for seed in (0, 1):
            data = fake_results("text", "pgd-at", seed, clean, 0.1, eps=0.02)
            data["method_resolved"]["at_clean_weight"] = weight
            d = runs / f"w{weight}-s{seed}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(data))
    assert _script().main([str(runs), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| pgd-at eps=0.02 at_clean_weight=0 | 2 (0, 1) | 0.8000 ± 0.0000 |" in text
    assert "| pgd-at eps=0.02 at_clean_weight=0.5 | 2 (0, 1) | 0.9000 ± 0.0000 |" in text
    with open(tmp_path / "report" / "results.csv") as f:
        settings = {row["setting"] for row in csv.DictReader(f)}
    assert settings == {"pgd-at eps=0.02 at_clean_weight=0", "pgd-at eps=0.02 at_clean_weight=0.5"}
    from samat.analysis.runs import group, load_runs

    # the figures draw one line per variant (dash pattern) instead of joining the two settings
    assert [s.variant for s in group(load_runs([str(runs)]))] == [" at_clean_weight=0", " at_clean_weight=0.5"]


def test_runs_differing_in_their_recipe_are_separate_settings_but_not_in_bookkeeping(tmp_path):
    """A 5-epoch and a 10-epoch run of one seed are two settings, never two 'seeds' of one; runs differing only
    in where they were written or how many threads they used are seeds of one setting."""
    from samat.analysis.runs import group, load_runs

    runs = tmp_path / "runs"
    for epochs, clean in ((5.0, 0.42), (10.0, 0.47)):
        for seed in (0, 1):
            data = fake_results("segmentation", "erm", seed, clean, 0.1)
            data["config"]["run"].update(epochs=epochs, output_dir=f"runs/e{epochs:g}-s{seed}", cpu_threads=seed + 1)
            d = runs / f"e{epochs:g}-s{seed}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(data))
    settings = group(load_runs([str(runs)]))
    assert sorted((s.name, len(s.runs)) for s in settings) == [("erm epochs=10", 2), ("erm epochs=5", 2)]
    assert {s.name: round(s.of(lambda r: r.clean).mean, 4) for s in settings} == {"erm epochs=5": 0.42,
                                                                                  "erm epochs=10": 0.47}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_mixed_tasks_is_a_one_line_error_and_writes_nothing(tmp_path):
    runs = tmp_path / "runs"
    write_sweep(runs / "v", "vision")
    (runs / "t").mkdir()
    (runs / "t" / "results.json").write_text(json.dumps(fake_results("text", "erm", 0, 0.8, 0.1)))
    proc = _cli(str(runs), "--out", str(tmp_path / "rep"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "results from different tasks" in line and "vision: 10 run(s)" in line and "text: 1 run(s)" in line
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("setup, message", [
    ("empty", "no results.json under"),
    ("missing", "no such file or folder"),
    ("broken", "not a readable JSON file"),
    ("foreign", "not a samat results.json"),
])
def test_bad_input_in_process(tmp_path, capsys, setup, message):
    runs = tmp_path / "runs"
    runs.mkdir()
    if setup == "broken":
        (runs / "results.json").write_text("{not json")
    elif setup == "foreign":
        (runs / "results.json").write_text(json.dumps({"accuracy": 0.9}))
    target = str(runs / "nope") if setup == "missing" else str(runs)
    assert _guarded_main(target, "--out", str(tmp_path / "rep")) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "rep").exists()


def test_unknown_sharpness_key(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_sweep(runs)
    assert _guarded_main(str(runs), "--sharpness", "sam@9", "--out", str(tmp_path / "rep")) == 2
    assert "available: sam@0.05, sam@0.1, asam@0.5" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


def test_method_lists_follow_the_engine_registry():
    """The report's method order and figure styles name every method of the registry, in its order."""
    from samat.analysis.figures import STYLE
    from samat.analysis.runs import METHOD_ORDER
    from samat.common.methods import METHODS

    assert METHOD_ORDER == tuple(METHODS) and set(STYLE) == set(METHODS)


def test_results_without_columns_are_upgraded_and_new_columns_are_read_generically(tmp_path):
    """A schema-0 file's extra metrics block becomes "group/row/field" columns; a file with ``columns``
    is read as it is, whatever the group is called; two seeds get a 95 % interval."""
    runs = tmp_path / "runs"
    old = fake_results("text", "erm", 0, 0.8, 0.1)
    new = fake_results("text", "erm", 1, 0.9, 0.1)
    del new["metrics"]["textattack"]
    new.update(schema_version=1, columns={"probe/alpha/accuracy_under_attack": 0.25, "probe/alpha/queries": 7.0})
    for name, data in (("old", old), ("new", new)):
        (runs / name).mkdir(parents=True)
        (runs / name / "results.json").write_text(json.dumps(data))
    from samat.analysis.runs import load_runs
    from samat.analysis.tables import headline_keys

    loaded = {r.seed: r for r in load_runs([str(runs)])}
    assert loaded[0].columns["textattack/deepwordbug/accuracy_under_attack"] == pytest.approx(0.5)
    assert loaded[1].columns == {"probe/alpha/accuracy_under_attack": 0.25, "probe/alpha/queries": 7.0}
    assert "probe/alpha/accuracy_under_attack" in headline_keys(list(loaded.values()))
    assert _script().main([str(runs), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## probe" in md and "alpha acc. under attack" in md
    # two seeds, clean 0.8 and 0.9: mean 0.85, std 0.0707, 95 % t-interval 0.85 ± 12.706 * 0.0707 / sqrt(2)
    assert "| erm | 2 (0, 1) | 0.8500 ± 0.0707 |" in md and "| erm | 0.8500 [0.2147, 1.4853] |" in md
    header = (tmp_path / "rep" / "results.csv").read_text().splitlines()[0]
    assert "probe_alpha_queries" in header and "textattack_deepwordbug_avg_queries" in header


def test_runs_own_pictures_are_linked_relative_to_the_report(tmp_path):
    """Segmentation names its picture in metrics.segmentation.figure: the report links it (a run whose file is
    missing gets no broken link)."""
    from samat.analysis.report import build_report

    root = tmp_path / "runs"
    for seed, draw in ((0, True), (1, False)):
        d = root / f"erm-s{seed}"
        d.mkdir(parents=True)
        data = fake_results("segmentation", "erm", seed, 0.6, 0.05)
        data["metrics"]["segmentation"] = {"figure": "segmentations.png", "clean_miou": 0.6}
        (d / "results.json").write_text(json.dumps(data))
        if draw:
            (d / "segmentations.png").write_bytes(b"\x89PNG fake")
    md = build_report([str(root)], out_dir=tmp_path / "out")["report.md"].decode()
    assert "## Pictures" in md and "![erm](../runs/erm-s0/segmentations.png)" in md
    assert "erm-s1/segmentations.png" not in md


def test_committed_results_hold_no_absolute_path():
    """Issue 25: committed evidence is portable: no file under results/ names a folder of the machine that
    made it (run_dir and every other path relative to the results folder)."""
    import re
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-files", "results"], cwd=repo, capture_output=True, text=True).stdout.split()
    absolute = re.compile(r"(?<![\w.:/])/(?:work|home|root|tmp|Users|mnt|data|scratch|opt|var|private)/")
    bad = [name for name in listed if name.endswith((".md", ".csv", ".json"))
           and absolute.search((repo / name).read_text(errors="replace"))]
    assert bad == []
