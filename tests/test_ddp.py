"""Two CPU processes (torchrun + gloo): SAM's documented multi-process update, per sync mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import image_batch, tiny_mlp

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
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533",
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
