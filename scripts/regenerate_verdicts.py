"""Regenerate a reproduction's verdicts from its committed ``results.csv`` under the current rules (issue 25).

For grids whose per-run results.json were never committed: the CSV holds every run's clean and robust
metrics, pass counts and (segmentation) the clean mIoU's bootstrap interval; the evaluation size and AT's step
count, which the CSV lacks, are given here (from the preset that made the grid). What the CSV cannot give (each
run's config: the like-with-like check of recipe and suite) is said in the verdict file.

    python scripts/regenerate_verdicts.py results/reproduce-vision-cpu/report/results.csv \\
        --task vision --scale cpu --eval_examples 1000 --at_steps 3 --out results/reproduce-vision-cpu
"""

from __future__ import annotations

import csv
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from samat.analysis import efficient as E
from samat.analysis import verdicts as V
from samat.analysis.reproduce import FRONTIER_FIGURE, PRESETS, strict_json
from samat.analysis.runs import Run, load_run_dict, portable
from samat.common.cli import ArgumentParser, main_guard
from samat.common.errors import UsageError
from samat.common.files import write_bytes_atomic, write_json_atomic, write_text_atomic

NOT_A_METRIC = ("run_dir", "task", "method", "setting", "seed", "rho", "train_eps", "sanity_passed", "device",
                "num_processes", "mixed_precision", "finished_at")


def _number(text: str) -> Optional[float]:
    try:
        return float(text) if text != "" else None
    except ValueError:
        return None


def row_to_results(row: dict, headline: str, eval_examples: int, at_steps: int) -> dict:
    """One results.csv row as a results.json document holding what the verdicts read."""
    robust: dict = {}
    columns: dict = {}
    suffix = f"_{headline}"
    for key, text in row.items():
        value = _number(text)
        if key in NOT_A_METRIC or value is None:
            continue
        if "@" in key and key.endswith(suffix):
            attack, _, radius = key[: -len(suffix)].partition("@")
            robust.setdefault(attack, {})[radius] = {headline: value}
        elif key.endswith(f"clean_{headline}_ci95_low") or key.endswith(f"clean_{headline}_ci95_high"):
            columns["csv/" + key.rpartition("clean_")[1] + key.rpartition("clean_")[2]] = value
    resolved = {"method": row["method"]}
    if row["rho"]:
        resolved["rho"] = float(row["rho"])
    if row["train_eps"]:
        resolved.update(eps=row["train_eps"], steps=at_steps)
    return {"task": row["task"], "method": row["method"], "headline_metric": headline, "schema_version": 1,
            "config": {"run": {"seed": int(row["seed"]), "max_eval_samples": eval_examples},
                       "method": {"rho": resolved.get("rho"), "train_eps": row["train_eps"] or None}},
            "method_resolved": resolved, "data": {"eval_examples": eval_examples},
            "metrics": {"clean": {headline: float(row[f"clean_{headline}"])}, "robust": robust},
            "columns": columns, "sanity": {"passed": row.get("sanity_passed") == "True"} if row.get(
                "sanity_passed") else {},
            "cost": {k.removeprefix("cost_"): _number(v) for k, v in row.items() if k.startswith("cost_")
                     and _number(v) is not None}}


def load_csv(path: Path, eval_examples: int, at_steps: int, exclude: Sequence[str]) -> list[Run]:
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if Path(r["run_dir"]).name not in exclude]
    if not rows:
        raise UsageError(f"{path}: no rows left")
    headline = next(k for k in rows[0] if k.startswith("clean_")).removeprefix("clean_")
    return [load_run_dict(row_to_results(r, headline, eval_examples, at_steps), Path(Path(r["run_dir"]).name))
            for r in rows]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", help="A report's results.csv.")
    p.add_argument("--task", required=True, help="Task of the preset that made the grid.")
    p.add_argument("--scale", required=True, help="Scale of the preset that made the grid.")
    p.add_argument("--eval_examples", type=int, required=True, help="Evaluation examples of every run.")
    p.add_argument("--at_steps", type=int, required=True, help="PGD steps of the AT runs (claim c's K).")
    p.add_argument("--exclude", nargs="*", default=[], help="Run folders (names) of the CSV not in the grid.")
    p.add_argument("--out", required=True, help="Folder of verdicts.md / verdicts.json.")
    args = p.parse_args(argv)
    if (args.task, args.scale) not in PRESETS:
        raise UsageError(f"--task/--scale: no preset {args.task}/{args.scale}; presets: {', '.join(map(str, PRESETS))}")
    preset, out, source = PRESETS[(args.task, args.scale)], Path(args.out), Path(args.csv)
    runs = load_csv(source, args.eval_examples, args.at_steps, args.exclude)
    v = V.decide(runs, primary_rho=float(preset.primary_rho), primary_eps=preset.primary_eps)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    csv_link = Path(portable(str(source.resolve()), out)).as_posix()
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    header = [f"Scale `{args.scale}`: {preset.summary}; {len(seeds)} seeds ({', '.join(map(str, seeds))}).",
              f"**Regenerated {when} under the rules of issue 25** from the committed [results.csv]({csv_link}) "
              f"({len(runs)} runs" + (f"; left out as not part of this grid: {', '.join(args.exclude)}" if args.exclude
                                      else "") + f"), with {args.eval_examples} evaluation examples per run and "
              f"PGD-{args.at_steps} AT from the preset. The runs' own results.json were never committed and are "
              "lost: the like-with-like check could compare only what the CSV holds (the attacks at each radius), "
              "not the recipe, suite flags or evaluation examples of each run (one reproduce command made the grid)."]
    frontier = E.frontier(v)
    markdown = V.to_markdown(v, header)
    if frontier is not None:
        png = E.figure(frontier)
        if png is not None:
            write_bytes_atomic(out / FRONTIER_FIGURE, png)
        markdown += "\n" + E.to_markdown(frontier, FRONTIER_FIGURE if png is not None else None)
    write_text_atomic(out / "verdicts.md", markdown + "\n")
    extra = {"scale": args.scale, "regenerated_from": csv_link, "regenerated_at": when,
             "eval_examples": args.eval_examples, "at_steps": args.at_steps, "excluded_rows": args.exclude,
             "efficient_sam": E.to_json(frontier) if frontier else None}
    write_json_atomic(out / "verdicts.json", portable(strict_json(V.to_json(v, extra)), out))
    print(V.verdict_table(v, pad=True))
    return 0


if __name__ == "__main__":
    main_guard(lambda: sys.exit(main()))
