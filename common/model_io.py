"""A finished run's model as something to reload, describe and publish: one call to reload it with no training
flags (:func:`load_run_model`), its model card (``model/README.md``, hub metadata and the results table), and
``--push_to_hub``.

The save format is the task's (``Task.save_model`` / ``Task.load_model``): vision writes ``samat_model.json``
plus ``model.safetensors`` (transformers models: ``save_pretrained``), text a transformers ``save_pretrained``
folder, segmentation smp's own ``save_pretrained`` format; each with a samat JSON beside it.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Optional

from torch import nn

from .checkpoint import RESULTS_FILE
from .errors import UsageError
from .files import write_text_atomic
from .results import RunResults
from .tables import format_table
from .task import Task

MODEL_DIR = "model"
CARD_FILE = "README.md"
EVALUATIONS_DIR = "evaluations"


# ------------------------------------------------------------------------------------------- reload


def finished_run(folder: str | Path, flag: str = "run folder") -> RunResults:
    """The results record of the finished run in ``folder``; ``UsageError`` (naming ``flag``) when ``folder``
    is not one: missing, no ``results.json`` (unfinished or not a run), or no reloadable ``model/``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{flag} {str(folder)!r} is not a folder")
    if not (folder / RESULTS_FILE).is_file():
        raise UsageError(f"{flag} {str(folder)!r} is not a finished samat run (no {RESULTS_FILE}; an "
                         "interrupted run finishes with `samat run ... --resume`)")
    results = RunResults.read(folder / RESULTS_FILE)
    model_dir = folder / MODEL_DIR
    saved = [p.name for p in model_dir.iterdir()] if model_dir.is_dir() else []
    if saved and set(saved) <= {"model.pt", CARD_FILE}:
        raise UsageError(f"{flag} {str(folder)!r} holds a bare state_dict (model/model.pt) from an older samat, "
                         "which cannot be rebuilt without its training flags; retrain it with this version")
    if not saved:
        raise UsageError(f"{flag} {str(folder)!r} has no saved model ({MODEL_DIR}/ is missing or empty)")
    return results


def task_from_record(results: RunResults, overrides: Optional[dict] = None) -> Task:
    """The run's task with the task flags it was trained with (``results.config["task"]``), ``overrides``
    (field -> value) on top. Flags this samat no longer knows are dropped."""
    from .registry import task_class

    cls = task_class(results.task)
    known = {f.name for f in fields(cls.Args)}
    values = {k: v for k, v in (results.config.get("task") or {}).items() if k in known}
    values.update(overrides or {})
    return cls(cls.Args(**values))


def load_run_model(run_dir: str | Path) -> tuple[Task, nn.Module, dict]:
    """Reload a finished run's model from its folder alone.

    Returns ``(task, model, info)``: the task object with the run's task flags, the model on CPU in eval mode
    (vision and segmentation: pixels ``(B, C, H, W)`` in ``[0, 1]`` -> logits, normalisation inside; text: a
    transformers sequence classifier, whose tokenizer loads with ``AutoTokenizer.from_pretrained(<run>/model)``),
    and ``info`` with the run's ``task``, ``method``, ``method_resolved``, ``data`` (classes, dataset, input
    size) and ``results`` (the :class:`RunResults`).
    """
    results = finished_run(run_dir)
    task = task_from_record(results)
    model = task.load_model(str(Path(run_dir) / MODEL_DIR))
    info = {"task": results.task, "method": results.method, "method_resolved": results.method_resolved,
            "data": results.data, "results": results}
    return task, model.eval(), info


# ---------------------------------------------------------------------------------------- model card


def project_links() -> dict[str, str]:
    """The project's links as the installed package declares them (``pyproject.toml``'s ``[project.urls]``,
    read back through ``importlib.metadata``'s ``Project-URL`` entries): label -> https URL. Empty when samat is
    not installed or declares none."""
    from importlib import metadata

    try:
        entries = metadata.metadata("samat").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return {}
    links = {}
    for entry in entries:
        label, _, url = (part.strip() for part in entry.partition(","))
        if url.startswith("https://"):
            links[label] = url
    return links


def repository_url() -> Optional[str]:
    """Where a card links for samat: the declared ``Repository`` (else ``Homepage``), or ``None``: no link
    rather than a guessed address (a package-index page, a repository that may not exist)."""
    links = project_links()
    return next((links[k] for k in ("Repository", "Source", "Homepage") if k in links), None)


def method_tags(method: str) -> list[str]:
    """Card tags of a training method, from the method registry: ``sam`` for SAM-family updates,
    ``adversarial-training`` for adversarial objectives."""
    from .registry import METHODS

    m = METHODS.get(method)
    if m is None:
        return []
    tags = ["sam"] if "rho" in m.flags else []  # every SAM-family update (SAM, ASAM, the efficient variants)
    return tags + (["adversarial-training"] if m.objective != "clean" else []) + [m.name]


def saved_library(model_dir: Path, task: str) -> str:
    """The library a saved folder of ``task`` loads with (the hub's ``library_name``): the ``kind`` recorded in
    the task's saved config (its recipe's ``saved_config``), ``transformers`` for a bare ``config.json``."""
    from .registry import task_recipe

    path = model_dir / task_recipe(task).saved_config
    kind = None
    if path.is_file():
        kind = json.loads(path.read_text()).get("kind", "transformers" if path.name == "config.json" else None)
    return {"transformers": "transformers", "timm": "timm", "smp": "segmentation-models-pytorch"}.get(kind, "samat")


def _front_matter(results: RunResults, model_dir: Path) -> str:
    import yaml

    from .registry import RECIPES, task_recipe

    dataset = results.data.get("dataset")
    pipeline_tag = task_recipe(results.task).pipeline_tag if results.task in RECIPES else None
    meta: dict[str, Any] = {
        "library_name": saved_library(model_dir, results.task) if results.task in RECIPES else "samat",
        "tags": ["samat", *method_tags(results.method), "robustness", *([pipeline_tag] if pipeline_tag else [])],
        "datasets": [str(dataset)] if dataset else [],
        "metrics": [results.headline_metric],
    }
    if pipeline_tag:
        meta["pipeline_tag"] = pipeline_tag
    meta["model-index"] = model_index(results, pipeline_tag)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def model_index(results: RunResults, pipeline_tag: Optional[str]) -> list[dict]:
    """The hub's machine-readable ``model-index``, built with ``huggingface_hub``'s ``EvalResult``: the clean
    headline metric, and one robust value per attack (suite member or suite worst case) x radius, with the
    suite, attack, radius and number of examples in the metric arguments."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = str(results.data.get("dataset") or "unknown")
    n = results.data.get("eval_examples")
    suite = (results.extra.get("suite") or {}).get("name", "pgd")
    metric = results.headline_metric
    common = dict(task_type=pipeline_tag or "other", dataset_type=dataset, dataset_name=dataset,
                  dataset_split=results.data.get("eval_split"), metric_type=metric)
    rows = [EvalResult(**common, metric_value=results.clean, metric_name=f"clean {metric}",
                       metric_args={"examples": n})]
    rows += [EvalResult(**common, metric_value=value, metric_name=f"robust {metric} ({attack}, eps {eps})",
                        metric_args={"suite": suite, "attack": attack, "eps": eps, "examples": n})
             for attack, eps, value in results.robust()]
    name = f"samat-{results.task}-{results.method}"
    return ModelCardData(model_name=name, eval_results=rows).to_dict()["model-index"]


def _suite_line(results: RunResults) -> str:
    suite = results.extra.get("suite")
    steps = (results.config.get("eval") or {}).get("eval_steps")
    pgd = f"PGD-{steps}" if steps else "PGD"
    if not suite or not suite.get("attacks"):
        return f"attack suite `pgd`: the task's {pgd} per radius, worst iterate kept per example"
    return (f"attack suite `{suite.get('name')}`: the task's {pgd} plus {', '.join(suite.get('attacks', [])) or '-'}"
            f" ({suite.get('restarts', 1)} restart(s), APGD {suite.get('apgd_steps')} steps); an example counts as "
            "robust only if no attack fools it")


def results_section(results: RunResults, title: str) -> str:
    """The clean and robust table of one results record, its attack suite, examples and warnings."""
    rows = [("clean", "-", results.clean), *results.robust()]
    n = results.data.get("eval_examples")
    lines = [f"## {title}", "",
             f"{results.headline_metric} on {n if n is not None else 'the'} examples of the "
             f"`{results.data.get('eval_split', 'eval')}` split; {_suite_line(results)}.", "",
             format_table(["attack", "eps", results.headline_metric], rows), ""]
    problems = results.all_warnings()
    lines.append("Sanity checks passed, no warnings." if not problems
                 else "Warnings: " + "; ".join(problems))
    return "\n".join(lines) + "\n"


def model_card(results: RunResults, model_dir: Path, evaluations: Iterable[tuple[str, RunResults]] = ()) -> str:
    """``README.md`` text: hub metadata (library, tags, dataset, metric), method and hyper-parameters, data,
    and the clean/robust table of the run and of each later evaluation ``(name, results)``."""
    run = results.config.get("run") or {}
    hyper = {**results.method_resolved,
             **{k: run[k] for k in ("optimizer", "lr", "weight_decay", "lr_scheduler", "warmup_ratio", "epochs",
                                    "max_steps", "batch_size", "seed") if run.get(k) is not None},
             "optimizer_steps": results.cost.optimizer_steps}
    data = results.data
    classes = data.get("class_names") or data.get("label_names") or []
    url = repository_url()
    samat = f"[samat]({url})" if url else "samat"
    body = [
        f"# {results.task} model trained with `{results.method}` by samat", "",
        f"Method: **{results.method}**, trained by {samat} "
        f"(`samat run --task {results.task} --method {results.method}`).", "",
        "## Hyper-parameters", "", format_table(["name", "value"], list(hyper.items())), "",
        "## Data", "",
        f"Dataset `{data.get('dataset')}`, trained on {data.get('train_examples', '?')} examples, evaluated on "
        f"{data.get('eval_examples', '?')} of split `{data.get('eval_split', '?')}`; "
        f"{data.get('num_classes', len(classes))} classes" + (f": {', '.join(map(str, classes))}." if classes
                                                                else "."), "",
        results_section(results, "Results"),
    ]
    body += [results_section(r, f"Evaluation `{name}`") for name, r in evaluations]
    body += ["## Reload", "", "```python", "from samat.common.model_io import load_run_model",
             "task, model, info = load_run_model('<run folder>')  # no training flags needed", "```", ""]
    return _front_matter(results, model_dir) + "\n" + "\n".join(body)


def read_evaluations(run_dir: Path) -> list[tuple[str, RunResults]]:
    """``(name, results)`` of the run's ``evaluations/*.json``, by name."""
    folder = run_dir / EVALUATIONS_DIR
    return [(p.stem, RunResults.read(p)) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def write_model_card(run_dir: str | Path, results: Optional[RunResults] = None) -> Path:
    """(Re)write ``<run>/model/README.md`` from the run's results and evaluations, atomically."""
    run_dir = Path(run_dir)
    results = results or RunResults.read(run_dir / RESULTS_FILE)
    path = run_dir / MODEL_DIR / CARD_FILE
    write_text_atomic(path, model_card(results, run_dir / MODEL_DIR, read_evaluations(run_dir)))
    return path


# ---------------------------------------------------------------------------------------------- hub


def check_push_to_hub(run: Any) -> None:
    """``--push_to_hub``: refuse before any training when the hub cannot be reached."""
    if not getattr(run, "push_to_hub", False):
        return
    from .offline import hub_reachable

    if not hub_reachable():
        raise UsageError("--push_to_hub: the Hugging Face hub cannot be reached from this machine; train without "
                         "it and push <run>/model later (huggingface-cli upload)")


def hub_repo_id(run: Any) -> str:
    return getattr(run, "hub_model_id", None) or Path(run.output_dir).resolve().name


def publish(run: Any, results: RunResults) -> None:
    """After evaluation (main process): write the model card; with ``--push_to_hub``, upload ``model/``."""
    run_dir = Path(run.output_dir)
    if not (run_dir / MODEL_DIR).is_dir():
        return
    write_model_card(run_dir, results)
    if getattr(run, "push_to_hub", False):
        from huggingface_hub import HfApi

        api, repo = HfApi(), hub_repo_id(run)
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(run_dir / MODEL_DIR), repo_id=repo)
        print(f"pushed {run_dir / MODEL_DIR} to https://huggingface.co/{repo}")
