#!/usr/bin/env python
"""Attack saved text classifiers side by side with TextAttack recipes, on the same sentences.

    python scripts/attack_text.py --checkpoints runs/text-erm-s0 runs/text-sam-s0 runs/text-pgd-at-s0 \\
        --recipes deepwordbug pwws embedding-swap --num_examples 500

A checkpoint is a run folder (its ``model/`` subfolder is used) or any ``from_pretrained`` folder of a
``*ForSequenceClassification`` model with its tokenizer. The dataset, split and columns default to what the
first checkpoint was trained on (``samat_text.json`` beside the model), else the embedded Rotten Tomatoes.
Every model is attacked on the same examples: a fixed shuffle of the split, its first ``--num_examples``.

Prints one table row per model x recipe and writes ``summary.json``/``summary.csv`` (those rows) and
``examples.json``/``examples.csv`` (one row per model x recipe x sentence) into ``--output_dir``. Bad input
(an unknown recipe, a folder that is not a classifier, labels that do not match, a missing column) is a
one-line error with exit status 2, found before any attack runs, and nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from samat.common.cli import main_guard, setup_logging
from samat.common.errors import UsageError
from samat.common.offline import probe_hub


@dataclass
class AttackArgs:
    checkpoints: list[str] = field(metadata={"help": "Run folders or from_pretrained classifier folders."})
    recipes: list[str] = field(
        default_factory=lambda: ["deepwordbug", "pwws"],
        metadata={"help": "TextAttack recipes (offline: deepwordbug, pruthi, pwws, embedding-swap, "
                  "embedding-swap-model)."},
    )
    num_examples: int = field(default=100, metadata={"help": "Sentences attacked per model and recipe."})
    output_dir: str = field(default="attack_results", metadata={"help": "Where summary/examples files go."})
    overwrite: bool = field(default=False, metadata={"help": "Replace files already in --output_dir."})
    dataset: Optional[str] = field(
        default=None, metadata={"help": "Dataset (hub id, folder). Default: the first checkpoint's."}
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Dataset config name."})
    split: Optional[str] = field(default=None, metadata={"help": "Split to attack. Default: the run's eval split."})
    text_column: Optional[str] = field(default=None, metadata={"help": "Text column (default: the run's)."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Second text column, for pairs."})
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column (default: the run's)."})
    max_length: Optional[int] = field(default=None, metadata={"help": "Token limit (default: the run's, else 128)."})
    batch_size: int = field(default=64, metadata={"help": "Sentences per model forward pass."})
    query_budget: Optional[int] = field(default=None, metadata={"help": "Max model queries per sentence."})
    seed: int = field(default=0, metadata={"help": "Seed of the recipes' random choices (per sentence)."})


def run_info(folder: Path) -> dict:
    from samat.text.task import INFO_FILE

    info = folder / INFO_FILE
    return json.loads(info.read_text()) if info.exists() else {}


def data_spec(args: AttackArgs, infos: list[dict]) -> dict:
    """Dataset, split and columns: flags first, else the first checkpoint's record. Checkpoints trained on
    different datasets need an explicit ``--dataset``."""
    datasets_seen = {(i.get("dataset"), i.get("dataset_config")) for i in infos if i}
    if args.dataset is None and len(datasets_seen) > 1:
        names = ", ".join(sorted(str(d) for d, _ in datasets_seen))
        raise UsageError(f"the checkpoints were trained on different datasets ({names}); pass --dataset")
    base = next((i for i in infos if i), {})
    same = args.dataset is None  # columns recorded for the run's dataset only apply to that dataset
    pick = lambda flag, key: flag if flag is not None else (base.get(key) if same else None)  # noqa: E731
    return {
        "dataset": args.dataset if args.dataset is not None else base.get("dataset"),
        "dataset_config": pick(args.dataset_config, "dataset_config"),
        "split": pick(args.split, "eval_split"),
        "text_column": pick(args.text_column, "text_column"),
        "text_pair_column": pick(args.text_pair_column, "text_pair_column"),
        "label_column": pick(args.label_column, "label_column"),
        "max_length": args.max_length or base.get("max_length") or 128,
    }


OUTPUT_FILES = ("summary.json", "summary.csv", "examples.json", "examples.csv")


def check_output_dir(args: AttackArgs) -> Path:
    """``--output_dir``, refused (``UsageError``) when it already holds our files and ``--overwrite`` is off."""
    out = Path(args.output_dir)
    existing = [n for n in OUTPUT_FILES if (out / n).exists()]
    if existing and not args.overwrite:
        raise UsageError(f"--output_dir {out} already holds {', '.join(existing)}; pass --overwrite or choose "
                         "another --output_dir")
    return out


def checkpoint_names(checkpoints: list[str]) -> list[str]:
    """Short row labels: each run folder's name (the run's, for a ``model/`` folder); full paths if two clash."""
    names = [Path(c).name if Path(c).name != "model" else Path(c).parent.name for c in checkpoints]
    return names if len(set(names)) == len(names) else [str(c) for c in checkpoints]


def load_examples(spec: dict) -> tuple[str, Any, Any]:
    """``(split, columns, examples)``: the split to attack, its columns, and its fixed shuffle (the one the
    runs' own TextAttack evaluation uses)."""
    from samat.common.data import pick_split
    from samat.text import data as text_data
    from samat.text.task import ATTACK_EXAMPLES_SEED

    dsd = text_data.load_raw(spec["dataset"], spec["dataset_config"])
    split = pick_split(dsd, spec["split"], ("test", "validation"), "--split")
    columns = text_data.resolve_columns(dsd, split, spec["text_column"], spec["text_pair_column"],
                                        spec["label_column"])
    text_data.check_labels(dsd, split, columns)
    return split, columns, text_data.to_examples(dsd[split], columns).shuffle(seed=ATTACK_EXAMPLES_SEED)


def write_outputs(out: Path, meta: dict, summary_rows: list[dict], example_rows: list[dict]) -> None:
    from samat.common.files import write_csv_atomic, write_json_atomic

    write_json_atomic(out / "summary.json", {**meta, "rows": summary_rows})
    write_json_atomic(out / "examples.json", {**meta, "rows": example_rows})
    for path, rows in ((out / "summary.csv", summary_rows), (out / "examples.csv", example_rows)):
        write_csv_atomic(path, list(rows[0]) if rows else [], rows)
    print(f"wrote {', '.join(str(out / n) for n in OUTPUT_FILES)}")


def main() -> None:
    setup_logging()
    probe_hub()
    from samat.common.cli import hf_argument_parser
    from samat.text import data as text_data
    from samat.text import models as text_models
    from samat.text.textattack.recipes import check_recipes
    from samat.text.textattack.runner import attack_model, summary_table

    parser = hf_argument_parser([AttackArgs], description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses()
    if args.num_examples < 1:
        raise UsageError(f"--num_examples: {args.num_examples} must be >= 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size: {args.batch_size} must be >= 1")

    # Everything that can be wrong is checked before the first attack.
    check_recipes(args.recipes)
    out = check_output_dir(args)
    folders = [text_models.model_folder(c, "--checkpoints") for c in args.checkpoints]
    spec = data_spec(args, [run_info(f) for f in folders])
    split, columns, examples = load_examples(spec)
    models = [text_models.load_classifier(str(f), columns.label_names, spec["max_length"], require_classifier=True)
              for f in folders]

    from accelerate import PartialState

    device = PartialState().device  # the accelerator when there is one (the wrapper feeds the model's device)
    summary_rows, example_rows = [], []
    for name, loaded in zip(checkpoint_names(args.checkpoints), models):
        loaded.model.to(device)
        summaries, records = attack_model(loaded.model, loaded.tokenizer, examples, args.recipes,
                                          args.num_examples, max_length=spec["max_length"],
                                          batch_size=args.batch_size, query_budget=args.query_budget,
                                          seed=args.seed, progress_label=f"{name} / ")
        for recipe in args.recipes:
            summary_rows.append({"model": name, "recipe": recipe, **summaries[recipe],
                                 "checkpoint": str(loaded.source)})
            example_rows += [{"model": name, "recipe": recipe, **r} for r in records[recipe]]

    print(summary_table(summary_rows, ["model", "recipe"]))
    meta = {"dataset": spec["dataset"] or text_data.EMBEDDED_DATASET, "split": split,
            "num_examples": args.num_examples, "recipes": args.recipes, "seed": args.seed}
    write_outputs(out, meta, summary_rows, example_rows)


if __name__ == "__main__":
    main_guard(main)
