"""The toy experiment end to end: train every (model, setting, seed) of :mod:`samat.analysis.toy`, then write
``results.json`` (config, every run, mean/std per setting), ``results.csv`` (one row per setting), the
figures ``toy_sam_rho.png`` and ``toy_at_eps.png``, and return the summary table. ``scripts/toy.py``
(``samat toy``) is the command line."""

from __future__ import annotations

import io
import platform
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from samat.common.files import write_bytes_atomic, write_csv_atomic, write_json_atomic
from samat.common.stats import Stat
from samat.common.tables import format_table

from .toy import ToyConfig, aggregate, bayes_robust_share, eps_key, grid, run_one

FIGURES = ("toy_sam_rho.png", "toy_at_eps.png")


def summary_table(summary: list[dict], eval_keys: Sequence[str]) -> str:
    """One line per (model, method, value): mean ± std over seeds (no ± for one seed)."""
    def pm(s: dict, k: str) -> str:
        return Stat(s[k], s[f"{k}_std"], s["seeds"]).text("{:.3f}")

    head = ["model", "method", "rho", "eps", "clean", *[f"rob@{k}" for k in eval_keys], "robust_share",
            "weight_share", "sharpness", "collapsed"]
    rows = [[s["model"], s["method"], f"{s['rho']:g}", f"{s['eps']:.3g}", pm(s, "clean_accuracy"),
             *[pm(s, f"robust_accuracy@{k}") for k in eval_keys], pm(s, "robust_share"), pm(s, "weight_share"),
             f"{s['sharpness']:.4f}", f"{s['collapsed']}/{s['seeds']}"] for s in summary]
    return format_table(head, rows)


def _series(ax, rows: list[dict], key: str, **style) -> None:
    """Mean ± std of ``key`` over the x of ``rows`` (bars only where several seeds)."""
    ax.errorbar([s["x"] for s in rows], [s[key] for s in rows], [s[f"{key}_std"] or 0 for s in rows], capsize=3,
                **style)


def plot(summary: list[dict], method: str, xkey: str, xlabel: str, eval_keys: Sequence[str],
         probe_rho: float) -> bytes:
    """PNG: robust share, clean / robust accuracy and weight-space sharpness against ``xkey`` (``rho`` for
    ``sam``, ``eps`` for ``at``); ERM is the point at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_share, ax_acc, ax_sharp) = plt.subplots(1, 3, figsize=(16, 4))
    for model, colour in zip(dict.fromkeys(s["model"] for s in summary), ("tab:blue", "tab:orange", "tab:green")):
        rows = sorted(({**s, "x": s[xkey]} for s in summary if s["model"] == model and s["method"] in ("erm", method)),
                      key=lambda s: s["x"])
        _series(ax_share, rows, "robust_share", marker="o", color=colour, label=f"{model}: input-gradient share")
        if model != "linear":  # for the linear model the weight share equals the gradient share
            _series(ax_share, rows, "weight_share", marker="s", ls=":", color=colour,
                    label=f"{model}: 1st-layer weight share")
        _series(ax_acc, rows, "clean_accuracy", marker="o", color=colour, label=f"{model}: clean")
        _series(ax_sharp, rows, "sharpness", marker="o", color=colour, label=model)
        for k, ls in zip(eval_keys, ("--", "-.", ":", (0, (1, 3)))):
            _series(ax_acc, rows, f"robust_accuracy@{k}", marker=".", ls=ls, color=colour, alpha=0.8,
                    label=f"{model}: robust @ eps {k}")
    ax_share.set(xlabel=xlabel, ylabel="share on the robust feature", ylim=(-0.02, 1.02),
                 title=f"Robust share vs {xlabel} (0 = ERM)")
    ax_acc.set(xlabel=xlabel, ylabel="test accuracy", ylim=(-0.02, 1.02), title=f"Accuracy vs {xlabel}")
    ax_sharp.set(xlabel=xlabel, ylabel="train-loss increase", yscale="log",
                 title=f"Weight-space sharpness (rho {probe_rho:g}) vs {xlabel}")
    ticks = sorted({s[xkey] for s in summary if s["method"] in ("erm", method)})
    for ax in (ax_share, ax_acc, ax_sharp):
        if method == "sam" and len(ticks) > 1:  # rho spans decades: symlog keeps ERM's 0 on the axis
            ax.set_xscale("symlog", linthresh=ticks[1])
            ax.set_xlim(0, ticks[-1] * 1.2)
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def run_experiment(cfg: ToyConfig, lists: dict[str, list], out: Path) -> dict[str, Any]:
    """Train every (model, setting, seed) of ``lists`` (``models``, ``rho``, ``eps``, ``eval_eps``,
    ``seeds``), write the outputs into ``out``, return the results dict."""
    import torch

    start = time.time()
    rows = [run_one(cfg, model, method, value, seed, lists["eval_eps"])
            for model, method, value in grid(lists["models"], lists["rho"], lists["eps"]) for seed in lists["seeds"]]
    summary = aggregate(rows)
    results = {
        "experiment": "toy robust/non-robust features (Tsipras et al. 2019)",
        "config": {**asdict(cfg), **lists},
        "bayes_linear_robust_share": bayes_robust_share(cfg),
        "summary": summary, "runs": rows, "wall_s": time.time() - start,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    eval_keys = [eps_key(e) for e in lists["eval_eps"]]
    write_json_atomic(out / "results.json", results)
    write_csv_atomic(out / "results.csv", list(summary[0]), summary)
    for name, (method, xkey, xlabel) in zip(FIGURES, (("sam", "rho", "SAM rho"), ("at", "eps", "AT eps"))):
        write_bytes_atomic(out / name, plot(summary, method, xkey, xlabel, eval_keys, cfg.probe_rho))
    return results
