"""The install: one `samat` package that neither shadows nor is shadowed by a user's own top-level modules,
the `samat` console script, and the typed, versioned results record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _user_project(tmp_path: Path) -> Path:
    """A user's project with its own top-level `common`, `text` and `vision` packages."""
    for name in ("common", "text", "vision"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'user'\n")
        (tmp_path / name / "data.py").write_text("raise ImportError('the user module was imported by samat')\n")
    return tmp_path


def test_users_own_common_neither_shadows_nor_is_shadowed(tmp_path):
    project = _user_project(tmp_path)
    code = ("import common, text, vision\n"
            "assert common.OWNER == text.OWNER == vision.OWNER == 'user'\n"
            "from samat.common.registry import task_class\n"
            "import samat.common.experiment, samat.common.data\n"
            "task_class('vision'); task_class('segmentation')\n"
            "import common\n"
            "assert common.OWNER == 'user' and samat.common.data.__file__.endswith('common/data.py')\n"
            "assert 'samat' not in common.__file__ and str(common.__file__).startswith(%r)\n" % str(project))
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, env={**ENV, "PYTHONPATH": str(project)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_run_works_next_to_a_users_common(tmp_path):
    project = _user_project(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run.py"), "--model", "small_cnn", "--width", "4",
         "--max_train_samples", "64", "--max_eval_samples", "32", "--batch_size", "32", "--max_steps", "1",
         "--eval_linf", "1/255", "--eval_l2", "none", "--eval_steps", "1", "--sharpness_examples", "0",
         "--log_with", "none", "--output_dir", str(out)],
        cwd=project, env={**ENV, "PYTHONPATH": str(project)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["schema_version"] == 1


def test_console_script_dispatches_and_rejects_unknown_commands():
    samat = str(Path(sys.executable).with_name("samat"))
    proc = subprocess.run([samat, "--help"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0 and "run" in proc.stdout and "report" in proc.stdout
    proc = subprocess.run([samat, "run", "--help"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0 and "--rho" in proc.stdout and "samat run" in proc.stdout
    proc = subprocess.run([samat, "trian"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown command 'trian'; choose one of: " + ", ".join(_commands())]


def _commands() -> list[str]:
    from samat.scripts import COMMANDS

    return list(COMMANDS)


# ------------------------------------------------------------------------------------------- results


def _legacy_results() -> dict:
    """A results.json as written before schema_version existed (schema 0), with TextAttack summaries."""
    return {"task": "text", "method": "sam", "headline_metric": "accuracy",
            "metrics": {"clean": {"accuracy": 0.8, "examples": 10},
                        "robust": {"pgd-l2": {"0.02": {"accuracy": 0.6, "examples": 10}}},
                        "textattack": {"pwws": {"accuracy_under_attack": 0.1, "attack_success_rate": 0.875,
                                                "num_examples": 10, "note": "text is not a column"}}},
            "cost": {"optimizer_steps": 3, "forward_passes": 6, "backward_passes": 6, "train_wall_s": 1.0},
            "sanity": {"passed": True, "checks": []}, "collapsed": False, "diagnostics": {"kept": True}}


def test_results_round_trip_and_schema_0_upgrade(tmp_path):
    from samat.common.results import SCHEMA_VERSION, RunResults

    results = RunResults.from_dict(_legacy_results())
    assert results.schema_version == SCHEMA_VERSION == 1
    assert results.columns == {"textattack/pwws/accuracy_under_attack": 0.1,
                               "textattack/pwws/attack_success_rate": 0.875, "textattack/pwws/num_examples": 10.0}
    assert results.extra == {"diagnostics": {"kept": True}}  # unknown blocks survive a round trip
    assert results.robust() == [("pgd-l2", "0.02", 0.6)] and results.clean == 0.8
    results.write(tmp_path / "results.json")
    again = RunResults.read(tmp_path / "results.json")
    assert again == results
    assert "| pwws" in again.table() and again.summary_line().endswith("sanity checks passed, no warnings")


def test_results_refuse_other_documents_and_newer_schemas(tmp_path):
    from samat.common.errors import UsageError
    from samat.common.results import RunResults

    with pytest.raises(UsageError, match="not a samat results file"):
        RunResults.from_dict({"rows": []}, source="x.json")
    with pytest.raises(UsageError, match="schema_version 7"):
        RunResults.from_dict({**_legacy_results(), "schema_version": 7}, source="x.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot read results"):
        RunResults.read(tmp_path / "bad.json")


def test_pass_counts_are_declared_once_and_the_files_keep_their_key_order(tmp_path):
    from dataclasses import asdict

    from samat.common.checkpoint import STATE_FILE, TrainState
    from samat.common.cost import PassCounter
    from samat.common.results import Cost, PassCounts

    counts = ["forward_passes", "backward_passes", "forward_examples", "backward_examples"]
    assert list(PassCounts.names()) == list(PassCounter.FIELDS) == counts
    # The key order of trainer_state.json and results.json's "cost", as before the counts were shared.
    assert list(asdict(TrainState())) == ["step", "train_wall_s", *counts, "train_examples", "task"]
    assert list(asdict(Cost())) == ["train_wall_s", "eval_wall_s", "optimizer_steps", *counts, "train_examples"]
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 4, "forward_passes": 9, "unknown": 1}))
    state = TrainState.read(tmp_path)
    assert (state.step, state.forward_passes, state.backward_passes) == (4, 9, 0)
    target = Cost()
    PassCounter.copy_counts(TrainState(forward_passes=1, backward_passes=2, forward_examples=3,
                                       backward_examples=4), target)
    assert [getattr(target, name) for name in counts] == [1, 2, 3, 4]


def test_summary_line_carries_collapse_failed_checks_and_task_warnings():
    from samat.common.results import RunResults

    values = {**_legacy_results(), "collapsed": True, "predicted_class_counts": {"0": 10, "1": 0},
              "sanity": {"passed": False, "checks": [{"name": "pgd-l2_le_clean", "passed": False}]},
              "warnings": ["mIoU 0.11 is within 0.02 of the majority-class baseline 0.10"],
              "diagnostics": {"passed": False, "checks": [{"name": "huge_radius_at_chance", "passed": False,
                                                            "detail": "accuracy 0.9 at 64/255"}]}}
    line = RunResults.from_dict(values).summary_line()
    assert "passed" not in line.split(";")[-1]
    assert "collapsed" in line and "pgd-l2_le_clean" in line and "majority-class baseline" in line
    assert "robust accuracy may be overestimated: huge_radius_at_chance (accuracy 0.9 at 64/255)" in line


# ------------------------------------------------------------------------------------------ module graph


def _modules() -> dict[str, Path]:
    """Every module of the installed packages (pyproject.toml's list; the repository root is ``samat``):
    dotted name -> file."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    out = {}
    for package in packages:
        for path in sorted(ROOT.joinpath(*package.split(".")[1:]).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """``[(imported samat module, imported name or "", line)]`` for every import statement of a module:
    top level, under ``if TYPE_CHECKING:`` and inside functions alike. ``from pkg import mod`` counts as an
    import of ``pkg.mod``; relative imports are resolved against the module's package."""
    import ast

    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                out.append((child, "", node.lineno) if child in modules else (base, alias.name, node.lineno))
    return [(target, what, line) for target, what, line in out if target.split(".")[0] == "samat"]


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t, _, _ in _imports(name, path, modules) if t in modules and t != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; self-loops aside."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_scan_sees_type_only_lazy_and_relative_imports_and_finds_cycles(tmp_path):
    source = tmp_path / "sam.py"
    source.write_text("from typing import TYPE_CHECKING\nimport torch\nfrom . import step\n"
                      "if TYPE_CHECKING:\n    from .methods import StepContext\n"
                      "def f():\n    from ..vision.task import _private\n")
    modules = {"samat.common.step": source, "samat.common.methods": source}
    assert _imports("samat.common.sam", source, modules) == [
        ("samat.common.step", "", 3), ("samat.common.methods", "StepContext", 5),
        ("samat.vision.task", "_private", 7)]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_samat_modules_type_only_and_lazy_ones_included():
    graph = _import_graph()
    assert len(graph) > 60 and "samat.common.step" in graph["samat.common.sam"]
    assert _cycles(graph) == []


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    private = [f"{name}:{line} imports {what} from {target}"
               for name, path in modules.items() for target, what, line in _imports(name, path, modules)
               if what.startswith("_") and not what.startswith("__")
               or target.rpartition(".")[2].startswith("_") and not target.endswith("__")]
    assert private == []


def test_tasks_set_state_on_self_only_when_constructed():
    """What a task learns while building travels in ``TaskData.task`` (a copy, ``Task.learned``), never on
    ``self``: outside ``__init__``, no method of a task module assigns to ``self.<attribute>``."""
    import ast

    offenders = []
    for path in sorted(ROOT.glob("*/task.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or node.name == "__init__" or path.parent.name == "common" \
                    and node.name == "learned":
                continue
            for inner in ast.walk(node):
                targets = inner.targets if isinstance(inner, ast.Assign) else \
                    [inner.target] if isinstance(inner, (ast.AnnAssign, ast.AugAssign)) else []
                for target in targets:
                    for t in ast.walk(target):
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                            offenders.append(f"{path.parent.name}/task.py:{inner.lineno} {node.name}: self.{t.attr}")
    assert not offenders, offenders
    assert len(list(ROOT.glob("*/task.py"))) >= 4  # common, vision, text, segmentation
