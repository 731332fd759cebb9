#!/usr/bin/env python
"""Per-process parameter, gradient and optimizer-state memory under DDP vs FSDP2, and SAM's step time over
ERM's under each, on a BERT-base-sized model with random weights.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/fsdp_memory.py --out bench/results/fsdp_memory_cpu.json

Both engines run in the same processes, one after the other: FSDP2 first (``fully_shard`` on every
``BertLayer`` and on the root, the units Accelerate's transformer wrap policy picks from the model's
``_no_split_modules``), then DDP (``accelerator.prepare``: a full replica per process). Accelerate 1.16
engages FSDP only on accelerators, so the FSDP2 model is sharded with ``fully_shard`` directly; the steps
of both are samat's own ``train_step`` (ERM: ``plain``; SAM: ``--sam_sync global`` under FSDP2, both sync
modes under DDP), SGD with momentum.

Memory figures are exact: bytes of the tensors this process holds (local shards under FSDP2), from
``numel * element_size``: parameters, ``.grad`` after one backward, and SGD's momentum buffers. They leave
out what is transient (FSDP2's all-gathered layer during its forward/backward, activations) and DDP's
reducer buckets (a second gradient-sized buffer unless ``gradient_as_bucket_view``). The resident set size
(RSS) after each engine's steps is recorded too, as a rough check (beside the RSS before any model is built;
FSDP2's is measured first, DDP's after it in the same process). Step times: each method's steps
interleaved in rounds, the median per method; ratios to ERM are measured side by side in the same processes.
Writes ``--out`` (JSON, rank 0) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from samat.common.cli import main_guard
from samat.common.errors import UsageError
from samat.common.files import write_json_atomic
from samat.common.methods import METHODS, ResolvedMethod, StepContext, train_step
from samat.common.results import versions
from samat.common.tables import format_table
from samat.text.task import TextTask

MIB = 2 ** 20


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: its shard for an FSDP2 DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def bert(layers: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_hidden_layers=layers, num_labels=2))


def batches(args, rank: int, n: int = 4) -> list[dict]:
    """``n`` random batches of this rank's ``--batch_size`` token sequences of ``--seq_len``."""
    g = torch.Generator().manual_seed(1000 + rank)
    return [{"input_ids": torch.randint(1000, 30000, (args.batch_size, args.seq_len), generator=g),
             "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
             "labels": torch.randint(0, 2, (args.batch_size,), generator=g)} for _ in range(n)]


def memory(ctx: StepContext, batch: dict) -> dict[str, float]:
    """Parameter, gradient (after one backward) and momentum bytes this process holds, in MiB."""
    params = list(ctx.model.parameters())
    train_step(ctx, [batch])  # creates the momentum buffers
    ctx.accelerator.backward(ctx.task.loss(ctx.task.forward(ctx.model, batch), batch))
    grads = [p.grad for p in params if p.grad is not None]
    ctx.optimizer.zero_grad(set_to_none=True)
    momentum = [s["momentum_buffer"] for s in ctx.optimizer.state.values() if "momentum_buffer" in s]
    return {"params_mib": nbytes(params) / MIB, "grads_mib": nbytes(grads) / MIB,
            "momentum_mib": nbytes(momentum) / MIB}


def time_steps(ctx: StepContext, methods: dict[str, ResolvedMethod], data: list[dict], rounds: int,
               warmup: int) -> dict[str, float]:
    """Median seconds per step of each method, its steps interleaved with the others' in ``rounds``."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(warmup + rounds):
        for name, method in methods.items():
            ctx.method = method
            dist.barrier()
            start = time.perf_counter()
            train_step(ctx, [data[r % len(data)]])
            dist.barrier()  # the slowest process's step
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def engine(name: str, args, accelerator, methods: dict[str, ResolvedMethod], data: list[dict]) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = bert(args.layers)
    model.train()
    if name == "fsdp2":
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        model, optimizer = accelerator.prepare(model, optimizer)
    ctx = StepContext(accelerator=accelerator, model=model, optimizer=optimizer, task=TextTask(),
                      method=methods["erm"])
    out: dict[str, Any] = {"parameters": sum(local(p).numel() for p in model.parameters()),
                           **memory(ctx, data[0])}
    seconds = time_steps(ctx, methods, data, args.rounds, args.warmup)
    out["seconds_per_step"] = seconds
    out["x_erm"] = {m: s / seconds["erm"] for m, s in seconds.items()}
    out["rss_after_steps_mib"] = rss_mib()
    out["peak_rss_so_far_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del ctx, model, optimizer
    accelerator.free_memory()
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (BERT-base: 12)")
    parser.add_argument("--batch_size", type=int, default=2, help="sequences per process per step")
    parser.add_argument("--seq_len", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per method (interleaved)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM's radius")
    parser.add_argument("--out", required=True, help="JSON file to write (rank 0)")
    args = parser.parse_args()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    if accelerator.num_processes < 2:
        raise UsageError("run under torchrun --nproc_per_node 2 (or more): sharding needs several processes")
    torch.set_num_threads(1)
    rss_before = rss_mib()  # torch, transformers and Accelerate loaded, no model yet
    data = batches(args, accelerator.process_index)
    sam = lambda sync: ResolvedMethod(METHODS["sam"], rho=args.rho, sam_sync=sync)  # noqa: E731
    erm = ResolvedMethod(METHODS["erm"])
    results = {"fsdp2": engine("fsdp2", args, accelerator, {"erm": erm, "sam (global)": sam("global")}, data),
               "ddp": engine("ddp", args, accelerator,
                             {"erm": erm, "sam (global)": sam("global"), "sam (local)": sam("local")}, data)}
    if accelerator.is_main_process:
        rows = [[eng, r["parameters"], r["params_mib"], r["grads_mib"], r["momentum_mib"], m,
                 1000 * s, r["x_erm"][m], r["rss_after_steps_mib"]]
                for eng, r in results.items() for m, s in r["seconds_per_step"].items()]
        print(format_table(["engine", "params (this process)", "params MiB", "grads MiB", "momentum MiB",
                            "method", "ms/step", "x ERM", "RSS MiB"], rows, float_format="{:.2f}"))
        write_json_atomic(args.out, {"args": vars(args), "processes": accelerator.num_processes,
                                     "backend": dist.get_backend(), "threads_per_process": torch.get_num_threads(),
                                     "rss_before_models_mib": rss_before,
                                     "model": f"BertForSequenceClassification(BertConfig(num_hidden_layers="
                                              f"{args.layers})), random weights",
                                     "engines": results, "versions": versions(),
                                     "date": time.strftime("%Y-%m-%d", time.gmtime())})
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main_guard(main)
