#!/usr/bin/env python
"""Step time of each training method relative to ERM, measured side by side in one process.

    python bench/step_time.py --model preact_resnet18 --batch_size 128 --image_size 32   # the issue's setup
    accelerate launch --mixed_precision bf16 bench/step_time.py ...

Each method runs ``--warmup`` untimed steps, then ``--steps`` timed ones, through the same
``common.methods.train_step`` the training loop uses, on ``--num_batches`` fixed random batches in turn (step
time does not depend on the pixel values, but AE-SAM's choice of SAM steps depends on the gradients, which a
single repeated batch would drive to zero). Forward and backward passes per timed step are counted exactly
with ``common.cost.PassCounter``, as calls and in examples (per batch: ESAM's passes at ``w + e`` see part of
it); the efficient SAM variants run at their defaults (k = 5, alpha 0.7; AE-SAM's threshold schedule spans the
whole benchmark; ESAM beta 0.6, gamma 0.5). Methods are interleaved in rounds so that clock drift and thermal state hit all alike;
the median over rounds is reported. A plain hand-written SAM loop (per-tensor ops, as davda54/sam) is timed
as a reference point. Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


from samat.common.cli import main_guard  # noqa: E402
from samat.common.cost import PassCounter  # noqa: E402
from samat.common.efficient_sam import update_state  # noqa: E402
from samat.common.errors import UsageError  # noqa: E402
from samat.common.methods import METHODS, ResolvedMethod, StepContext, train_step  # noqa: E402
from samat.common.files import write_json_atomic  # noqa: E402
from samat.common.results import versions  # noqa: E402
from samat.common.tables import format_table  # noqa: E402


def handwritten_sam_step(model, optimizer, batch, rho: float) -> None:
    """The textbook two-pass SAM step with per-tensor Python loops (davda54/sam style), for reference."""
    loss = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
    loss.backward()
    with torch.no_grad():
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in model.parameters() if p.grad is not None]), 2)
        saved = {}
        for p in model.parameters():
            if p.grad is None:
                continue
            e = p.grad * (rho / (norm + 1e-12))
            saved[p] = e
            p.add_(e)
    optimizer.zero_grad()
    F.cross_entropy(model(batch["pixel_values"]), batch["labels"]).backward()
    with torch.no_grad():
        for p, e in saved.items():
            p.sub_(e)
    optimizer.step()
    optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="preact_resnet18", help="vision model name (see vision/models.py)")
    parser.add_argument("--batch_size", type=int, default=128, help="images per step")
    parser.add_argument("--image_size", type=int, default=32, help="side of the square input")
    parser.add_argument("--channels", type=int, default=3, help="input channels")
    parser.add_argument("--methods", nargs="+", default=["erm", "sam", "pgd-at"], help="methods to time")
    parser.add_argument("--num_batches", type=int, default=8, help="distinct random batches, used in turn")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per method first")
    parser.add_argument("--no_handwritten", action="store_true", help="skip the hand-written SAM reference")
    parser.add_argument("--out", default="bench/results/step_time.json", help="JSON output path")
    args = parser.parse_args()
    for m in args.methods:
        if m not in METHODS:
            raise UsageError(f"--methods: unknown method {m!r}; choose from: {', '.join(METHODS)}")
    if min(args.steps, args.rounds, args.batch_size, args.num_batches) < 1:
        raise UsageError("--steps, --rounds, --batch_size and --num_batches must be >= 1")

    from accelerate import Accelerator

    from samat.vision.models import build_model
    from samat.vision.task import VisionArgs, VisionTask

    accelerator = Accelerator()
    device = accelerator.device
    task = VisionTask(VisionArgs())
    batches = [{"pixel_values": torch.rand(args.batch_size, args.channels, args.image_size, args.image_size,
                                           device=device),
                "labels": torch.randint(0, 10, (args.batch_size,), device=device)} for _ in range(args.num_batches)]
    batch = batches[0]
    total_steps = args.warmup + args.rounds * args.steps

    runners, counters, contexts = {}, {}, {}
    for name in args.methods:
        torch.manual_seed(0)
        model, _ = build_model(args.model, 10, args.channels)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model, optimizer = accelerator.prepare(model, optimizer)
        method = ResolvedMethod(METHODS[name], rho=0.05, eps=8 / 255, alpha=2 / 255, steps=10)
        ctx = StepContext(accelerator=accelerator, model=model, optimizer=optimizer, task=task, method=method,
                          total_steps=total_steps)
        counters[name], contexts[name] = PassCounter(model), ctx
        runners[name] = lambda ctx=ctx, it=iter(range(10 ** 9)): train_step(ctx, [batches[next(it) % len(batches)]])
    if not args.no_handwritten:
        torch.manual_seed(0)
        ref_model, _ = build_model(args.model, 10, args.channels)
        ref_model = ref_model.to(device)
        ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9)
        runners["sam (hand-written)"] = lambda: handwritten_sam_step(ref_model, ref_opt, batch, 0.05)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for run in runners.values():
        for _ in range(args.warmup):
            run()
    passes_before = {name: (c.forward_passes, c.backward_passes) for name, c in counters.items()}
    examples_before = {name: (c.forward_examples, c.backward_examples) for name, c in counters.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            sync()
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    timed = args.rounds * args.steps
    passes = {name: ((c.forward_passes - passes_before[name][0]) / timed,
                     (c.backward_passes - passes_before[name][1]) / timed) for name, c in counters.items()}
    examples = {name: ((c.forward_examples - examples_before[name][0]) / (timed * args.batch_size),
                       (c.backward_examples - examples_before[name][1]) / (timed * args.batch_size))
                for name, c in counters.items()}
    sam_share = {name: update_state(ctx.optimizer)["sam_steps"] / total_steps for name, ctx in contexts.items()
                 if ctx.method.method.update in ("sam-every-k", "looksam", "ae-sam")}
    erm = median.get("erm")
    erm_examples = sum(examples.get("erm", (0.0, 0.0)))
    rows = [(name, 1000 * t, (t / erm) if erm else float("nan"),
             *(passes[name] if name in passes else ("-", "-")),
             *(examples[name] if name in examples else ("-", "-")),
             sum(examples[name]) / erm_examples if name in examples and erm_examples else "-",
             f"{sam_share[name]:.2f}" if name in sam_share else "-") for name, t in median.items()]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model}, batch {args.batch_size}x{args.channels}x{args.image_size}x{args.image_size}, "
          f"{accelerator.mixed_precision} precision, {device_name}")
    print(format_table(["method", "ms/step", "x ERM", "fwd/step", "bwd/step", "fwd examples/B", "bwd examples/B",
                        "passes x ERM (examples)", "SAM-step share"], rows))
    write_json_atomic(args.out, {"args": vars(args), "device": device_name,
                                 "mixed_precision": accelerator.mixed_precision, "ms_per_step":
                                 {n: 1000 * t for n, t in median.items()},
                                 "ratio_to_erm": {r[0]: r[2] for r in rows},
                                 "passes_x_erm_examples": {r[0]: r[7] for r in rows if r[7] != "-"},
                                 "examples_per_step": {n: {"forward": f, "backward": b}
                                                       for n, (f, b) in examples.items()},
                                 "passes_per_step": {n: {"forward": f, "backward": b} for n, (f, b) in passes.items()},
                                 "sam_step_share": sam_share, "versions": versions()})


if __name__ == "__main__":
    main_guard(main)
