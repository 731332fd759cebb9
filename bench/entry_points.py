#!/usr/bin/env python
"""Step time of each user entry point (``samat.SAM``, ``samat.step``, ``samat.SAMTrainer``) over the same SAM
step in samat's own loop (``common.methods.train_step``), measured side by side in one process.

    python bench/entry_points.py --out bench/results/entry_points_cpu_minilm.json               # MiniLM-L6
    python bench/entry_points.py --tiny --out bench/results/entry_points_cpu_tiny.json          # hidden 32

One text classifier (samat's offline text default, or ``--tiny``: a 2-layer BERT of hidden size 32, where the
per-step Python cost of each layer shows most), the same initial weights, SGD (lr 0.01, momentum 0.9) and the
same ``--num_batches`` random token batches in turn for every entry point; SAM at rho 0.05. What is timed per
step:

    engine        ``train_step(ctx, [batch])``, the step ``scripts/run.py``'s loop runs
    samat.SAM     ``opt.step(closure)``, the closure a user writes (forward, cross-entropy, ``backward``)
    samat.step    ``samat.step(accelerator, model, optimizer, batch, method="sam", rho=0.05)``
    SAMTrainer    ``trainer.training_step(model, batch)`` then the Trainer's ``optimizer.step()`` and
                  ``zero_grad()``: the Trainer's own step without its loader, callbacks and logging
    erm (engine)  ``train_step`` with ERM, for scale

Entry points are interleaved in rounds (clock drift and the machine's load hit all alike), after ``--warmup``
untimed steps each; the median over rounds is reported. Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from samat.common.cli import main_guard  # noqa: E402
from samat.common.errors import UsageError  # noqa: E402
from samat.common.files import write_json_atomic  # noqa: E402
from samat.common.results import versions  # noqa: E402
from samat.common.tables import format_table  # noqa: E402

RHO = 0.05


def make_model(tiny: bool, seed: int = 0) -> torch.nn.Module:
    """The same initial classifier each call: MiniLM-L6 (samat's offline text default) or a tiny BERT."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    if tiny:
        config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, num_labels=2)
        return BertForSequenceClassification(config).train()
    from samat.text.models import resolve_model

    return AutoModelForSequenceClassification.from_pretrained(resolve_model(None), num_labels=2).train()


def entry_points(tiny: bool, batches: list[dict]) -> dict:
    """name -> a function running one optimizer step on the next batch."""
    from accelerate import Accelerator
    from transformers import TrainingArguments

    import samat
    from samat.common.config import MethodArgs
    from samat.common.method_config import resolve_method
    from samat.common.methods import StepContext, train_step
    from samat.text.task import TextTask

    accelerator = Accelerator(cpu=True)
    counter = iter(range(10 ** 9))
    next_batch = lambda: batches[next(counter) % len(batches)]  # noqa: E731
    runners = {}

    def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    for name in ("erm", "sam"):  # samat's own loop's step
        model = make_model(tiny)
        model, opt = accelerator.prepare(model, sgd(model))
        task = TextTask()
        kw = {"rho": RHO} if name == "sam" else {}
        ctx = StepContext(accelerator=accelerator, model=model, optimizer=opt, task=task,
                          method=resolve_method(name, MethodArgs(**kw), task, set(kw)))
        runners["erm (engine)" if name == "erm" else "engine"] = lambda ctx=ctx: train_step(ctx, [next_batch()])

    model_sam = make_model(tiny)
    opt_sam = samat.SAM(sgd(model_sam), model_sam, "sam", rho=RHO)

    def sam_optimizer() -> None:
        batch = next_batch()

        def closure():
            logits = model_sam(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits, batch["labels"])
            loss.backward()
            return loss
        opt_sam.step(closure)

    runners["samat.SAM"] = sam_optimizer

    model_step = make_model(tiny)
    model_step, opt_step = accelerator.prepare(model_step, sgd(model_step))
    runners["samat.step"] = lambda: samat.step(accelerator, model_step, opt_step, next_batch(), method="sam",
                                               rho=RHO)

    model_tr = make_model(tiny)
    opt_tr = sgd(model_tr)
    args = TrainingArguments("/tmp/samat-bench-entry-points", use_cpu=True, report_to=[], save_strategy="no",
                             max_grad_norm=0.0, disable_tqdm=True)
    trainer = samat.SAMTrainer(model=model_tr, args=args, optimizers=(opt_tr, None),
                               samat_args=samat.SAMArguments(method="sam", rho=RHO))

    def trainer_step() -> None:
        trainer.training_step(trainer.model, next_batch())
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    runners["SAMTrainer"] = trainer_step
    return runners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer BERT of hidden size 32 instead of MiniLM")
    parser.add_argument("--batch_size", type=int, default=32, help="sentences per step")
    parser.add_argument("--seq_len", type=int, default=64, help="tokens per sentence")
    parser.add_argument("--num_batches", type=int, default=4, help="distinct random batches, used in turn")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per entry point per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per entry point first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", required=True, help="JSON output path")
    args = parser.parse_args()
    if min(args.steps, args.rounds, args.batch_size, args.num_batches, args.seq_len, args.threads) < 1:
        raise UsageError("--steps, --rounds, --batch_size, --num_batches, --seq_len and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    vocab = 1000 if args.tiny else make_model(False).config.vocab_size
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(5, vocab, (args.batch_size, args.seq_len), generator=g),
                "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
                "labels": torch.randint(0, 2, (args.batch_size,), generator=g)} for _ in range(args.num_batches)]
    runners = entry_points(args.tiny, batches)
    load_before = os.getloadavg()
    for run in runners.values():
        for _ in range(args.warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    engine = median["engine"]
    rows = [(name, 1000 * t, t / engine) for name, t in median.items()]
    model = "tiny BERT (hidden 32, 2 layers)" if args.tiny else "MiniLM-L6 (samat's text default)"
    print(f"{model}, batch {args.batch_size}x{args.seq_len} tokens, SAM rho {RHO}, {args.threads} CPU thread(s)")
    print(format_table(["entry point", "ms/step", "x engine"], rows))
    write_json_atomic(args.out, {
        "args": vars(args), "model": model, "device": "cpu",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in os.getloadavg()]},
        "ms_per_step": {n: round(1000 * t, 2) for n, t in median.items()},
        "ms_per_step_rounds": {n: [round(1000 * v, 2) for v in t] for n, t in times.items()},
        "ratio_to_engine": {n: round(t / engine, 4) for n, t in median.items()},
        "versions": versions()})


if __name__ == "__main__":
    main_guard(main)
