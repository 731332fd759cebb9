"""results.json (written atomically) and the readable table printed at the end of a run."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

PACKAGES = ("samat", "torch", "transformers", "accelerate", "datasets", "timm", "segmentation-models-pytorch",
            "textattack")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never half of it
    (a temp file in the same folder, then ``os.replace``). The file gets the usual 0644-less-umask mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line([str(h) for h in header]), sep, *(line(r) for r in rows)])


def metrics_table(results: dict) -> str:
    """One row per (attack, eps): the headline metric, clean first; then cost."""
    headline = results["headline_metric"]
    metrics = results["metrics"]
    rows = [("clean", "-", metrics["clean"][headline])]
    for attack, by_eps in metrics.get("robust", {}).items():
        for label, m in by_eps.items():
            rows.append((attack, label, m[headline]))
    table = format_table(["attack", "eps", headline], rows)
    cost = results.get("cost", {})
    summary = (f"method {results['method']} on {results['task']}: {cost.get('optimizer_steps', '?')} steps, "
               f"train {cost.get('train_wall_s', 0):.1f}s, eval {cost.get('eval_wall_s', 0):.1f}s, "
               f"{cost.get('forward_passes', '?')} forward / {cost.get('backward_passes', '?')} backward passes; "
               f"sanity checks {'passed' if results.get('sanity', {}).get('passed') else 'FAILED'}")
    recipes = metrics.get("textattack") or {}
    if recipes:
        keys = ("num_examples", "original_accuracy", "accuracy_under_attack", "attack_success_rate",
                "avg_perturbed_word_pct", "avg_queries")
        rows = [(recipe, *(m.get(k, "-") for k in keys)) for recipe, m in recipes.items() if isinstance(m, dict)]
        table += "\n\n" + format_table(["TextAttack recipe", "examples", "clean acc", "acc under attack",
                                          "success rate", "perturbed words %", "queries"], rows)
    sharp = results.get("sharpness") or {}
    if sharp.get("sam"):
        parts = [f"{form} rho {rho}: {v['sharpness']:.4f}" for form in ("sam", "asam")
                 for rho, v in sharp.get(form, {}).items()]
        summary += f"\nweight-space sharpness (loss rise, {sharp['num_examples']} examples): " + ", ".join(parts)
    return f"{table}\n{summary}"
