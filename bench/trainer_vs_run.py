"""The Trainer example (``examples/sam_trainer.py``) beside the same recipe through ``scripts/run.py``: clean and
robust accuracy of each, and of both on the very same evaluation sentences.

    python bench/trainer_vs_run.py --train_examples 2000 --eval_examples 200 \
        --out bench/results/trainer_vs_run_cpu.json

Both train samat's offline text default (MiniLM-L6, Rotten Tomatoes) with ``sam-at`` for one epoch of the same
number of examples, seed 0: AdamW lr 5e-5 without weight decay, linear schedule with 10 % warm-up, batch 32,
gradient clipping at 1.0 and inputs truncated to 64 tokens (the example's ``TrainingArguments`` and the
Trainer's defaults, passed to ``scripts/run.py`` as flags). What each entry point draws by its own rule: the
2000 training sentences (``datasets.shuffle(seed=0)`` in the example, samat's seeded subset in run.py) and their
order. Each is then evaluated twice: by its own evaluation (the example's first sentences of the test split;
run.py's seeded subset of the same size) and, for a like-for-like row, both saved models by
``samat.evaluate_model`` on the example's sentences, PGD-5 at the text task's L2 radii, attacked even when
collapsed. One process at a time, ``--cpu_threads 1`` / ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}


def timed(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (stdout+stderr to ``log``); its wall time in seconds; exit on failure."""
    started = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"error: {' '.join(cmd[:3])} ... failed with exit {code}; see {log}")
    return round(time.perf_counter() - started, 1)


def example_numbers(log: Path) -> dict:
    """The clean and robust accuracies the example prints."""
    text = log.read_text()
    clean = float(re.search(r"clean accuracy ([0-9.]+)", text).group(1))
    robust = {f"{a} {e}": float(v) for a, e, v in re.findall(r"(\S+) eps (\S+): accuracy ([0-9.]+)", text)}
    skipped = "attacks skipped" in text
    return {"clean": clean, "robust": robust, "attacks_skipped": skipped}


def run_numbers(folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text())
    robust = {f"{a} {e}": m["accuracy"] for a, by in results["metrics"]["robust"].items() for e, m in by.items()}
    return {"clean": results["metrics"]["clean"]["accuracy"], "robust": robust,
            "eval_examples": results["data"].get("eval_examples"), "steps": results["cost"]["optimizer_steps"]}


def same_sentences(trainer_dir: Path, run_dir: Path, eval_examples: int) -> dict:
    """Both models, attacked by samat.evaluate_model on the example's first ``eval_examples`` test sentences."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from samat import evaluate_model
    from samat.common.model_io import load_run_model
    from samat.text.data import load_raw

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(trainer_dir)
    data = load_raw(None)["test"].select(range(eval_examples))
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True)
    data = data.rename_column("label", "labels").remove_columns("text")
    models = {"trainer": AutoModelForSequenceClassification.from_pretrained(trainer_dir),
              "run": load_run_model(run_dir)[1]}
    out = {}
    for name, model in models.items():
        torch.manual_seed(0)
        record = evaluate_model(model.eval(), data, collate_fn=DataCollatorWithPadding(tokenizer), steps=5,
                                attack_collapsed=True)
        out[name] = {"clean": record["metrics"]["clean"]["accuracy"],
                     "robust": {f"{a} {e}": m["accuracy"] for a, by in record["metrics"]["robust"].items()
                                for e, m in by.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_examples", type=int, default=2000, help="training sentences of each run")
    parser.add_argument("--eval_examples", type=int, default=200, help="evaluation sentences")
    parser.add_argument("--work", default="runs/trainer_vs_run", help="folder for the two runs (ignored by git)")
    parser.add_argument("--out", required=True, help="JSON record to write")
    args = parser.parse_args()
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    trainer_dir, run_dir = work / "trainer", work / "run"
    rel_trainer, rel_run = Path(args.work) / "trainer", Path(args.work) / "run"  # the commands run in ROOT
    example = [sys.executable, "examples/sam_trainer.py", "--method", "sam-at", "--train_examples",
               str(args.train_examples), "--eval_examples", str(args.eval_examples), "--output_dir", str(rel_trainer)]
    run = [sys.executable, "scripts/run.py", "--task", "text", "--method", "sam-at", "--seed", "0",
           "--max_train_samples", str(args.train_examples), "--max_eval_samples", str(args.eval_examples),
           "--epochs", "1", "--batch_size", "32", "--optimizer", "adamw", "--lr", "5e-5", "--weight_decay", "0",
           "--lr_scheduler", "linear", "--warmup_ratio", "0.1", "--max_grad_norm", "1.0", "--max_length", "64",
           "--eval_steps", "5", "--sharpness_examples", "0", "--textattack_recipes", "none", "--log_with", "none",
           "--cpu_threads", "1", "--overwrite", "--output_dir", str(rel_run)]
    wall_trainer = timed(example, work / "trainer.log")
    wall_run = timed(run, work / "run.log")
    record = {
        "what": "examples/sam_trainer.py (SAMTrainer) vs scripts/run.py, same recipe, sam-at, text default",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": 1,
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in os.getloadavg()]},
        "commands": {"trainer": " ".join(example[1:]), "run": " ".join(run[1:])},
        "train_examples": args.train_examples, "eval_examples": args.eval_examples,
        "wall_s": {"trainer (train + save + eval)": wall_trainer, "run (train + save + eval)": wall_run},
        "own_evaluation": {"trainer": example_numbers(work / "trainer.log"), "run": run_numbers(run_dir)},
        "same_sentences": same_sentences(trainer_dir, run_dir, args.eval_examples),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
