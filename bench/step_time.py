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
whole benchmark; ESAM beta 0.6, gamma 0.5; SAF and MESA with their trajectory loss on from the first timed
step, SAF after enough untimed epochs of the ``--num_batches`` batches to hold each example's past outputs).
Methods are interleaved in rounds so that clock drift and thermal state hit all alike;
the median over rounds is reported. A plain hand-written SAM loop (per-tensor ops, as davda54/sam) is timed
as a reference point. Writes ``--out`` (JSON) and prints a table.

``--tasks vision text segmentation``: instead, samat's own step against a bare PyTorch loop, per task (the
input-pipeline comparison of issue 23). samat's side is the real thing: the task's dataset, collate and
Accelerate DataLoader from ``common.experiment.build``, stepped by ``common.loop.train`` (scheduler, pass
counter, divergence guard and logging included) one epoch per round, with the time blocked in
``next(loader)`` recorded (the data-wait share). The bare side is the same model (same initial weights),
the same optimizer type and hyper-parameters, on the very batches samat's loader produced in that round,
already in memory: ``loss.backward(); opt.step()`` for ERM, a two-pass loop for SAM. samat and bare alternate
in every round (ERM, then SAM), in one process, with torch's threads fixed (``--cpu_threads``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F


from samat.common.cli import main_guard  # noqa: E402
from samat.common.cost import PassCounter  # noqa: E402
from samat.common.efficient_sam import update_state  # noqa: E402
from samat.common.errors import UsageError  # noqa: E402
from samat.common.methods import METHODS, ResolvedMethod, StepContext, train_step  # noqa: E402
from samat.common.registry import UPDATE_RULES  # noqa: E402
from samat.common.saf import extra_memory  # noqa: E402
from samat.common.files import write_json_atomic  # noqa: E402
from samat.common.loop import make_optimizer  # noqa: E402
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


# ------------------------------------------------------------------------ samat vs a bare loop, per task

# What each task's bench run sets besides --max_train_samples/--max_steps (batch sizes are the task defaults).
TASK_FLAGS = {
    "vision": ["--model", "small_cnn"],
    "text": ["--textattack_recipes", "none", "--max_length", "128"],
    "segmentation": [],
}


class TimedLoader:
    """A prepared DataLoader as ``common.loop.train`` sees it (``len``, ``set_epoch``, iteration), that adds up
    the seconds spent blocked in ``next()`` (``wait``) and keeps the round's batches (``batches``) for the
    bare loop."""

    def __init__(self, loader):
        self.loader, self.wait, self.batches = loader, 0.0, []

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.wait += time.perf_counter() - started
                return
            self.wait += time.perf_counter() - started
            self.batches.append(batch)
            yield batch


def bare_loss(task_name: str, model, batch: dict, ignore_index: int = -100):
    """The task's training loss written out in plain PyTorch (mean cross-entropy; ignored pixels left out)."""
    if task_name == "text":
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return F.cross_entropy(model(**inputs).logits, batch["labels"])
    return F.cross_entropy(model(batch["pixel_values"]), batch["labels"], ignore_index=ignore_index)


def bare_step(loss_fn, model, optimizer, batch: dict, rho: Optional[float]) -> None:
    """One bare optimizer step: ERM (``rho`` None) or SAM's two passes (ascent to ``w + rho g/||g||``,
    gradient there, step from ``w``)."""
    loss_fn(model, batch).backward()
    if rho is not None:
        params = [p for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            grads = [p.grad for p in params]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            e = torch._foreach_mul(grads, rho / (norm + 1e-12))
            torch._foreach_add_(params, e)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        with torch.no_grad():
            torch._foreach_sub_(params, e)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def per_example_pipeline(on: bool):
    """While building: the input pipeline as it was before issue 23, when ``on``: text's Arrow rows padded by
    ``transformers.DataCollatorWithPadding`` instead of :class:`samat.text.data.TokenizedText` and
    :class:`~samat.text.data.PadCollator` (images: the caller drops the decoded-once cache, so every item is
    read, decoded and augmented on its own, the path sets too large to decode still take)."""
    if not on:
        yield
        return
    from transformers import DataCollatorWithPadding

    from samat.text import data as text_data

    saved = text_data.TokenizedText, text_data.PadCollator
    text_data.TokenizedText, text_data.PadCollator = (lambda data: data), DataCollatorWithPadding
    try:
        yield
    finally:
        text_data.TokenizedText, text_data.PadCollator = saved


def compare_task(task_name: str, methods: list[str], steps: int, rounds: int, warmup_rounds: int, threads: int,
                 extra: list[str], before: bool = False) -> dict:
    """samat vs bare for one task (see the module docstring): per method, the median over ``rounds`` of the
    seconds per step of each, their ratio, and samat's data-wait share; ``warmup_rounds`` untimed first.
    ``before``: also samat with the per-example input pipeline (:func:`per_example_pipeline`), interleaved."""
    import copy
    import tempfile

    from accelerate.utils import set_seed

    from samat.common.checkpoint import TrainState
    from samat.common.experiment import build, make_accelerator, make_guard
    from samat.common.loop import train
    from samat.common.registry import UPDATE_RULES
    from samat.scripts.run import resolve

    sides: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, per_example in [(m, p) for m in methods for p in ((True, False) if before else (False,))]:
            name = f"{method} (per-example)" if per_example else method
            argv = ["--task", task_name, "--method", method, "--output_dir", f"{tmp}/{name}", "--log_with",
                    "none", "--cpu_threads", str(threads), "--max_eval_samples", "8",
                    # a few dozen steps of a fresh model may not beat the label prior yet: that is not a failure here
                    "--divergence_guard", "false",
                    *TASK_FLAGS.get(task_name, []), *extra]
            probe, _ = resolve(argv)  # the task's batch size, to size the subset to ``steps`` per epoch
            argv += ["--max_train_samples", str(probe.run.batch_size * steps),
                     "--max_steps", str(steps * (rounds + warmup_rounds))]
            resolved, task = resolve(argv)
            run = resolved.run
            accelerator = make_accelerator(run)
            set_seed(run.seed)
            with per_example_pipeline(per_example):
                built = build(run, task, accelerator,
                              indexed=UPDATE_RULES[resolved.method.method.update].needs_index)
            if per_example:
                dataset = built.train_set
                while isinstance(dataset, torch.utils.data.Subset):
                    dataset = dataset.dataset
                if hasattr(dataset, "_decoded"):
                    dataset._cache = None  # never decoded: every item read from Arrow on its own
            if built.steps_per_epoch != steps:
                raise UsageError(f"{task_name}: {built.steps_per_epoch} steps per epoch, expected {steps}")
            bare_model = copy.deepcopy(accelerator.unwrap_model(built.model)).train()
            counter = PassCounter(accelerator.unwrap_model(built.model))
            ctx = StepContext(accelerator=accelerator, model=built.model, optimizer=built.optimizer, task=built.task,
                              method=resolved.method, max_grad_norm=run.max_grad_norm,
                              total_steps=built.total_steps, steps_per_epoch=built.steps_per_epoch)
            ignore = getattr(built.task.args, "ignore_index", -100)
            loss_fn = lambda model, batch, ignore=ignore: bare_loss(task_name, model, batch, ignore)  # noqa: E731
            sides[name] = dict(
                run=run, ctx=ctx, built=built, counter=counter, guard=make_guard(run, built, accelerator),
                loader=TimedLoader(built.train_loader), state=TrainState(task=task.name), loss_fn=loss_fn,
                bare_model=bare_model, bare_opt=make_optimizer(bare_model, run),
                rho=resolved.method.rho if resolved.method.method.update == "sam" else None,
                samat_s=[], bare_s=[], wait_share=[])
        # the bare loss is the task's loss (checked once, on one batch, in eval mode)
        side = next(iter(sides.values()))
        check = next(iter(side["built"].train_loader))
        model = side["bare_model"].eval()
        with torch.no_grad():
            ours, theirs = side["ctx"].task.loss(side["ctx"].task.forward(model, check), check), side["loss_fn"](
                model, check)
        model.train()
        if not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"{task_name}: the bare loss {float(theirs)} is not the task's {float(ours)}")
        for round_ in range(warmup_rounds + rounds):
            for method, side in sides.items():
                loader = side["loader"]
                loader.wait, loader.batches = 0.0, []
                started = time.perf_counter()
                side["state"] = train(side["ctx"], loader, side["built"].train_set, side["built"].scheduler,
                                      side["run"], side["state"].step + steps, side["state"], side["counter"],
                                      side["guard"])
                samat = (time.perf_counter() - started) / steps
                batches = loader.batches
                started = time.perf_counter()
                for batch in batches:
                    bare_step(side["loss_fn"], side["bare_model"], side["bare_opt"], batch, side["rho"])
                bare = (time.perf_counter() - started) / len(batches)
                if round_ >= warmup_rounds:
                    side["samat_s"].append(samat)
                    side["bare_s"].append(bare)
                    side["wait_share"].append(loader.wait / (samat * steps))
                print(f"{task_name} {method} round {round_}{' (warm-up)' if round_ < warmup_rounds else ''}: "
                      f"samat {1000 * samat:.1f} ms/step (data wait {100 * loader.wait / (samat * steps):.1f} %), "
                      f"bare {1000 * bare:.1f} ms/step", flush=True)
    out = {}
    for method, side in sides.items():
        samat, bare = statistics.median(side["samat_s"]), statistics.median(side["bare_s"])
        # the ratio of each round (samat and bare ran back to back), then the median: robust to load drifts
        ratio = statistics.median(a / b for a, b in zip(side["samat_s"], side["bare_s"]))
        # and the ratio of each side's fastest round (the round least disturbed by other jobs)
        out[method] = {"samat_ms": 1000 * samat, "bare_ms": 1000 * bare, "ratio": ratio,
                       "ratio_of_fastest": min(side["samat_s"]) / min(side["bare_s"]),
                       "data_wait_share": statistics.median(side["wait_share"]),
                       "samat_ms_rounds": [1000 * t for t in side["samat_s"]],
                       "bare_ms_rounds": [1000 * t for t in side["bare_s"]],
                       "data_wait_share_rounds": side["wait_share"],
                       "batch_size": side["run"].batch_size, "steps_per_round": steps,
                       "optimizer": side["run"].optimizer, "model": side["built"].data.info.get("model"),
                       "method": side["run"].method}
    return out


def pipeline_main(args) -> None:
    results = {task: compare_task(task, ["erm", "sam"], args.steps, args.rounds, args.warmup_rounds,
                                  args.cpu_threads, args.task_flags, before=args.before)
               for task in args.tasks}
    rows = [(task, method, r["batch_size"], r["samat_ms"], r["bare_ms"], r["ratio"], r["ratio_of_fastest"],
             f"{100 * r['data_wait_share']:.1f} %") for task, per in results.items() for method, r in per.items()]
    print(format_table(["task", "method", "batch", "samat ms/step", "bare ms/step", "samat / bare (median)",
                        "samat / bare (fastest)", "data wait (samat)"], rows))
    write_json_atomic(args.out, {"args": vars(args), "device": "cpu", "torch_threads": torch.get_num_threads(),
                                 "results": results, "versions": versions()})


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
    parser.add_argument("--tasks", nargs="+", default=None, choices=["vision", "text", "segmentation"],
                        help="instead: samat's own step vs a bare PyTorch loop on these tasks (ERM and SAM); "
                             "--steps is then the steps per round (one epoch)")
    parser.add_argument("--before", action="store_true",
                        help="with --tasks: also time samat with the per-example input pipeline of before issue 23")
    parser.add_argument("--warmup_rounds", type=int, default=1, help="with --tasks: untimed rounds first")
    parser.add_argument("--cpu_threads", type=int, default=1, help="with --tasks: torch CPU threads")
    parser.add_argument("--task_flags", nargs=argparse.REMAINDER, default=[],
                        help="with --tasks: further scripts/run.py flags for every task (last on the line)")
    args = parser.parse_args()
    if args.tasks:
        if min(args.steps, args.rounds, args.cpu_threads) < 1 or args.warmup_rounds < 0:
            raise UsageError("--steps, --rounds and --cpu_threads must be >= 1, --warmup_rounds >= 0")
        return pipeline_main(args)
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
    # each example's dataset index (SAF keeps its past outputs by it): the batches are one "epoch" of
    # num_batches * batch_size distinct examples, visited in turn
    batches = [{"pixel_values": torch.rand(args.batch_size, args.channels, args.image_size, args.image_size,
                                           device=device),
                "labels": torch.randint(0, 10, (args.batch_size,), device=device),
                "sample_index": torch.arange(i * args.batch_size, (i + 1) * args.batch_size, device=device)}
               for i in range(args.num_batches)]
    batch = batches[0]
    # SAF and MESA time their steady state: the trajectory loss on from the first step, and enough untimed
    # epochs first for SAF to hold each example's outputs from saf_delay_epochs epochs ago
    warmup = args.warmup
    if any(METHODS[m].update == "saf" for m in args.methods):
        warmup = max(warmup, UPDATE_RULES["saf"].defaults["saf_delay_epochs"] * args.num_batches + 1)
    total_steps = warmup + args.rounds * args.steps

    runners, counters, contexts = {}, {}, {}
    for name in args.methods:
        torch.manual_seed(0)
        model, _ = build_model(args.model, 10, args.channels)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model, optimizer = accelerator.prepare(model, optimizer)
        rule = UPDATE_RULES[METHODS[name].update]
        method = ResolvedMethod(METHODS[name], rho=0.05, eps=8 / 255, alpha=2 / 255, steps=10,
                                traj_lambda=rule.defaults.get("traj_lambda", 0.0), traj_start_epoch=0)
        ctx = StepContext(accelerator=accelerator, model=model, optimizer=optimizer, task=task, method=method,
                          total_steps=total_steps, steps_per_epoch=args.num_batches)
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
        for _ in range(warmup):
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
                                 "sam_step_share": sam_share,
                                 # what SAF/MESA hold beyond ERM (extra_memory is empty for the other rules)
                                 "extra_memory": {n: held for n, ctx in contexts.items()
                                                  if (held := extra_memory(ctx.optimizer, ctx.method.method.update))},
                                 "versions": versions()})


if __name__ == "__main__":
    main_guard(main)
