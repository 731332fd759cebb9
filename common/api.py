"""samat in the user's own code: the method arguments (:class:`SAMArguments`), one SAM/AT step in an Accelerate
loop (:func:`step`) and the robustness evaluation of an in-memory model (:func:`evaluate_model`).

Each is a thin layer over the engine ``scripts/run.py`` uses: :func:`step` builds the engine's
``StepContext`` and calls ``common/methods.py``'s ``train_step``; :func:`evaluate_model` calls
``common/evaluate.py``'s ``evaluate_all`` with the suite and radii ``samat evaluate`` resolves.

The task (where an adversarial perturbation lives, the loss, the metric) is inferred from the batch: with
``input_ids`` it is samat's text task (perturbations on the token embeddings, radii relative to the mean
token-embedding norm); otherwise a model task that runs ``model(**inputs)`` and supports the clean
(SAM/ASAM/efficient SAM) methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Union

from torch import Tensor, nn

from .classification import ClassificationTask
from .config import EvalArgs, MethodArgs
from .errors import UsageError
from .method_config import ResolvedMethod, resolve_method
from .recipe import TaskDefaults
from .step import StepContext, StepResult
from .task import AttackSurface, Task

LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits (B, K), labels (B,)) -> scalar


@dataclass
class SAMArguments(MethodArgs):
    """The samat method and its hyper-parameters (the fields and help of ``scripts/run.py``'s method flags).

    ``method``: a name of ``samat.common.registry.METHODS``: ``sam``, ``asam``, the efficient SAM rules
    (``sam-every-k``, ``looksam``, ``ae-sam``, ``esam``, ``saf``, ``mesa``; clean, and ``-at`` on PGD),
    ``pgd-at``, ``fgsm-at``, ``trades``, ``sam-at`` (adversarial, text: on the token embeddings). Fields left at their default take the paper's / the task's value.
    """

    method: str = field(default="sam", metadata={"help": "samat training method (see samat.common.registry)."})


def _explicit(args: MethodArgs) -> set[str]:
    """The method fields the user set (differ from their defaults): the flags resolve_method checks."""
    out = set()
    for f in fields(MethodArgs):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if getattr(args, f.name) != default:
            out.add(f.name)
    return out


def method_arguments(args: Optional[SAMArguments] = None, **kwargs: Any) -> SAMArguments:
    """``args``, or :class:`SAMArguments` from keyword arguments with a clear error for an unknown one."""
    if args is not None:
        if kwargs:
            raise UsageError(f"give either args or keyword arguments, not both ({', '.join(kwargs)})")
        return args
    names = {f.name for f in fields(SAMArguments)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise UsageError(f"unknown samat argument {unknown[0]!r}; choose from: {', '.join(sorted(names))}")
    return SAMArguments(**kwargs)


class ModelTask(ClassificationTask):
    """Classification with any model called as ``model(**inputs)`` (``.logits`` when it returns an output
    object) and cross-entropy or the user's ``loss_fn``. No attack surface: the clean methods only."""

    name = "model"
    headline_metric = "accuracy"
    pixel_space = False
    default_eval_linf: tuple = ()
    default_eval_l2: tuple = ()
    # Only train_norm is read for the clean methods; the rest are TaskDefaults' required fields.
    defaults = TaskDefaults(optimizer="sgd", lr=0.1, weight_decay=0.0, lr_scheduler="constant",
                            warmup_ratio=0.0, epochs=1, batch_size=1)

    def __init__(self, loss_fn: Optional[LossFn] = None):
        super().__init__(None)
        self.loss_fn = loss_fn

    def build(self, run: Any, accelerator: Any) -> Any:
        raise UsageError("samat.api.ModelTask wraps a model the user built; it loads nothing")

    def forward(self, model: nn.Module, batch: dict) -> Tensor:
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        return getattr(out, "logits", out)

    def surface(self, model: nn.Module, batch: dict) -> AttackSurface:
        raise UsageError("adversarial training needs an attack surface: samat perturbs the token embeddings of "
                         "batches with input_ids (text models); this batch has " + ", ".join(sorted(batch)))

    def loss(self, logits: Tensor, batch: dict) -> Tensor:
        return self.loss_fn(logits, batch["labels"]) if self.loss_fn else super().loss(logits, batch)


def _text_task(loss_fn: Optional[LossFn]) -> Task:
    from ..text.task import TextTask

    class UserTextTask(TextTask):
        def loss(self, logits: Tensor, batch: dict) -> Tensor:
            return loss_fn(logits, batch["labels"]) if loss_fn else super().loss(logits, batch)

    return UserTextTask() if loss_fn else TextTask()


def task_for(batch: dict, model: nn.Module, method: str, loss_fn: Optional[LossFn] = None) -> Task:
    """samat's text task for batches with ``input_ids``, else :class:`ModelTask`; ``UsageError`` when an
    adversarial ``method`` cannot perturb this model's inputs."""
    from .registry import METHODS
    from .errors import lookup

    adversarial = lookup(METHODS, "method", method).objective != "clean"
    if "input_ids" not in batch:
        if adversarial:
            raise UsageError(f"method {method!r} trains on adversarial token embeddings: the batch needs "
                             f"input_ids (it has {', '.join(sorted(batch))})")
        return ModelTask(loss_fn)
    base = getattr(model, "module", model)
    if adversarial and not callable(getattr(base, "get_input_embeddings", None)):
        raise UsageError(f"method {method!r} perturbs the token embeddings, but {type(base).__name__} has no "
                         "get_input_embeddings() (use a transformers model, or a clean method such as sam)")
    return _text_task(loss_fn)


def resolve(args: SAMArguments, task: Task) -> ResolvedMethod:
    """The engine's :class:`ResolvedMethod`: the paper's and the task's defaults for fields left unset;
    ``UsageError`` for an unknown method or a field the method does not read."""
    return resolve_method(args.method, args, task, _explicit(args))


def step(accelerator: Any, model: nn.Module, optimizer: Any, batch: Union[dict, list[dict]],
         loss_fn: Optional[LossFn] = None, *, args: Optional[SAMArguments] = None, max_grad_norm: float = 0.0,
         total_steps: int = 0, **method: Any) -> StepResult:
    """One optimizer step of a samat method in the user's Accelerate loop, exactly as ``scripts/run.py``'s.

    Args:
        accelerator, model, optimizer: as ``accelerator.prepare`` returned them (a scheduler is the
            caller's: step it when the result is not ``skipped``).
        batch: a dict of tensors (``labels`` ``(B,)`` int plus the model's inputs), or a list of them: the
            micro-batches of one step (gradient accumulation; do not also use ``accelerator.accumulate``).
        loss_fn: ``(logits (B, K), labels (B,)) -> scalar``; default mean cross-entropy.
        args or **method: :class:`SAMArguments` (``method="sam"``, ``rho=0.05``, ``train_eps="0.02"``...).
        max_grad_norm: clip the descent gradient (0: off). total_steps: the run's steps (AE-SAM schedule).

    Returns the engine's ``StepResult`` (``loss`` at ``w``, mean over micro-batches; ``skipped`` on fp16
    overflow).
    """
    from .methods import train_step

    micro = batch if isinstance(batch, list) else [batch]
    args = method_arguments(args, **method)
    task = task_for(micro[0], model, args.method, loss_fn)
    ctx = StepContext(accelerator=accelerator, model=model, optimizer=optimizer, task=task,
                      method=resolve(args, task), max_grad_norm=max_grad_norm, total_steps=total_steps)
    return train_step(ctx, micro)


def evaluate_model(model: nn.Module, data: Any, *, task: Optional[Task] = None, suite: str = "pgd",
                   eval_linf: Optional[list[str]] = None, eval_l2: Optional[list[str]] = None, steps: int = 10,
                   batch_size: int = 32, collate_fn: Optional[Callable] = None, accelerator: Any = None,
                   attack_collapsed: bool = False) -> dict:
    """Clean and robust accuracy of an in-memory model, the record ``samat evaluate`` computes.

    Args:
        model: a classifier (a transformers ``AutoModelFor...`` or a torch module returning logits).
        data: a ``DataLoader``, or a map-style dataset of dicts (tokenised text with ``labels``) batched here
            with ``collate_fn``.
        task: default: samat's text task when batches have ``input_ids`` (embedding-space attacks).
        suite: ``pgd``, ``apgd`` or ``autoattack`` (as ``--eval_attacks``).
        eval_linf, eval_l2: radii as strings (``["0.02"]``); default the task's. steps: PGD steps.
        attack_collapsed: attack a model that predicts one class anyway (else ``attacks_skipped`` says why).

    Returns ``{"task", "headline_metric", "metrics": {"clean", "robust"}, "sanity", "suite", ...}`` with
    ``robust[attack][radius]`` as in ``results.json``.
    """
    from torch.utils.data import DataLoader

    from .evaluate import evaluate_all
    from .resolve import attack_specs
    from .suites import resolve_suite

    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size,
                                                                 collate_fn=collate_fn)
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    # Prepared, so that gather_for_metrics reads this loader's end and remainder: Accelerate's state is
    # process-wide, and a loader left unfinished before (a Trainer's, which stops at max_steps) would
    # otherwise cut every evaluation batch to that loader's remainder.
    loader = accelerator.prepare_data_loader(loader)
    if task is None:
        first = next(iter(loader))
        if "input_ids" not in first:
            raise UsageError("evaluate_model infers the text task from batches with input_ids; pass task= "
                             "for other inputs (e.g. samat.vision.task.VisionTask())")
        task = _text_task(None)
    evals = EvalArgs(eval_linf=eval_linf, eval_l2=eval_l2, eval_steps=steps, eval_attacks=[suite])
    evaluation = evaluate_all(model, task, loader, accelerator, attack_specs(task, evals), steps,
                              suite=resolve_suite(task, evals), attack_collapsed=attack_collapsed)
    return {"task": task.name, "headline_metric": task.headline_metric, **evaluation}
