#!/usr/bin/env python
"""Attack saved models without retraining: finished run folders and hub / timm / local models, side by side.

    samat evaluate runs/vision-erm-s0 runs/vision-sam-s0 --eval_attacks apgd --eval_linf 2/255 8/255
    samat evaluate --model timm:resnet18 --task vision --dataset uoft-cs/cifar10 --eval_attacks autoattack
    samat evaluate runs/text-erm-s0 runs/text-sam-s0 --textattack_recipes deepwordbug pwws
    accelerate launch scripts/evaluate.py runs/a runs/b --eval_attacks autoattack   # several processes

Prints one table (a row per model, a column per attack and radius) and writes each model's evaluation, a
results record like results.json, to ``<run>/evaluations/<suite>.json`` (``--output`` for ``--model``
models). Bad input (an unknown attack or suite, one the task cannot run, a folder that is not a finished
run, a model whose classes differ from the dataset's, radii in the wrong unit) is one ``error:`` line, exit
status 2, found before the first attack, and nothing is written.
"""

from __future__ import annotations

import sys

from samat.common.cli import main_guard, setup_logging
from samat.common.offline import probe_hub


def main() -> None:
    setup_logging()
    probe_hub()  # before transformers/datasets are imported
    from samat.common.evaluate_saved import main as evaluate

    evaluate(sys.argv[1:])


if __name__ == "__main__":
    main_guard(main)
