#!/usr/bin/env python
"""The toy model of robust and non-robust features: does SAM, like AT, move weight to the robust feature?

    python scripts/toy.py                       # linear + MLP, ERM / SAM (6 rho) / AT (5 eps), 3 seeds
    python scripts/toy.py --models linear --seeds 0 --rho 0.1 1 --eps 0.3
    python scripts/toy.py --vary sam_m=1,8,batch --vary loss=logistic,hinge,squared   # one knob at a time

Writes ``<output_dir>/results.json`` (config, every run, mean/std per setting), ``results.csv`` (one row per
setting) and two figures, ``toy_sam_rho.png`` and ``toy_at_eps.png`` (robust share, clean and robust
accuracy, and weight-space sharpness against SAM's rho and AT's eps; ERM is the point at 0), and prints the
table. The data model, the methods and the robust share are defined in ``samat.analysis.toy``, the outputs in
``samat.analysis.toy_report``. Runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from samat.common.cli import ArgumentParser
from samat.common.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="runs/toy", help="Folder for results.json, results.csv and PNGs.")
    p.add_argument("--models", nargs="+", default=["linear", "mlp"],
                   help="Classifiers: linear, diag (diagonal linear network, beta = u*v) and/or mlp.")
    p.add_argument("--rho", nargs="+", default=["0.05", "0.1", "0.2", "0.5", "1", "2"],
                   help="SAM radii (L2 over all weights), each > 0.")
    p.add_argument("--eps", nargs="+", default=None,
                   help="AT L-inf radii, each > 0. Default: 0.25, 0.5, 1, 1.5, 2 times eta.")
    p.add_argument("--eval_eps", nargs="+", default=None,
                   help="L-inf radii for robust accuracy, each >= 0. Default: 0.5, 1, 2 times eta "
                        "(2 eta is Tsipras et al.'s adversary, which flips every non-robust feature).")
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="Seeds (data, init, order); mean/std over them.")
    p.add_argument("--d", default="50", help="Number of non-robust features.")
    p.add_argument("--p", default="0.9", help="P(robust feature agrees with the label), in (0.5, 1].")
    p.add_argument("--eta", default=None, help="Mean of the non-robust features times y, > 0. Default: 2/sqrt(d).")
    p.add_argument("--n_train", default="2000", help="Training examples.")
    p.add_argument("--n_test", default="5000", help="Test examples.")
    p.add_argument("--hidden", default="32", help="MLP hidden width.")
    p.add_argument("--epochs", default="20", help="Training epochs (SGD, cosine LR decay to 0).")
    p.add_argument("--batch_size", default="64",
                   help="Mini-batch size, or 'full' (= --n_train, full-batch training).")
    p.add_argument("--sam_m", default="batch",
                   help="SAM's m (m-sharpness): examples per perturbation group, each group's gradient taken at "
                        "its own perturbed weights, then averaged; 'batch' (or 0) = the whole mini-batch "
                        "(ordinary SAM), 1 = per-example.")
    p.add_argument("--loss", default="logistic", help="Training loss of the margin y f(x): logistic, hinge or squared.")
    p.add_argument("--lr", default="0.05", help="Peak SGD learning rate.")
    p.add_argument("--momentum", default="0.9", help="SGD momentum, in [0, 1).")
    p.add_argument("--weight_decay", default="0", help="SGD weight decay, >= 0.")
    p.add_argument("--pgd_steps", default="10", help="PGD steps for MLP adversarial training and evaluation.")
    p.add_argument("--probe_rho", default="0.5",
                   help="Radius of the weight-space sharpness probe measured on every trained model, > 0.")
    p.add_argument("--warmup", default="0.3",
                   help="Share of training steps over which SAM's rho and AT's eps ramp up from 0, in [0, 1].")
    p.add_argument("--vary", action="append", default=[], metavar="KNOB=V1,V2,...",
                   help="Sweep: rerun the whole ERM / SAM / AT grid with one knob changed at a time, for each "
                        "value (repeat the flag for more knobs). Knobs: sam_m, batch_size (keeps the number of "
                        "steps: epochs scale up), model, hidden, loss, weight_decay, epochs. Writes toy_sweep.png.")
    return p


def _knob_value(knob: str, text: str, cfg: Any) -> Any:
    """One ``--vary`` value, checked like the flag of the same name."""
    from samat.analysis.toy import LOSSES, MODELS

    if knob == "model":
        if text not in MODELS:
            raise UsageError(f"--vary model: unknown model {text!r}; choose one of: {', '.join(MODELS)}")
        return text
    if knob == "loss":
        if text not in LOSSES:
            raise UsageError(f"--vary loss: unknown loss {text!r}; choose one of: {', '.join(LOSSES)}")
        return text
    if knob == "sam_m":
        return 0 if text == "batch" else _number("--vary sam_m", text, integer=True, low=0)
    if knob == "batch_size":
        return cfg.n_train if text == "full" else _number("--vary batch_size", text, integer=True, low=1)
    if knob == "weight_decay":
        return _number("--vary weight_decay", text, low=0)
    return _number(f"--vary {knob}", text, integer=True, low=1)  # hidden, epochs


def _parse_vary(specs: Sequence[str], cfg: Any) -> list[tuple[str, list]]:
    """``["knob=v1,v2", ...]`` → ``[(knob, [(label, value)])]`` (``label`` as typed: ``batch``, ``full``);
    unknown knobs, empty or repeated ones are errors."""
    from samat.analysis.toy import KNOBS

    out: list[tuple[str, list]] = []
    for spec in specs:
        knob, sep, values = spec.partition("=")
        if knob not in KNOBS:
            raise UsageError(f"--vary: unknown knob {knob!r} in {spec!r}; choose one of: {', '.join(KNOBS)}")
        if not sep or not values.strip(","):
            raise UsageError(f"--vary: {spec!r} needs values, as in {knob}=V1,V2")
        if knob in dict(out):
            raise UsageError(f"--vary: knob {knob!r} given twice")
        labels = list(dict.fromkeys(v for v in values.split(",") if v))
        out.append((knob, [(label, _knob_value(knob, label, cfg)) for label in labels]))
    return out


def _number(flag: str, text: str, *, integer: bool = False, low: Optional[float] = None,
            low_open: bool = False, high: Optional[float] = None, high_open: bool = False) -> Any:
    """Parse ``text`` as an int/float inside the given bounds, or raise a one-line ``UsageError``."""
    try:
        value: Any = int(text) if integer else float(text)
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not {'an integer' if integer else 'a number'}") from None
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        where = f"in {lo or '(-inf'}, {hi or 'inf)'}"
        raise UsageError(f"{flag}: {text!r} must be a finite number {where}")
    return value


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, Any, dict[str, list]]:
    """Flags → (namespace, ToyConfig, lists). Every bad value is a ``UsageError``."""
    from samat.analysis.toy import LOSSES, MODELS, ToyConfig

    a = build_parser().parse_args(argv)
    for m in a.models:
        if m not in MODELS:
            raise UsageError(f"--models: unknown model {m!r}; choose one of: {', '.join(MODELS)}")
    if a.loss not in LOSSES:
        raise UsageError(f"--loss: unknown loss {a.loss!r}; choose one of: {', '.join(LOSSES)}")
    d = _number("--d", a.d, integer=True, low=1)
    n_train = _number("--n_train", a.n_train, integer=True, low=1)
    eta = 2 / math.sqrt(d) if a.eta is None else _number("--eta", a.eta, low=0, low_open=True)
    cfg = ToyConfig(
        d=d, p=_number("--p", a.p, low=0.5, low_open=True, high=1), eta=eta,
        n_train=n_train, loss=a.loss,
        sam_m=0 if a.sam_m == "batch" else _number("--sam_m", a.sam_m, integer=True, low=0),
        n_test=_number("--n_test", a.n_test, integer=True, low=1),
        hidden=_number("--hidden", a.hidden, integer=True, low=1),
        epochs=_number("--epochs", a.epochs, integer=True, low=1),
        batch_size=n_train if a.batch_size == "full" else _number("--batch_size", a.batch_size, integer=True, low=1),
        lr=_number("--lr", a.lr, low=0, low_open=True),
        momentum=_number("--momentum", a.momentum, low=0, high=1, high_open=True),
        weight_decay=_number("--weight_decay", a.weight_decay, low=0),
        pgd_steps=_number("--pgd_steps", a.pgd_steps, integer=True, low=1),
        warmup=_number("--warmup", a.warmup, low=0, high=1),
        probe_rho=_number("--probe_rho", a.probe_rho, low=0, low_open=True),
    )
    eps = [f * eta for f in (0.25, 0.5, 1, 1.5, 2)] if a.eps is None else a.eps
    eval_eps = [f * eta for f in (0.5, 1, 2)] if a.eval_eps is None else a.eval_eps
    lists = {
        "rho": sorted({_number("--rho", r, low=0, low_open=True) for r in a.rho}),
        "eps": sorted({_number("--eps", str(e), low=0, low_open=True) for e in eps}),
        "eval_eps": sorted({_number("--eval_eps", str(e), low=0) for e in eval_eps}),
        "seeds": sorted({_number("--seeds", s, integer=True, low=0) for s in a.seeds}),
        "models": list(dict.fromkeys(a.models)),
    }
    lists["vary"] = _parse_vary(a.vary, cfg)
    return a, cfg, lists


def run(a: argparse.Namespace, cfg: Any, lists: dict[str, list]) -> dict[str, Any]:
    """Train every (model, setting, seed), write the outputs, print the table; return the results dict."""
    import torch

    from samat.analysis.toy import eps_key
    from samat.analysis.toy_report import FIGURES, SWEEP_FIGURE, run_experiment, shift_table, summary_table

    # The matrices are tiny: one thread is faster than several, and far faster on a shared, busy CPU.
    torch.set_num_threads(1)
    out = Path(a.output_dir)
    results = run_experiment(cfg, lists, out)
    print(summary_table(results["summary"], [eps_key(e) for e in lists["eval_eps"]]))
    if lists["vary"]:
        print("\nShift of the robust share away from ERM (paired by seed; mean ± 95 % interval):")
        print(shift_table(results["summary"]))
    print(f"\nd={cfg.d} p={cfg.p} eta={cfg.eta:.4g}; Bayes-optimal linear robust share "
          f"{results['bayes_linear_robust_share']:.3f}; {len(results['runs'])} runs in {results['wall_s']:.1f}s; "
          f"wrote {out}/results.json, results.csv, {SWEEP_FIGURE if lists['vary'] else ', '.join(FIGURES)}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        a, cfg, lists = parse_args(argv)
    except UsageError as err:
        print(f"toy.py: error: {err}", file=sys.stderr)
        return 2
    run(a, cfg, lists)
    return 0


if __name__ == "__main__":
    sys.exit(main())
