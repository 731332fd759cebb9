"""The results record of a run: one typed, versioned document, written and read only here.

``results.json`` is :class:`RunResults` as JSON. ``schema_version`` 1 added ``columns`` (a task's extra
result columns, flat) and ``warnings``; files without a version (schema 0) are upgraded on reading, so the
report reads every results.json samat ever wrote.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Optional

from .errors import UsageError
from .files import write_json_atomic
from .tables import format_table

SCHEMA_VERSION = 1
PACKAGES = ("samat", "torch", "transformers", "accelerate", "datasets", "timm", "segmentation-models-pytorch",
            "textattack", "pyautoattack")
# Blocks of metrics that are not a task's extras: clean metrics, and robust metrics per attack and radius.
CORE_METRICS = ("clean", "robust")
# Clean accuracy within this many points of always predicting the majority class: the model has learnt little
# beyond the label prior (segmentation's own margin is on mIoU, segmentation/evaluation.py).
MAJORITY_MARGIN = 0.02
BASELINE_GROUP = "baseline/majority_class"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class PassCounts:
    """Training cost as exact pass counts, counted by :class:`samat.common.cost.PassCounter`: forward calls of
    the model and backward passes through its output, as calls and as examples (rows of the logits; a doubled
    clean+adversarial batch is one call but twice the examples), of one process: under N processes each runs
    every pass of every step on its share of the batch (``train_examples`` counts all). The one declaration of
    these fields:
    :class:`Cost` (results.json) and ``checkpoint.TrainState`` (``trainer_state.json``) inherit them."""

    forward_passes: int = 0
    backward_passes: int = 0
    forward_examples: int = 0
    backward_examples: int = 0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The four count fields, in declaration (and file) order."""
        return tuple(f.name for f in fields(PassCounts))


@dataclass
class _CostClock:
    """The fields of :class:`Cost` before the pass counts (a base class, so results.json keeps its key order)."""

    train_wall_s: float = 0.0
    eval_wall_s: float = 0.0
    optimizer_steps: int = 0


@dataclass
class Cost(PassCounts, _CostClock):
    """Training and evaluation cost: wall times and exact pass counts (see ``samat.common.cost``).

    Fields in results.json order: ``train_wall_s``, ``eval_wall_s``, ``optimizer_steps`` (:class:`_CostClock`),
    the :class:`PassCounts`, then ``train_examples`` (examples the optimizer steps trained on, all processes)."""

    train_examples: int = 0


@dataclass
class RunResults:
    """Everything a finished run reports.

    ``metrics``: ``{"clean": {metric: value}, "robust": {attack: {eps label: {metric: value}}}, <task extras>}``
    with the headline metric (``headline_metric``, e.g. accuracy or miou) in [0, 1] in every block.
    ``attacks_skipped``: why no attack ran (a collapsed model; ``metrics["robust"]`` is then empty), or ``None``.
    ``majority_baseline``: single-label classification: ``{"class", "accuracy", "macro_f1"}`` of always
    predicting the evaluation set's most frequent class (also in ``columns`` as ``baseline/majority_class/*``).
    ``warnings``: every warning of :meth:`summary_line`, as written (the file holds :meth:`all_warnings`).
    ``columns``: the task's extra results flattened to ``{"group/row/field": number}`` (Task.extra_columns).
    ``extra``: evaluation blocks this version does not name (e.g. attack diagnostics), kept as they are.
    """

    task: str
    method: str
    headline_metric: str
    metrics: dict
    config: dict = field(default_factory=dict)
    method_resolved: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    predicted_class_counts: dict = field(default_factory=dict)
    collapsed: bool = False
    attacks_skipped: Optional[str] = None
    majority_baseline: Optional[dict] = None
    sanity: dict = field(default_factory=dict)
    sharpness: Optional[dict] = None
    cost: Cost = field(default_factory=Cost)
    columns: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    device: str = ""
    num_processes: int = 1
    cpu_threads: int = 0
    mixed_precision: str = "no"
    eval_precision: str = "fp32"   # "fp32", or the training precision ("bf16", "fp16") with --eval_precision train
    versions: dict = field(default_factory=dict)
    finished_at: str = ""
    extra: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------------------------------- I/O

    def to_dict(self) -> dict:
        """The document; its ``warnings`` are :meth:`all_warnings`, the very list the summary line shows."""
        out = asdict(self)
        out.update(out.pop("extra"))
        out["warnings"] = self.all_warnings()
        return out

    @classmethod
    def from_dict(cls, values: dict, source: str = "results") -> "RunResults":
        """Parse (and upgrade) a results document; ``UsageError`` naming ``source`` when it is not one."""
        if not isinstance(values, dict) or not all(k in values for k in ("task", "method", "metrics")):
            raise UsageError(f"{source} is not a samat results file (no task/method/metrics)")
        version = values.get("schema_version", 0)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise UsageError(f"{source} has schema_version {version!r}; this samat reads up to {SCHEMA_VERSION}: "
                             "upgrade samat")
        values = dict(values)
        if "eval_precision" not in values:  # written before issue 26: evaluated under the training autocast
            precision = values.get("mixed_precision", "no")
            values["eval_precision"] = precision if precision in ("bf16", "fp16") else "fp32"
        if version == 0:
            values.setdefault("columns", legacy_columns(values["metrics"]))
            values.setdefault("headline_metric", "accuracy")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        known["cost"] = Cost(**{k: v for k, v in (values.get("cost") or {}).items()
                                if k in {f.name for f in fields(Cost)}})
        known["schema_version"] = SCHEMA_VERSION
        return cls(**known, extra={k: v for k, v in values.items() if k not in names})

    @classmethod
    def read(cls, path: str | Path) -> "RunResults":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UsageError(f"{path}: cannot read results ({type(err).__name__})") from None
        return cls.from_dict(values, source=str(path))

    def write(self, path: str | Path) -> None:
        """Atomically: a reader sees the old file or the whole new one."""
        write_json_atomic(path, self.to_dict())

    # ------------------------------------------------------------------------------------- reading

    @property
    def clean(self) -> float:
        return self.metrics["clean"][self.headline_metric]

    def robust(self) -> list[tuple[str, str, float]]:
        """``[(attack, eps label, headline metric)]`` in stored order."""
        return [(attack, label, m[self.headline_metric])
                for attack, by_eps in self.metrics.get("robust", {}).items() for label, m in by_eps.items()
                if isinstance(m, dict) and self.headline_metric in m]

    def all_warnings(self) -> list[str]:
        """The run's warnings: the collapse guard, failed sanity checks and failed gradient-masking
        diagnostics first, then the task's own."""
        out = []
        if self.collapsed:
            out.append(f"the model predicts a single class on the whole evaluation set (collapsed): "
                       f"{self.predicted_class_counts}")
        if self.attacks_skipped:
            out.append(self.attacks_skipped)
        near = self.near_majority_baseline()
        if near:
            out.append(near)
        if self.sanity and not self.sanity.get("passed", True):
            failed = [c["name"] for c in self.sanity.get("checks", []) if not c.get("passed", True)]
            out.append(f"sanity checks FAILED: {', '.join(failed)}")
        diagnostics = self.extra.get("diagnostics")
        if isinstance(diagnostics, dict) and not diagnostics.get("passed", True):
            failed = [f"{c.get('name')} ({c.get('detail')})" for c in diagnostics.get("checks", [])
                      if isinstance(c, dict) and not c.get("passed", True)]
            out.append(f"robust accuracy may be overestimated: {'; '.join(failed)}")
        return out + [w for w in self.warnings if w not in out]

    def near_majority_baseline(self) -> Optional[str]:
        """A warning when clean accuracy is within :data:`MAJORITY_MARGIN` of the majority-class baseline
        (not for a collapsed model: its own warning says more)."""
        base = self.majority_baseline or {}
        accuracy = self.metrics.get("clean", {}).get("accuracy")
        if self.collapsed or "accuracy" not in base or not isinstance(accuracy, (int, float)):
            return None
        if accuracy > base["accuracy"] + MAJORITY_MARGIN:
            return None
        return (f"clean accuracy {accuracy:.3f} is within {MAJORITY_MARGIN:g} of always predicting the majority "
                f"class {base.get('class')} ({base['accuracy']:.3f}, macro-F1 {base.get('macro_f1', 0):.3f}): the "
                "model has learnt little beyond the label prior")

    def summary_line(self) -> str:
        """The last line a user reads: cost, and either "sanity checks passed" or every warning."""
        c = self.cost
        head = (f"method {self.method} on {self.task}: {c.optimizer_steps} steps, train {c.train_wall_s:.1f}s, "
                f"eval {c.eval_wall_s:.1f}s, {c.forward_passes} forward / {c.backward_passes} backward passes; ")
        problems = self.all_warnings()
        return head + ("sanity checks passed, no warnings" if not problems
                       else "WARNING: " + "; WARNING: ".join(problems))

    def table(self) -> str:
        """The readable end-of-run table: headline metric clean and per (attack, eps), the task's extra
        columns grouped as tables, sharpness, then :meth:`summary_line`."""
        blocks = [("clean", "-", self.metrics["clean"])] + [
            (attack, label, m) for attack, by_eps in self.metrics.get("robust", {}).items()
            for label, m in by_eps.items() if isinstance(m, dict) and self.headline_metric in m]
        f1 = any("macro_f1" in m for _, _, m in blocks)
        header = ["attack", "eps", self.headline_metric] + (["macro_f1"] if f1 else [])
        rows = [[a, e, m[self.headline_metric]] + ([m.get("macro_f1")] if f1 else []) for a, e, m in blocks]
        base = self.majority_baseline or {}
        if "accuracy" in base and self.headline_metric == "accuracy":
            rows.append([f"majority class {base.get('class')}", "-", base["accuracy"]]
                        + ([base.get("macro_f1")] if f1 else []))
        parts = [format_table(header, rows)]
        if self.attacks_skipped:
            parts.append(self.attacks_skipped)
        parts += [table for table in column_tables({k: v for k, v in self.columns.items()
                                                    if not k.startswith(BASELINE_GROUP + "/")})]
        sharp = self.sharpness or {}
        if sharp.get("sam"):
            probes = [f"{form} rho {rho}: {v['sharpness']:.4f}" for form in ("sam", "asam")
                      for rho, v in sharp.get(form, {}).items()]
            parts.append(f"weight-space sharpness (loss rise, {sharp['num_examples']} examples): "
                         + ", ".join(probes))
        return "\n\n".join(parts) + "\n" + self.summary_line()


def baseline_columns(baseline: Optional[dict]) -> dict[str, float]:
    """``baseline/majority_class/accuracy`` and ``.../macro_f1`` of a ``majority_baseline`` block (none
    without one), so that every table of runs shows the baseline beside the model."""
    if not baseline:
        return {}
    return {f"{BASELINE_GROUP}/{k}": float(baseline[k]) for k in ("accuracy", "macro_f1") if k in baseline}


def legacy_columns(metrics: dict) -> dict[str, float]:
    """Columns of a schema-0 file: every number in an extra metrics block (``metrics.<group>.<row>.<field>``,
    e.g. TextAttack's per-recipe summaries) as ``"<group>/<row>/<field>"``."""
    out = {}
    for group, rows in metrics.items():
        if group in CORE_METRICS or not isinstance(rows, dict):
            continue
        for row, values in rows.items():
            if not isinstance(values, dict):
                continue
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    out[f"{group}/{row}/{name}"] = float(value)
    return out


def column_tables(columns: dict[str, float]) -> list[str]:
    """Tables of ``"group/row/field"`` columns, one per group (rows × fields); other names in one
    two-column table."""
    groups: dict[str, dict[str, dict[str, float]]] = {}
    loose = []
    for name, value in columns.items():
        parts = name.split("/")
        if len(parts) == 3:
            groups.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = value
        else:
            loose.append((name, value))
    tables = []
    for group, rows in groups.items():
        header = list(dict.fromkeys(k for values in rows.values() for k in values))
        tables.append(format_table([group, *header], [[row, *(v.get(k) for k in header)]
                                                      for row, v in rows.items()]))
    if loose:
        tables.append(format_table(["column", "value"], loose))
    return tables
