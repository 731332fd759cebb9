"""Sharded engines (issue 20): what a launch under FSDP or DeepSpeed may run is decided before anything is
written. SAM-family methods are refused under DeepSpeed and FSDP1 with one line naming FSDP2; under FSDP
``--sam_sync`` defaults to ``global`` and ``local`` is refused; ERM and plain AT pass. The engine is read from the
environment ``accelerate launch`` sets, and a run records what it asked for and what Accelerate engaged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

from samat.common.errors import UsageError
from samat.common.resolve import Engine

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--task", "vision", "--model", "small_cnn", "--max_train_samples", "32", "--max_eval_samples", "8",
        "--max_steps", "2", "--sharpness_examples", "0", "--log_with", "none"]


@pytest.fixture(scope="module")
def run_py():
    return load_script("run")


@pytest.mark.parametrize("env, engine", [
    ({}, Engine()),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, Engine("deepspeed")),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, Engine("fsdp", 2)),
    ({"ACCELERATE_USE_FSDP": "true"}, Engine("fsdp", 1)),  # the launcher's own default version
])
def test_the_engine_is_read_from_the_launchers_environment(monkeypatch, env, engine):
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Engine.from_environment() == engine


def _resolve(run_py, tmp_path, engine, *flags):
    from accelerate import PartialState

    run, method_args, evals, task = run_py.parse([*TINY, "--output_dir", str(tmp_path / "r"), *flags])
    from samat.common.resolve import resolve_run

    return resolve_run(run, method_args, evals, task, on_gpu=PartialState().device.type != "cpu", engine=engine)


@pytest.mark.parametrize("method", ["sam", "asam", "sam-at", "sam-every-k", "looksam", "ae-sam-at"])
def test_sam_family_is_refused_under_deepspeed_and_fsdp1(run_py, tmp_path, method):
    with pytest.raises(UsageError, match="not supported under DeepSpeed.*--use_fsdp --fsdp_version 2"):
        _resolve(run_py, tmp_path, Engine("deepspeed"), "--method", method)
    with pytest.raises(UsageError, match="FSDP version 1.*--fsdp_version 2"):
        _resolve(run_py, tmp_path, Engine("fsdp", 1), "--method", method)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("method", ["erm", "pgd-at", "trades"])
def test_erm_and_plain_at_pass_under_every_engine(run_py, tmp_path, method):
    for engine in (Engine("deepspeed"), Engine("fsdp", 1), Engine("fsdp", 2)):
        assert _resolve(run_py, tmp_path, engine, "--method", method).method.method.name == method


def test_fsdp_takes_the_global_ascent_and_refuses_local(run_py, tmp_path):
    assert _resolve(run_py, tmp_path, Engine("fsdp", 2), "--method", "sam").method.sam_sync == "global"
    assert _resolve(run_py, tmp_path, Engine(), "--method", "sam").method.sam_sync == "local"  # DDP default
    with pytest.raises(UsageError, match="--sam_sync local: under FSDP.*use --sam_sync global"):
        _resolve(run_py, tmp_path, Engine("fsdp", 2), "--method", "sam", "--sam_sync", "local")


def test_a_deepspeed_launch_of_sam_is_one_error_line(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run.py"), *TINY, "--method", "sam",
                           "--output_dir", str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --method sam is not supported under DeepSpeed")
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


def test_a_run_records_the_engine_asked_for_and_engaged(run_py, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    run_py.main([*TINY, "--method", "sam", "--output_dir", str(tmp_path / "r")])
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    # one CPU process: Accelerate engages no FSDP here, and the record says so instead of claiming sharding
    assert results["engine"] == {"requested": "fsdp", "fsdp_version": 2, "engaged": "NO"}
    assert results["method_resolved"]["sam_sync"] == "global"
