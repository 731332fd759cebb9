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
import torch
import torch.nn.functional as F
from helpers import free_port, load_script, resolved

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


@pytest.mark.parametrize("method", ["sam-every-k", "looksam", "ae-sam", "saf", "mesa-at"])
def test_efficient_sam_is_refused_under_fsdp2_whose_checkpoint_drops_its_state(run_py, tmp_path, method):
    with pytest.raises(UsageError, match=f"--method {method} is not supported under FSDP.*use one of sam, asam"):
        _resolve(run_py, tmp_path, Engine("fsdp", 2), "--method", method)
    assert _resolve(run_py, tmp_path, Engine(), "--method", method).method.method.name == method  # DDP: fine
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


@pytest.fixture(scope="module")
def fsdp_worker():
    sys.path.insert(0, str(ROOT / "tests"))
    import fsdp_sam_worker

    return fsdp_sam_worker


def _close(mine, ref, what):
    for i, (a, b) in enumerate(zip(mine, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}, tensor {i}: {m}")


def _distance(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.slow
def test_sam_family_on_fsdp2_shards_equals_one_process(tmp_path, fsdp_worker):
    """One 2-process gloo launch of tests/fsdp_sam_worker.py (FSDP2 ``fully_shard``, unequal 3 + 2 row shards,
    ``--sam_sync global``), compared with one process on the whole batch:

    - no silent no-op, no norm over one shard: one SAM/ASAM ascent moves by the single-process ``e`` (SAM's
      ||e|| = rho), restore is exact, the descent gradient is the one at ``w + e`` with nothing of the ascent;
    - equivalence: 3 steps of ``sam``, ``asam``, ``sam-at`` (PGD inside, the same random starts), ``looksam``
      (k = 2: SAM, cheap, SAM) through ``train_step`` with SGD momentum end at the single-process weights;
    - accumulation: 2 micro-batches per rank (Accelerate's FSDP2 ``no_sync`` on the first) equal the big batch;
    - resume: saved with torch.distributed.checkpoint (DCP) after step 2 and finished from it, the run ends
      bit-identical to the uninterrupted one, momentum included (a model-only reload ends elsewhere);
    - the open problem of the efficient variants' checkpoint under FSDP2 is still there (a tripwire).

    The resume checks the DCP state-dict path that Accelerate's ``save_state``/``load_state`` (samat's
    ``--checkpoint_every``/``--resume``, common/checkpoint.py) take for FSDP2, called directly: Accelerate
    engages FSDP only on an accelerator, so samat's own call under sharding is untested on CPU."""
    from accelerate import Accelerator

    from samat.common.sam import SAM
    W = fsdp_worker
    out = tmp_path / "fsdp.pt"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", free_port(),
                           str(ROOT / "tests" / "fsdp_sam_worker.py"), str(out), str(tmp_path / "dcp")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)

    for rule, rho in (("sam", 0.05), ("asam", 0.5)):
        single = got["single"][rule]
        assert single["shard_rows"][0] == 3  # the first weight's 5 rows split 3 + 2: unequal shards
        net, (x, y) = W.model(), W.batch()
        before = [p.detach().clone() for p in net.parameters()]
        F.cross_entropy(net(x), y).backward()
        sam = SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=rho, adaptive=rule == "asam")
        sam.perturb()
        e = [p.detach() - b for p, b in zip(net.parameters(), before)]
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        _close(single["e"], e, f"{rule}: e")
        if rule == "sam":
            assert float(torch.linalg.vector_norm(torch.cat([t.flatten() for t in single["e"]]))) == pytest.approx(rho)
        assert all(torch.equal(mine, ref) for mine, ref in zip(single["restored"], before)), rule
        _close(single["descent"], [p.grad for p in net.parameters()], f"{rule}: descent gradient")

    accelerator = Accelerator(cpu=True)

    def one_process(method, steps: int = W.STEPS):
        net = W.vision_model()
        optimizer = torch.optim.SGD(net.parameters(), lr=W.LR, momentum=W.MOMENTUM)
        W.run_steps(accelerator, net, optimizer, method, range(steps), 0, 1, 1)
        return W.weights(net)

    erm = one_process(resolved("erm"))
    for name, (method, micro) in W.cases().items():
        ref = one_process(method)
        _close(got["runs"][name], ref, name)
        assert _distance(ref, erm) > 1e-3, f"{name} took plain steps"  # the check can tell SAM from ERM
    assert got["unsynced"]["sam-accumulated"] == 2 * W.STEPS  # ascent and descent: 1 of 2 micro-batches each
    assert got["unsynced"]["sam"] == 0
    assert all(torch.equal(a, b) for a, b in zip(got["resumed"], got["runs"]["sam"]))
    assert _distance(got["weights_only"], got["runs"]["sam"]) > 1e-3  # the momentum restored is what made it equal
    # The known problem README's "Scaling out" states: the efficient variants' state, under a string key in the
    # optimizer's state, is refused by DCP's get_state_dict (Accelerate's FSDP2 save_state). When this fails,
    # the problem is fixed: extend the resume check to looksam and update the README.
    assert got["efficient_state_dict"] == "KeyError: 'samat_efficient_sam'", got["efficient_state_dict"]


@pytest.mark.slow
def test_fsdp_launches_of_the_vision_and_text_commands_finish_and_record_the_engine(tmp_path):
    """``accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2`` of scripts/run.py on CPU, vision and
    text (SAM, tiny models and data): both finish with SAM's global ascent, warn that Accelerate engaged DDP
    instead (it shards on accelerators only), and results.json records what was asked and what ran."""
    sys.path.insert(0, str(ROOT / "tests"))
    from text_helpers import tiny_checkpoint, tiny_dataset

    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    text = ["--task", "text", "--model", str(tiny_checkpoint(tmp_path / "tiny")), "--dataset",
            str(tiny_dataset(tmp_path / "data")), "--max_steps", "2", "--max_eval_samples", "8", "--batch_size", "8",
            "--eval_l2", "0.05", "--eval_linf", "none", "--eval_steps", "2", "--sharpness_examples", "0",
            "--textattack_recipes", "none", "--max_length", "32", "--log_with", "none"]
    for name, flags in (("vision", TINY), ("text", text)):
        proc = subprocess.run([accelerate, "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
                               "--main_process_port", free_port(), str(ROOT / "scripts" / "run.py"), *flags,
                               "--method", "sam", "--output_dir", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "this run is not sharded" in proc.stderr
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["engine"] == {"requested": "fsdp", "fsdp_version": 2, "engaged": "MULTI_CPU"}
        assert results["num_processes"] == 2 and results["method_resolved"]["sam_sync"] == "global"
