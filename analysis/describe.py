"""What a reproduction or a report actually ran on, in words: the dataset, the model and the sizes, read from
the flags after the user's overrides (before the runs) or from the runs' own ``results.json`` (after).

A preset's hand-written summary names its defaults ("5,000 Fashion-MNIST images"); once the user's flags
after ``--`` change the data, the model or the sizes, :func:`preset_summary` describes the runs from the
flags they will really get instead (issue 24: a reproduction on another dataset was headed "Fashion-MNIST").
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence

# Flags a preset's summary speaks of: when the user sets one, the summary is rebuilt from the flags.
DESCRIBED = ("dataset", "dataset_config", "model", "max_train_samples", "max_eval_samples", "epochs",
             "max_steps")


def _groups(tokens: Sequence[str]) -> dict[str, list[str]]:
    """``["--a", "1", "2", "--b"]`` -> ``{"a": ["1", "2"], "b": []}`` (later groups win)."""
    out: dict[str, list[str]] = {}
    name: Optional[str] = None
    for token in tokens:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            out[name] = [token.split("=", 1)[1]] if "=" in token else []
        elif name is not None:
            out[name].append(token)
    return out


def _count(value: Optional[list[str]], what: str) -> str:
    if not value:
        return f"the task's default number of {what}"
    try:
        n = int(value[0])
    except ValueError:
        return f"{value[0]} {what}"
    return f"all {what}" if n == 0 else f"{n:,} {what}"


def _task_default(task: str, attribute: str) -> Optional[str]:
    """A task's default model or dataset name, where the task class states one."""
    try:
        from samat.common.registry import task_class

        return getattr(task_class(task), attribute, None)
    except Exception:  # an unknown task is refused elsewhere; here it just has no name to show
        return None


def preset_summary(task: str, summary: str, preset_flags: Sequence[str], user_flags: Sequence[str],
                   low_powered: bool = False, tail: str = "") -> str:
    """``summary`` when the user's flags leave the data, model and sizes alone; else a description built from
    the flags the runs get (the user's over the preset's). ``tail``: the grid's radii and seeds."""
    user = _groups(user_flags)
    changed = [name for name in DESCRIBED if name in user]
    if not changed:
        return summary
    flags = {**_groups(preset_flags), **user}
    model = " ".join(flags.get("model") or []) or _task_default(task, "default_model") or "the task's default model"
    dataset = (" ".join(flags.get("dataset") or []) or _task_default(task, "default_dataset")
               or "the task's default dataset")
    if flags.get("dataset_config"):
        dataset += f" ({' '.join(flags['dataset_config'])})"
    length = (f"{flags['max_steps'][0]} steps" if flags.get("max_steps") else
              f"{flags['epochs'][0]} epochs" if flags.get("epochs") else "the task's default epochs")
    text = (f"{'LOW-POWERED: ' if low_powered else ''}{model} on {dataset}, "
            f"{_count(flags.get('max_train_samples'), 'training examples')}, {length}, "
            f"{_count(flags.get('max_eval_samples'), 'evaluation examples')} (the preset's flags with yours: "
            f"{', '.join('--' + c for c in changed)})")
    return text + (f"; {tail}" if tail else "")


def data_used(records: Sequence[Any]) -> str:
    """One sentence on the data and models the runs report in their ``results.json`` (``RunResults`` or
    dicts): distinct (dataset, model, training examples, evaluation examples), with how many runs each; ""
    when no run names its dataset."""
    seen: "OrderedDict[tuple, int]" = OrderedDict()
    for r in records:
        data = r.get("data", {}) if isinstance(r, dict) else getattr(r, "data", {}) or {}
        key = (data.get("dataset", "?"), data.get("model", "?"), data.get("train_examples"),
               data.get("eval_examples"))
        seen[key] = seen.get(key, 0) + 1
    if all(key[0] == "?" for key in seen):
        return ""
    parts = []
    for (dataset, model, train, evaluated), n in seen.items():
        sizes = ", ".join(s for s in (f"{train:,} training" if isinstance(train, int) else "",
                                      f"{evaluated:,} evaluation" if isinstance(evaluated, int) else "") if s)
        parts.append(f"`{dataset}` with `{model}`" + (f" ({sizes} examples)" if sizes else "")
                     + (f" in {n} runs" if len(seen) > 1 else ""))
    return "Data and model, from the runs' results.json: " + "; ".join(parts) + "."
