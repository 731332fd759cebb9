"""The report's figures (matplotlib, Agg backend: no display needed), one function per figure, each returning
PNG bytes, or ``None`` where the runs hold nothing to draw. :func:`draw_figures` draws them all. Reads runs
and settings only; the column keys and titles are those of the tables (:mod:`samat.analysis.tables`)."""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from typing import Callable, Optional, Sequence

from samat.common.stats import Stat

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, also on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .runs import Run, Setting, eps_value, setting_order  # noqa: E402
from .tables import column_title, headline_keys, robust_keys  # noqa: E402

# Colour and marker per method, so that ERM, SAM and AT families read apart in every figure (every method
# of the engine's registry has one; a test keeps them in step).
STYLE = {
    "erm": ("black", "o"), "sam": ("tab:blue", "s"), "asam": ("tab:cyan", "D"), "pgd-at": ("tab:red", "^"),
    "fgsm-at": ("tab:orange", "v"), "trades": ("tab:purple", "P"), "sam-at": ("tab:green", "X"),
    # efficient SAM variants: SAM's colours, hollow-looking markers; their -at forms AT's
    "sam-every-k": ("tab:blue", "1"), "sam-every-k-at": ("tab:green", "1"), "looksam": ("tab:blue", "2"),
    "looksam-at": ("tab:green", "2"), "ae-sam": ("tab:blue", "3"), "ae-sam-at": ("tab:green", "3"),
    "saf": ("tab:blue", "4"), "saf-at": ("tab:green", "4"), "mesa": ("tab:blue", "+"), "mesa-at": ("tab:green", "+"),
    "esam": ("tab:blue", "x"), "esam-at": ("tab:green", "x"),
}
_EXTRA_COLOURS = ("tab:brown", "tab:pink", "tab:olive", "tab:gray")
DASHES = ("-", "--", ":", "-.")


# ---------------------------------------------------------------------------------------------- figures


def _style(method: str, extra: dict) -> tuple[str, str]:
    """``STYLE[method]``; a method not in it gets the next spare colour, kept in ``extra`` so that it has the
    same colour in every figure."""
    if method in STYLE:
        return STYLE[method]
    if method not in extra:
        extra[method] = (_EXTRA_COLOURS[len(extra) % len(_EXTRA_COLOURS)], "*")
    return extra[method]


def _panel_grid(n: int, width: float = 4.2, height: float = 3.4):
    """A figure with ``n`` panels, at most four a row; returns it and the ``n`` axes (spare ones hidden)."""
    ncols = min(4, max(1, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def png_bytes(fig) -> bytes:
    """``fig`` laid out and rendered as PNG bytes (110 dpi); the figure is closed."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _hyper(r: Run) -> str:
    parts = ([f"ρ{r.rho:g}"] if r.rho is not None else []) + ([f"ε{r.eps_label}"] if r.eps_label else [])
    return " ".join(parts) + r.variant


def _point(ax, r: Run, x: float, y: float, extra: dict) -> None:
    """One run as a point in its method's style, labelled with its hyper-parameters."""
    colour, marker = _style(r.method, extra)
    ax.scatter(x, y, color=colour, marker=marker, s=40, alpha=0.85)
    ax.annotate(_hyper(r), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")


def _errorbars(ax, pts: Sequence[tuple[float, Stat]], **style) -> None:
    """Means with ± std bars (none for a single seed) at ``(x, Stat)`` points."""
    ax.errorbar([x for x, _ in pts], [st.mean for _, st in pts], [st.std or 0 for _, st in pts], capsize=3,
                **style)


def _method_legend(ax, methods: Sequence[str], extra: dict) -> None:
    handles = [Line2D([], [], color=_style(m, extra)[0], marker=_style(m, extra)[1], ls="", label=m)
               for m in methods]
    ax.legend(handles=handles, fontsize=7, loc="best")


def fig_clean_vs_robust(runs: list[Run], extra: dict) -> Optional[bytes]:
    """(1) One panel per robust column: a point per run, clean on x, robust on y."""
    cols = headline_keys(runs)
    if not cols:
        return None
    headline = runs[0].headline
    methods = list(OrderedDict((r.method, None) for r in sorted(runs, key=setting_order)))
    fig, axes = _panel_grid(len(cols))
    for ax, key in zip(axes, cols):
        for r in runs:
            if r.metric(key) is not None:
                _point(ax, r, r.clean, r.metric(key), extra)
        ax.set(xlabel=f"clean {headline}", ylabel=column_title(key), title=column_title(key))
        ax.grid(alpha=0.3)
        _method_legend(ax, methods, extra)
    fig.suptitle("Accuracy–robustness trade-off (one point per run)", y=1.0)
    return png_bytes(fig)


def fig_robust_vs_eps(runs: list[Run], settings: list[Setting], extra: dict) -> Optional[bytes]:
    """(2) One panel per attack: mean ± std of the headline metric against the attack radius (0 = clean)."""
    attacks = list(OrderedDict((k.partition("@")[0], None) for k in robust_keys(runs)))
    if not attacks:
        return None
    headline = runs[0].headline
    fig, axes = _panel_grid(len(attacks), width=5.0, height=3.8)
    for ax, attack in zip(axes, attacks):
        labels = sorted({k.partition("@")[2] for r in runs for k in r.robust if k.startswith(attack + "@")},
                        key=eps_value)
        xs = [0.0] + [eps_value(label) for label in labels]
        for i, s in enumerate(settings):
            colour, marker = _style(s.method, extra)
            stats = [s.of(lambda r: r.clean)] + [s.of(lambda r, key=f"{attack}@{label}": r.robust.get(key))
                                                 for label in labels]
            _errorbars(ax, [(x, st) for x, st in zip(xs, stats) if st.n], color=colour, marker=marker, alpha=0.9,
                       label=s.name, ls=DASHES[i % 4])
        ax.set_xticks(xs, ["0"] + labels, fontsize=7)
        ax.set(xlabel=f"{attack} radius (0 = clean)", ylabel=headline, title=attack)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return png_bytes(fig)


def _sweep_lines(settings: Sequence[Setting], axis: str) -> "OrderedDict[tuple, list[Setting]]":
    """The lines of one column of the sweep figure (``axis`` ``"rho"`` or ``"eps"``): the settings of one
    method that share the *other* hyper-parameter and any further ones that tell settings apart
    (``Setting.variant``, e.g. at_clean_weight=0.5), keyed ``(method, other, variant)``, sorted along x."""
    lines: "OrderedDict[tuple, list[Setting]]" = OrderedDict()
    for s in settings:
        if _x(s, axis) is None or s.method == "erm":
            continue
        other = s.eps_label if axis == "rho" else (f"{s.rho:g}" if s.rho is not None else None)
        lines.setdefault((s.method, other, s.variant), []).append(s)
    return OrderedDict((k, sorted(v, key=lambda s: _x(s, axis) or 0.0)) for k, v in lines.items())


def _x(s: Setting, axis: str) -> Optional[float]:
    return s.rho if axis == "rho" else s.eps


def _sweep_panel(ax, lines: "OrderedDict[tuple, list[Setting]]", axis: str, erm: Optional[Setting],
                 get: Callable[[Run], Optional[float]], extra: dict) -> None:
    """One metric against rho or eps: a line per :func:`_sweep_lines` entry, starting at ERM (x = 0) where
    the other hyper-parameter is unset (SAM at rho 0 and AT at eps 0 are ERM)."""
    drawn: dict[str, int] = {}
    for (method, other, variant), members in lines.items():
        pts = [(_x(s, axis), s.of(get)) for s in members]
        if erm is not None and other is None:
            pts = [(0.0, erm.of(get))] + pts
        pts = [(x, st) for x, st in pts if st.n]
        if not pts:
            continue
        colour, marker = _style(method, extra)
        label = method + ("" if other is None else f" ({'eps' if axis == 'rho' else 'rho'}={other})") + variant
        nth = drawn.setdefault(method, 0)  # lines of one method share its colour: told apart by dashes
        drawn[method] += 1
        _errorbars(ax, pts, color=colour, marker=marker, label=label, ls=DASHES[nth % 4])
    if erm is not None and not lines and erm.of(get).n:
        _errorbars(ax, [(0.0, erm.of(get))], color="black", marker="o", label="erm")


def fig_sweep(runs: list[Run], settings: list[Setting], extra: dict) -> bytes:
    """(3) Rows: clean and each robust column; left column against SAM rho, right against AT eps. ERM is
    the point at 0 of every line whose other hyper-parameter is unset."""
    headline = runs[0].headline
    metrics: list[tuple[str, Callable[[Run], Optional[float]]]] = [(f"clean {headline}", lambda r: r.clean)]
    metrics += [(column_title(k), lambda r, k=k: r.metric(k)) for k in headline_keys(runs)]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 2.8 * len(metrics)), squeeze=False)
    erm = next((s for s in settings if s.method == "erm"), None)
    eps_labels = OrderedDict(sorted(((s.eps, s.eps_label) for s in settings if s.eps is not None)))
    for col, (axis, xname) in enumerate((("rho", "SAM rho"), ("eps", "AT train eps"))):
        lines = _sweep_lines(settings, axis)
        for row, (mname, get) in enumerate(metrics):
            ax = axes[row][col]
            _sweep_panel(ax, lines, axis, erm, get, extra)
            if not lines:
                ax.text(0.5, 0.5, f"no runs with a {xname}", transform=ax.transAxes, ha="center", fontsize=8)
            if axis == "eps" and eps_labels:
                ax.set_xticks([0.0, *eps_labels], ["0", *eps_labels.values()], fontsize=7)
            ax.set(xlabel=xname, ylabel=mname)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.suptitle("Clean and robust performance against SAM's rho and AT's eps (0 = ERM)", y=1.0)
    return png_bytes(fig)


def fig_cost(settings: list[Setting], extra: dict) -> bytes:
    """(4) Training wall time, and forward / backward passes, per setting (mean ± std)."""
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(max(10, 0.9 * len(settings) + 4), 4.2))
    names = [s.name for s in settings]
    xs = range(len(settings))
    t = [s.of(lambda r: r.cost.get("train_wall_s")) for s in settings]
    ax_t.bar(xs, [st.mean if st.n else 0 for st in t], yerr=[st.std or 0 for st in t], capsize=3,
             color=[_style(s.method, extra)[0] for s in settings])
    ax_t.set(ylabel="training wall time (s)", title="Training wall time")
    for label, offset, hatch in (("forward_passes", -0.2, ""), ("backward_passes", 0.2, "//")):
        st = [s.of(lambda r, label=label: r.cost.get(label)) for s in settings]
        ax_p.bar([x + offset for x in xs], [v.mean if v.n else 0 for v in st], width=0.4, hatch=hatch,
                 color=[_style(s.method, extra)[0] for s in settings], edgecolor="white",
                 label=label.replace("_", " "))
    ax_p.set(ylabel="passes (whole training)", title="Forward and backward passes")
    ax_p.legend(fontsize=7)
    for ax in (ax_t, ax_p):
        ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    return png_bytes(fig)


def fig_sharpness(runs: list[Run], sharp_key: str, extra: dict) -> Optional[bytes]:
    """(5) One panel per robust column: weight-space sharpness (x) against the robust metric (y)."""
    with_sharp = [r for r in runs if sharp_key in r.sharpness]
    cols = headline_keys(runs)
    if not with_sharp or not cols:
        return None
    methods = list(OrderedDict((r.method, None) for r in sorted(with_sharp, key=setting_order)))
    values = [r.sharpness[sharp_key] for r in with_sharp]
    log_x = min(values) > 0 and max(values) / min(values) > 50  # spans decades: log axis
    fig, axes = _panel_grid(len(cols))
    for ax, key in zip(axes, cols):
        for r in with_sharp:
            if r.metric(key) is not None:
                _point(ax, r, r.sharpness[sharp_key], r.metric(key), extra)
        if log_x:
            ax.set_xscale("log")
        ax.set(xlabel=f"sharpness {sharp_key}", ylabel=column_title(key), title=column_title(key))
        ax.grid(alpha=0.3)
        _method_legend(ax, methods, extra)
    fig.suptitle("Weight-space sharpness vs input-space robustness (one point per run)", y=1.0)
    return png_bytes(fig)


def draw_figures(runs: list[Run], settings: list[Setting], sharp_key: Optional[str]) -> list[tuple[str, str, bytes]]:
    """Every figure the runs can fill, as ``(file name, title, PNG bytes)``; ``sharp_key`` (e.g. ``"sam@0.05"``)
    picks the sharpness measurement of the last one, which is left out where it is ``None``."""
    extra: dict = {}
    candidates = [
        ("clean_vs_robust.png", "Clean vs robust (one point per run)", lambda: fig_clean_vs_robust(runs, extra)),
        ("robust_vs_eps.png", "Robust metric vs attack radius", lambda: fig_robust_vs_eps(runs, settings, extra)),
        ("sweep_rho_eps.png", "Clean and robust vs SAM rho and AT eps", lambda: fig_sweep(runs, settings, extra)),
        ("cost.png", "Cost: wall time and passes", lambda: fig_cost(settings, extra)),
        ("sharpness_vs_robust.png", f"Sharpness ({sharp_key}) vs robustness",
         lambda: fig_sharpness(runs, sharp_key, extra) if sharp_key else None),
    ]
    figures = []
    for name, title, make in candidates:
        png = make()
        if png is not None:
            figures.append((name, title, png))
    return figures
