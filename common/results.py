"""results.json (written atomically) and the readable table printed at the end of a run."""

from __future__ import annotations

import platform
from importlib import metadata

from .tables import format_table

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
