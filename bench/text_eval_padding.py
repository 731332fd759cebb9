#!/usr/bin/env python
"""Tokens the text task's evaluation batches push through the model: plain batches in dataset order vs the
engine's length-grouped batches (``common.experiment.make_eval_loader``), on the run's seeded evaluation
subsets of the default data (Rotten Tomatoes test split, MiniLM tokenizer).

    python bench/text_eval_padding.py --sizes 100 500 --eval_batch_size 64 --out bench/results/x.json

Per subset: real tokens, padded tokens (batch x longest, summed over batches) both ways, and their ratios.
An attack step costs a forward and backward pass over the padded tokens of the examples still attacked, so
``padded / real`` is the factor by which padding multiplies the attacks' work (the transformer's cost is
close to linear in tokens at these lengths). No model is run.
"""

from __future__ import annotations

import argparse
import json

from torch.utils.data import DataLoader

from samat.common.cli import main_guard
from samat.common.config import RunArgs
from samat.common.data import eval_subset
from samat.common.experiment import make_eval_loader
from samat.text.task import TextArgs, TextTask


def padding(sizes: list[int], batch_size: int, seed: int) -> list[dict]:
    rows = []
    for size in sizes:
        run = RunArgs(task="text", max_eval_samples=size, eval_batch_size=batch_size, seed=seed)
        data = TextTask(TextArgs(textattack_recipes=["none"])).build(run, None)
        subset = eval_subset(data.eval_dataset, run)
        plain = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=data.collate_fn)
        grouped = make_eval_loader(subset, run, data.collate_fn)
        real = int(sum(int(b["attention_mask"].sum()) for b in plain))
        padded = {name: int(sum(b["input_ids"].numel() for b in loader))
                  for name, loader in (("plain", plain), ("grouped", grouped))}
        rows.append({"examples": len(subset), "eval_batch_size": batch_size, "real_tokens": real,
                     "padded_tokens_plain": padded["plain"], "padded_tokens_grouped": padded["grouped"],
                     "plain_over_real": padded["plain"] / real, "grouped_over_real": padded["grouped"] / real,
                     "plain_over_grouped": padded["plain"] / padded["grouped"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500], help="evaluation subset sizes")
    parser.add_argument("--eval_batch_size", type=int, default=64, help="the engine's default")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (the subset is drawn with seed + 1)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = padding(args.sizes, args.eval_batch_size, args.seed)
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
    main_guard(main)
