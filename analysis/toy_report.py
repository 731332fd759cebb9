"""The toy experiment end to end: train every (variant, model, setting, seed) of :mod:`samat.analysis.toy`,
then write ``results.json`` (config, variants, every run, mean/std/95 % interval per setting),
``results.csv`` (one row per variant and setting) and the figures: ``toy_sam_rho.png`` and
``toy_at_eps.png`` for the base configuration, and, for a sweep (``--vary``), ``toy_sweep.png``: robust
share vs SAM's rho (top) beside AT's eps (bottom), one column per varied knob. ``scripts/toy.py``
(``samat toy``) is the command line."""

from __future__ import annotations

import io
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from samat.common.files import write_bytes_atomic, write_csv_atomic, write_json_atomic
from samat.common.stats import Stat
from samat.common.tables import format_table

from .toy import ToyConfig, aggregate, bayes_robust_share, eps_key, grid, run_one, vary

FIGURES = ("toy_sam_rho.png", "toy_at_eps.png")
SWEEP_FIGURE = "toy_sweep.png"


def variants(cfg: ToyConfig, models: Sequence[str], knobs: Sequence[tuple[str, Sequence[tuple[str, Any]]]]
             ) -> list[dict]:
    """The configurations to run: ``base`` per model when ``knobs`` (``[(knob, [(label, value)])]``) is
    empty, otherwise, per model, the base with one knob changed at a time
    (``{"name", "knob", "value", "cfg", "model", "base_model"}``, ``value`` the label)."""
    if not knobs:
        return [{"name": "base", "knob": "", "value": "", "cfg": cfg, "model": m, "base_model": m} for m in models]
    out = []
    for model in models:
        for knob, values in knobs:
            for label, value in values:
                vcfg, vmodel = vary(cfg, model, knob, value)
                out.append({"name": f"{knob}={label}", "knob": knob, "value": label, "cfg": vcfg, "model": vmodel,
                            "base_model": model})
    return out


def _cache_key(cfg: ToyConfig, model: str, method: str, value: float, seed: int) -> tuple:
    """What a run depends on: SAM's m only matters to SAM, the width only to the MLP."""
    cfg = replace(cfg, sam_m=cfg.sam_m if method == "sam" else 0, hidden=cfg.hidden if model == "mlp" else 0)
    return (tuple(asdict(cfg).items()), model, method, value, seed)


def summary_table(summary: list[dict], eval_keys: Sequence[str]) -> str:
    """One line per (variant, model, method, value): mean ± 95 % interval half-width over seeds (no ± for
    one seed). ``shift`` is the robust share minus ERM's of the same variant and seed."""
    def pm(s: dict, k: str) -> str:
        return Stat(s[k], s[f"{k}_ci95"], s["seeds"]).text("{:.3f}")

    head = ["variant", "model", "method", "rho", "eps", "clean", *[f"rob@{k}" for k in eval_keys],
            "robust_share", "shift", "weight_share", "sharpness", "collapsed"]
    rows = [[s["variant"], s["model"], s["method"], f"{s['rho']:g}", f"{s['eps']:.3g}", pm(s, "clean_accuracy"),
             *[pm(s, f"robust_accuracy@{k}") for k in eval_keys], pm(s, "robust_share"), pm(s, "share_shift"),
             pm(s, "weight_share"), f"{s['sharpness']:.4f}", f"{s['collapsed']}/{s['seeds']}"] for s in summary]
    return format_table(head, rows)


def shift_table(summary: list[dict]) -> str:
    """One line per (variant, model): the paired shift of the robust share away from ERM (mean ± 95 %
    interval half-width over seeds) for SAM at each rho and AT at each eps: claim (d) in one table."""
    def cell(s: Optional[dict]) -> str:
        if s is None:
            return "–"
        ci = "" if s["share_shift_ci95"] is None else f" ± {s['share_shift_ci95']:.3f}"
        return f"{s['share_shift']:+.3f}{ci}" + (f" ({s['collapsed']} collapsed)" if s["collapsed"] else "")

    rhos = sorted({s["rho"] for s in summary if s["method"] == "sam"})
    epss = sorted({s["eps"] for s in summary if s["method"] == "at"})
    index = {(s["variant"], s["model"], s["method"], s["rho"], s["eps"]): s for s in summary}
    keys = list(dict.fromkeys((s["variant"], s["model"]) for s in summary))
    head = ["variant", "model", "ERM share", *[f"SAM rho={r:g}" for r in rhos], *[f"AT eps={e:.3g}" for e in epss]]
    rows = [[v, m, f"{index[(v, m, 'erm', 0.0, 0.0)]['robust_share']:.3f}",
             *[cell(index.get((v, m, "sam", r, 0.0))) for r in rhos],
             *[cell(index.get((v, m, "at", 0.0, e))) for e in epss]] for v, m in keys]
    return format_table(head, rows, pad=False)


def plot_sweep(summary: list[dict], runs_variants: list[dict], bayes: float) -> bytes:
    """PNG: one column per (base model, knob); top row the shift of the robust share away from ERM's, paired
    by seed (mean, 95 % interval over seeds), against SAM's rho, bottom row against AT's eps (ERM is 0 at
    0); one line per knob value. Paired shifts, because the share itself varies more between seeds (data
    draws) than any SAM effect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys((v["base_model"], v["knob"]) for v in runs_variants))
    fig, axes = plt.subplots(2, len(columns), figsize=(max(4.5, 3.6 * len(columns)), 7.4), squeeze=False)
    for col, (base_model, knob) in enumerate(columns):
        members = [v for v in runs_variants if (v["base_model"], v["knob"]) == (base_model, knob)]
        for v, colour in zip(members, plt.get_cmap("viridis")([i / max(1, len(members) - 1) * 0.9
                                                               for i in range(len(members))])):
            mine = [s for s in summary if s["variant"] == v["name"] and s["model"] == v["model"]]
            for row, (method, xkey) in enumerate((("sam", "rho"), ("at", "eps"))):
                pts = sorted((s for s in mine if s["method"] in ("erm", method)), key=lambda s: s[xkey])
                ax = axes[row][col]
                ax.errorbar([s[xkey] for s in pts], [s["share_shift"] for s in pts],
                            [s["share_shift_ci95"] or 0 for s in pts], marker="o", ms=3, capsize=2, color=colour,
                            label=f"{v['value']}")
        for row, (xlabel, title) in enumerate((("SAM rho", "SAM"), ("AT eps", "AT"))):
            ax = axes[row][col]
            ax.axhline(0, color="grey", ls=":", lw=1)
            ax.set(xlabel=xlabel, title=f"{title}: {base_model}, vary {knob}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, title=knob, title_fontsize=7)
        top = axes[0][col]
        rhos = sorted({s["rho"] for s in summary if s["method"] == "sam"})
        if rhos:  # rho spans decades: symlog keeps ERM's 0 on the axis
            top.set_xscale("symlog", linthresh=rhos[0])
            top.set_xlim(0, rhos[-1] * 1.3)
            top.set_xticks([0, *rhos], ["0", *[f"{r:g}" for r in rhos]])
        low, high = top.get_ylim()  # at least +-0.05, so that noise does not look like an effect
        top.set_ylim(min(low, -0.05), max(high, 0.05))
        axes[1][col].set_ylim(-0.3, 1.02)
    for row in axes:
        row[0].set_ylabel("robust share - ERM's (paired by seed)")
    fig.suptitle(f"Robust share minus ERM's\n(mean, 95 % interval over seeds; Bayes linear share {bayes:.3f})",
                 fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _series(ax, rows: list[dict], key: str, **style) -> None:
    """Mean ± 95 % interval of ``key`` over the x of ``rows`` (bars only where several seeds)."""
    ax.errorbar([s["x"] for s in rows], [s[key] for s in rows], [s[f"{key}_ci95"] or 0 for s in rows], capsize=3,
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
    """Train every (variant, model, setting, seed) of ``lists`` (``models``, ``rho``, ``eps``, ``eval_eps``,
    ``seeds``, optional ``vary``: ``[(knob, values)]``), write the outputs into ``out``, return the results
    dict. Runs that do not depend on the varied knob (ERM and AT under ``sam_m``) are trained once."""
    import torch

    start = time.time()
    knobs = lists.get("vary") or []
    todo = variants(cfg, lists["models"], knobs)
    cache: dict[tuple, dict] = {}
    rows = []
    for i, v in enumerate(todo, 1):
        for _model, method, value in grid([v["model"]], lists["rho"], lists["eps"]):
            for seed in lists["seeds"]:
                key = _cache_key(v["cfg"], v["model"], method, value, seed)
                if key not in cache:
                    cache[key] = run_one(v["cfg"], v["model"], method, value, seed, lists["eval_eps"])
                rows.append({**cache[key], "variant": v["name"], "knob": v["knob"], "knob_value": v["value"]})
        print(f"toy: {i}/{len(todo)} {v['name']} ({v['model']}) done, {len(cache)} runs, "
              f"{time.time() - start:.0f}s", file=sys.stderr, flush=True)
    summary = aggregate(rows)
    for s in summary:  # the knob and its value beside each setting, for the CSV
        first = next(r for r in rows if r["variant"] == s["variant"] and r["model"] == s["model"])
        s["knob"], s["knob_value"] = first["knob"], first["knob_value"]
    results = {
        "experiment": "toy robust/non-robust features (Tsipras et al. 2019)",
        "config": {**asdict(cfg), **lists},
        "variants": [{k: (asdict(x) if k == "cfg" else x) for k, x in v.items()} for v in todo],
        "bayes_linear_robust_share": bayes_robust_share(cfg),
        "summary": summary, "runs": rows, "wall_s": time.time() - start,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    eval_keys = [eps_key(e) for e in lists["eval_eps"]]
    write_json_atomic(out / "results.json", results)
    header = ["variant", "knob", "knob_value", *[k for k in summary[0] if k not in ("variant", "knob", "knob_value")]]
    write_csv_atomic(out / "results.csv", header, summary)
    if knobs:
        write_bytes_atomic(out / SWEEP_FIGURE, plot_sweep(summary, todo, bayes_robust_share(cfg)))
        return results
    for name, (method, xkey, xlabel) in zip(FIGURES, (("sam", "rho", "SAM rho"), ("at", "eps", "AT eps"))):
        write_bytes_atomic(out / name, plot(summary, method, xkey, xlabel, eval_keys, cfg.probe_rho))
    return results
