#!/usr/bin/env python
"""How much of SAM's weight perturbation the descent pass really sees under bf16 autocast, with samat's fp32
perturbed pass (now) and with the autocast pass it replaced (before).

Runs samat's own SAM step (``train_step``) on PreAct ResNet-18 under ``Accelerator(mixed_precision="bf16")``
on CPU, with forward pre-hooks on every conv and linear layer (the ops autocast runs in bf16; they hold >99 % of
the weights). The hooks see the fp32 weights and whether autocast is on, so the weights each op computes with
are known: ``bf16(p)`` under autocast, ``p`` otherwise. With ``w`` the fp32 weights of pass 1 and ``w + e``
those of pass 2, it reports, per rho:

- ``vs_master``: the cosine and norm ratio between ``used_2 - w`` and ``e`` (the gradient is taken at
  ``w + e``: 1.0 and 1.0 when it is);
- ``vs_pass1``: the same for ``used_2 - used_1`` (the issue's measure: ``bf16(w + e) - bf16(w)`` before);
- ``moved``: the share of weights whose value used by pass 2 differs from pass 1's.

    python bench/bf16_sam_fidelity.py --rho 0.05 0.1 0.5 --out bench/results/bf16_sam_fidelity_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from pathlib import Path

import torch
from torch import nn

import samat.common.sam as sam_module
from samat.common.methods import METHODS, ResolvedMethod, StepContext, train_step
from samat.vision.models import build_model
from samat.vision.task import VisionArgs, VisionTask

CAST = (nn.Conv2d, nn.Linear)


def _stats(a: list, b: list) -> dict:
    dot = sum((x * y).sum() for x, y in zip(a, b))
    na, nb = (torch.sqrt(sum((x ** 2).sum() for x in t)) for t in (a, b))
    return {"cosine": float(dot / (na * nb)), "norm_ratio": float(na / nb)}


def one_sam_step(ctx: StepContext, model: nn.Module, batch: dict) -> dict:
    """One SAM step with the hooks on; the fidelity figures of its pass 2."""
    calls: list[tuple[bool, list]] = []

    def hook(module, inputs):
        calls.append((torch.is_autocast_enabled("cpu"),
                      [p.detach().double().clone() for p in module.parameters(recurse=False)]))

    layers = [m for m in model.modules() if isinstance(m, CAST)]
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        train_step(ctx, [batch])
    finally:
        for h in handles:
            h.remove()
    n = len(layers)
    assert len(calls) == 2 * n, (len(calls), n)

    def used(autocast_on: bool, t):
        return t.float().bfloat16().double() if autocast_on else t

    w, e, u1, u2 = [], [], [], []
    for (on1, p1), (on2, p2) in zip(calls[:n], calls[n:]):
        for a, b in zip(p1, p2):
            w.append(a), e.append(b - a), u1.append(used(on1, a)), u2.append(used(on2, b))
    moved = sum(int((x != y).sum()) for x, y in zip(u1, u2)) / sum(x.numel() for x in u1)
    return {"pass2_autocast": calls[n][0], "moved": moved,
            "vs_master": _stats([b - a for a, b in zip(w, u2)], e),
            "vs_pass1": _stats([b - a for a, b in zip(u1, u2)], e)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rho", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    task = VisionTask(VisionArgs())
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(args.batch_size, 3, 32, 32, generator=g),
             "labels": torch.randint(0, 10, (args.batch_size,), generator=g)}
    rows = []
    for rho in args.rho:
        row = {"rho": rho}
        for label, fix in (("now_fp32_pass", True), ("before_autocast_pass", False)):
            torch.manual_seed(0)
            model, _ = build_model("preact_resnet18", num_classes=10, in_channels=3)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            prepared, optimizer = accelerator.prepare(model, optimizer)
            method = ResolvedMethod(method=METHODS["sam"], rho=rho)
            ctx = StepContext(accelerator=accelerator, model=prepared, optimizer=optimizer, task=task,
                              method=method)
            for _ in range(3):  # a few plain steps first: not the gradient of a fresh initialisation
                train_step(StepContext(accelerator=accelerator, model=prepared, optimizer=optimizer, task=task,
                                       method=ResolvedMethod(method=METHODS["erm"])), [batch])
            saved = sam_module.fp32_forward
            if not fix:
                sam_module.fp32_forward = lambda model: contextlib.nullcontext()
            try:
                row[label] = one_sam_step(ctx, accelerator.unwrap_model(prepared), batch)
            finally:
                sam_module.fp32_forward = saved
        rows.append(row)
    out = {"model": "preact_resnet18", "batch_size": args.batch_size, "mixed_precision": "bf16 (CPU autocast)",
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
