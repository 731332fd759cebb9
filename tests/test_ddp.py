"""Two CPU processes (gloo): SAM's documented multi-process update, per sync mode (torchrun), and scripts/run.py
end to end through accelerate launch (pass counts, metrics, an fp16 overflow on one rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import free_port, image_batch, tiny_mlp

HERE = Path(__file__).resolve().parent


def _grad(model, params, batch):
    def loss(p):
        logits = torch.func.functional_call(model, p, (batch["pixel_values"],))
        return F.cross_entropy(logits, batch["labels"])
    return torch.func.grad(loss)(params)


def _unit(g):
    norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
    return {k: v / norm for k, v in g.items()}


@pytest.mark.slow
def test_two_process_sam_local_and_global(tmp_path):
    out = tmp_path / "weights.pt"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", free_port(),
                           str(HERE / "ddp_sam_worker.py"), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)

    model, batch, rho, lr = tiny_mlp(), image_batch(n=8), 0.2, 0.5
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    grads = [_grad(model, w, h) for h in halves]

    # local: each replica climbs along its own gradient; the descent gradients are averaged
    descents = [_grad(model, {k: w[k] + rho * _unit(g)[k] for k in w}, h) for g, h in zip(grads, halves)]
    local = {k: w[k] - lr * (descents[0][k] + descents[1][k]) / 2 for k in w}
    # global: one climb along the all-reduced gradient
    mean_g = {k: (grads[0][k] + grads[1][k]) / 2 for k in w}
    shared = {k: w[k] + rho * _unit(mean_g)[k] for k in w}
    descents = [_grad(model, shared, h) for h in halves]
    global_ = {k: w[k] - lr * (descents[0][k] + descents[1][k]) / 2 for k in w}

    for k in w:
        torch.testing.assert_close(got["local"][k], local[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["global"][k], global_[k], rtol=1e-5, atol=1e-6)
    # the two modes really differ on this batch
    assert any(not torch.allclose(local[k], global_[k], atol=1e-6) for k in w)


METHODS_PER_STEP = {"erm": [1, 1, 1, 1], "sam": [2, 2, 2, 2], "pgd-at": [4, 4, 4, 4],  # PGD-3 AT: 3 + 1
                    "sam-every-k": [2, 1, 2, 1]}                                          # k = 2: SAM on 0, 2


@pytest.mark.slow
def test_two_processes_end_to_end_exact_counts_metrics_and_agreed_overflow(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo) of scripts/run.py for erm, sam, pgd-at and
    sam-every-k: exact pass counts, and metrics equal to a single-process evaluation of the saved weights on the
    same 39 examples (39 is odd, so the last batch is padded on one rank and gather_for_metrics trims it).
    Then an fp16 overflow in rank 1's ascent gradient only: both ranks skip, the scales stay equal, the next step
    pairs its collectives. The timeouts turn a hang into a failure."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                           free_port(), str(HERE / "ddp_run_worker.py"), str(tmp_path), *METHODS_PER_STEP],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = [str(tmp_path / m) for m in METHODS_PER_STEP]
    single = subprocess.run([sys.executable, str(HERE.parent / "scripts" / "evaluate.py"), *folders, "--eval_linf",
                             "2/255", "--eval_l2", "0.25", "--eval_steps", "2", "--sharpness_examples", "0"],
                            capture_output=True, text=True, timeout=180, env={**env, "ACCELERATE_USE_CPU": "0"})
    assert single.returncode == 0, single.stderr[-3000:]
    for method, per_step in METHODS_PER_STEP.items():
        ddp = json.loads((tmp_path / method / "results.json").read_text())
        one = json.loads((tmp_path / method / "evaluations" / "pgd.json").read_text())
        assert (ddp["num_processes"], one["num_processes"]) == (2, 1)
        # passes of one process (each runs every pass of every step on its half of the batch)
        assert ddp["cost"]["forward_passes"] == ddp["cost"]["backward_passes"] == sum(per_step), method
        assert ddp["cost"]["forward_examples"] == 16 * sum(per_step), method
        assert ddp["cost"]["train_examples"] == 4 * 2 * 16
        assert ddp["metrics"]["clean"] == one["metrics"]["clean"], method
        assert ddp["metrics"]["clean"]["examples"] == 39
        assert ddp["predicted_class_counts"] == one["predicted_class_counts"], method
        assert sum(ddp["predicted_class_counts"].values()) == 39
        assert ddp["majority_baseline"] == one["majority_baseline"]
        for attack, by_eps in one["metrics"]["robust"].items():
            for label, m in by_eps.items():
                got = ddp["metrics"]["robust"][attack][label]
                assert got["examples"] == m["examples"] == 39
                # PGD's random start draws from each process's own generator: the same examples, other starts
                assert abs(got["accuracy"] - m["accuracy"]) <= 2 / 39 + 1e-9, (method, attack, got, m)
    ranks = [json.loads((tmp_path / f"overflow_rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["skipped"] == [True, False] and seen["unchanged_after_skip"]
        assert seen["scale_after_skip"] == seen["scale_end"] == 512.0  # backed off once, from 1024
    assert ranks[0]["weights_first"] == ranks[1]["weights_first"]
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"]
