"""Run recipes on examples: one record per attacked sentence, and TextAttack's summary metrics per recipe.

Summary metrics follow TextAttack's own definitions (``textattack.metrics``):
    original_accuracy      (n - skipped) / n          skipped = already misclassified
    accuracy_under_attack  failed / n                 the model is still right after the attack
    attack_success_rate    successful / (successful + failed)
    avg_perturbed_word_pct mean over successful attacks of 100 * changed words / words
    avg_queries            mean model queries over attacked (non-skipped) examples
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Optional, Sequence

import numpy as np
from torch import nn

from samat.common.tables import format_table

from .recipes import build_attack, check_recipes
from .wrapper import BatchedModelWrapper

RESULT_KINDS = ("successful", "failed", "skipped", "maximized")
SUMMARY_COLUMNS = ("num_examples", "original_accuracy", "accuracy_under_attack", "attack_success_rate",
                   "avg_perturbed_word_pct", "avg_queries", "wall_s")

# --------------------------------------------------------------------------------------------- records


def _kind(result: Any) -> str:
    from textattack.attack_results import FailedAttackResult, SkippedAttackResult, SuccessfulAttackResult

    if isinstance(result, SuccessfulAttackResult):
        return "successful"
    if isinstance(result, FailedAttackResult):
        return "failed"
    if isinstance(result, SkippedAttackResult):
        return "skipped"
    return "maximized"


def _record(index: int, label: int, result: Any, seconds: float) -> dict:
    """One attacked example as plain values (the rows of ``examples.json``)."""
    original = result.original_result.attacked_text
    perturbed = result.perturbed_result.attacked_text
    kind = _kind(result)
    changed = len(original.all_words_diff(perturbed)) if kind != "skipped" else 0
    words = len(original.words)
    return {
        "index": index,
        "label": label,
        "result": kind,
        "original_output": int(result.original_result.output),
        "perturbed_output": int(result.perturbed_result.output),
        "num_queries": int(result.perturbed_result.num_queries) if kind != "skipped" else 0,
        "words": words,
        "words_changed": changed,
        "perturbed_word_pct": 100.0 * changed / max(words, 1),
        "seconds": round(seconds, 4),
        "original_text": original.text,
        "perturbed_text": perturbed.text,
    }


def attack_examples(attack: Any, examples: Sequence[dict], indices: Sequence[int], seed: int,
                    desc: Optional[str] = None) -> list[dict]:
    """Attack ``examples[i]`` for ``i`` in ``indices``; one record per example.

    Each example is a dict with ``text``, ``text_pair`` (or ``None``) and ``label``. The RNGs are reseeded
    with ``seed + i`` before example ``i``, so a record does not depend on which process attacked it, nor on
    the order, nor on the model wrapper. ``desc`` labels a progress bar (none without it).
    """
    from textattack.shared.utils import set_seed
    from tqdm.auto import tqdm

    records = []
    for i in tqdm(indices, desc=desc, disable=desc is None, leave=False, unit="sentence"):
        ex = examples[i]
        item = ex["text"] if ex.get("text_pair") is None else OrderedDict(text=ex["text"], text_pair=ex["text_pair"])
        set_seed(seed + int(i))
        started = time.perf_counter()
        result = attack.attack(item, int(ex["label"]))
        records.append(_record(int(i), int(ex["label"]), result, time.perf_counter() - started))
    return records


# -------------------------------------------------------------------------------------------- summaries


def summarize(records: Sequence[dict], wall_s: Optional[float] = None) -> dict:
    """TextAttack's summary metrics over per-example records (definitions in the module docstring);
    accuracies and the success rate are fractions in [0, 1], the perturbed-word share is in percent."""
    n = len(records)
    count = {k: sum(r["result"] == k for r in records) for k in RESULT_KINDS}
    attacked = [r for r in records if r["result"] != "skipped"]
    successful = [r for r in records if r["result"] == "successful"]
    decided = count["successful"] + count["failed"]
    out = {
        "num_examples": n,
        "original_accuracy": (n - count["skipped"]) / n if n else 0.0,
        "accuracy_under_attack": count["failed"] / n if n else 0.0,
        "attack_success_rate": count["successful"] / decided if decided else 0.0,
        "avg_perturbed_word_pct": float(np.mean([r["perturbed_word_pct"] for r in successful])) if successful else 0.0,
        "avg_words": float(np.mean([r["words"] for r in records])) if records else 0.0,
        "avg_queries": float(np.mean([r["num_queries"] for r in attacked])) if attacked else 0.0,
        "successful": count["successful"],
        "failed": count["failed"],
        "skipped": count["skipped"],
    }
    if wall_s is not None:
        out["wall_s"] = round(wall_s, 2)
    return out


def summary_table(rows: Sequence[dict], label_columns: Sequence[str]) -> str:
    """A markdown table of summaries: the ``label_columns`` of each row, then :data:`SUMMARY_COLUMNS`."""
    return format_table([*label_columns, *SUMMARY_COLUMNS],
                        [[*(r[c] for c in label_columns), *(r.get(c, "") for c in SUMMARY_COLUMNS)] for r in rows])


def format_summaries(summaries: dict[str, dict], row_label: str = "recipe") -> str:
    """A markdown table: one row per recipe (or ``"model / recipe"`` key)."""
    return summary_table([{**s, row_label: name} for name, s in summaries.items()], [row_label])


# ---------------------------------------------------------------------------------------------- models


def _attack_split(attack: Any, rows: list, seed: int, desc: Optional[str], accelerator: Any) -> list[dict]:
    """:func:`attack_examples` on every row; with several processes each attacks its share and the records
    are gathered (in index order), so every process returns all of them."""
    if accelerator is None or accelerator.num_processes <= 1:
        return attack_examples(attack, rows, range(len(rows)), seed, desc=desc)
    from accelerate.utils import gather_object

    with accelerator.split_between_processes(list(range(len(rows)))) as mine:
        records = attack_examples(attack, rows, mine, seed, desc=desc)
    return sorted(gather_object(records), key=lambda r: r["index"])


def attack_model(model: nn.Module, tokenizer: Any, examples: Any, recipes: Sequence[str], num_examples: int, *,
                 max_length: int = 128, batch_size: int = 64, query_budget: Optional[int] = None, seed: int = 0,
                 accelerator: Any = None, wrapper: Any = None, model_batch_size: Optional[int] = None,
                 progress: bool = True, progress_label: str = ""
                 ) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Run each recipe on the first ``num_examples`` of ``examples`` (rows with text/text_pair/label).

    With an ``accelerator`` of several processes, the examples are split between processes and the records
    gathered, so every process returns the full result. ``wrapper`` replaces our :class:`BatchedModelWrapper`
    (the benchmark passes TextAttack's stock one); ``model_batch_size`` is how many texts TextAttack's goal
    function hands the wrapper per call (default ``8 * batch_size``); ``progress`` shows a progress bar per
    recipe (on the main process), labelled ``progress_label`` + recipe. Returns
    ``({recipe: summary}, {recipe: records})``.
    """
    check_recipes(recipes)
    n = min(int(num_examples), len(examples))
    rows = [examples[i] for i in range(n)]
    if wrapper is None:
        wrapper = BatchedModelWrapper(model, tokenizer, max_length=max_length, batch_size=batch_size)
    if accelerator is not None and not accelerator.is_main_process:
        progress = False
    summaries, all_records = {}, {}
    for name in recipes:
        desc = f"attack {progress_label}{name}" if progress else None
        attack = build_attack(name, wrapper, query_budget=query_budget,
                              model_batch_size=model_batch_size or 8 * batch_size)
        started = time.perf_counter()
        records = _attack_split(attack, rows, seed, desc, accelerator)
        summaries[name] = summarize(records, time.perf_counter() - started)
        all_records[name] = records
    return summaries, all_records
