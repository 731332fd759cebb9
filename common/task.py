"""The contract between the engine and a task (vision, text, segmentation).

A task knows its data, its model, where an input perturbation lives, its loss and its metric. The engine
(``common/experiment.py``, ``common/methods.py``, ``common/attacks.py``) only ever talks to a task through
:class:`Task` and :class:`AttackSurface`, so one training loop and one PGD serve every modality.
"""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from .recipe import TaskDefaults, TaskRecipe


@dataclass
class AttackSurface:
    """Where an input perturbation ``delta`` lives for one batch.

    Attributes:
        x: the clean point in perturbation space, detached. Pixels: ``(B, C, H, W)`` in ``[0, 1]``.
            Token embeddings: ``(B, L, D)``.
        forward: ``delta -> logits``; runs the model at ``x + delta``. Gradients flow to ``delta`` *and* to the
            model's parameters (for text, through the embedding lookup too), so the same callable serves both
            the attack and the adversarial-training loss. ``delta`` has the shape of ``x``.
        mask: broadcastable to ``x``; 1 where ``x`` may move, 0 where it never may (padding tokens). ``None``
            means everywhere.
        bounds: box that ``x + delta`` must stay in (``(0, 1)`` for pixels); ``None`` for no box (embeddings).
        norm_dims: dimensions an Lp ball is taken over. ``None``: all but the batch dimension (one ball per
            example). ``(-1,)`` for embeddings: one ball per token.
        eps_scale: the user's eps and step size are multiplied by this. 1 for pixels (eps in pixel units);
            for embeddings, the mean token-embedding norm, so eps is relative to it.
    """

    x: Tensor
    forward: Callable[[Tensor], Tensor]
    mask: Optional[Tensor] = None
    bounds: Optional[tuple[float, float]] = (0.0, 1.0)
    norm_dims: Optional[tuple[int, ...]] = None
    eps_scale: float = 1.0

    def reduce_dims(self) -> tuple[int, ...]:
        """Dims of ``x`` that an Lp norm sums over (normalised to non-negative ints)."""
        if self.norm_dims is None:
            return tuple(range(1, self.x.dim()))
        return tuple(d % self.x.dim() for d in self.norm_dims)


@dataclass
class AttackSpec:
    """One evaluation attack: PGD in ``norm`` with a task-chosen objective.

    ``objective(logits, batch, step, steps) -> scalar`` is maximised; ``step`` counts from 0 to ``steps - 1``
    (SegPGD reweights pixels by step). ``eps`` is a list of ``(label, value)``.
    """

    name: str
    norm: str
    eps: list[tuple[str, float]]
    objective: Callable[[Tensor, dict, int, int], Tensor]


@dataclass
class TaskData:
    """What :meth:`Task.build` returns: an unprepared model, datasets and their collate function.

    ``train_dataset``/``eval_dataset`` are map-style (``datasets.Dataset`` with a transform, or any torch
    Dataset); ``collate_fn`` turns a list of their items into a batch dict of tensors.

    Random augmentation must not draw from the global RNG (Accelerate's loader prefetches a batch, so a
    resumed run would draw in a different order): seed it from ``(seed, epoch, index)`` and give the
    dataset a ``set_epoch(epoch)`` method, which the loop calls at each epoch start (see vision/data.py).
    """

    model: nn.Module
    train_dataset: Any
    eval_dataset: Any
    collate_fn: Callable[[list], dict]
    info: dict  # shown in results.json: dataset/model names, sizes, number of classes, ...
    # The task as built: a copy holding what build learned that later methods read (tokenizer, class names,
    # the evaluation set), made by Task.learned. None: build learned nothing of that kind; the task itself
    # serves. The engine uses this copy from here on, and the task build was called on stays unchanged.
    task: Optional["Task"] = None


class Task(abc.ABC):
    """One modality. Subclasses are registered in ``common.registry.TASKS`` with their args dataclass."""

    # Every fact code outside the task reads (name, metric, pixel space, default radii, training defaults) is
    # in the task's torch-free recipe; the class attributes below are set from it, once, by __init_subclass__.
    recipe: ClassVar[TaskRecipe]
    name: ClassVar[str]
    headline_metric: ClassVar[str]  # e.g. "accuracy" or "miou": the number tables and sanity checks use
    pixel_space: ClassVar[bool]     # the perturbation lives in pixel space with a [0, 1] box
    default_eval_linf: ClassVar[tuple[str, ...]]
    default_eval_l2: ClassVar[tuple[str, ...]]
    # One class per example (``labels`` ``(B,)``, logits ``(B, K)``)? Then evaluation adds macro-F1 and the
    # majority-class baseline, and the divergence guard prices the label prior (see ClassificationTask).
    single_label: ClassVar[bool] = False
    # The task's own flags (a dataclass parsed next to RunArgs/MethodArgs/EvalArgs).
    Args: ClassVar[type]
    # The task's recipe for flags left at None (optimizer, lr, schedule, AT radii, CPU subsets); an instance
    # may choose another (segmentation's --preset).
    defaults: TaskDefaults
    # What build learned, on the copy that TaskData.task carries (see learned); None on a task not yet built.
    state: Any = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        recipe = cls.__dict__.get("recipe")
        if recipe is not None:
            cls.name, cls.headline_metric, cls.pixel_space = recipe.name, recipe.headline_metric, recipe.pixel_space
            cls.default_eval_linf, cls.default_eval_l2 = recipe.eval_linf, recipe.eval_l2
            cls.defaults = recipe.defaults

    def __init__(self, args: Any):
        self.args = args

    def check_args(self) -> None:
        """Validate the task's own flags (``self.args``); raise ``UsageError``. Called before the run touches
        its output folder (so ``--overwrite`` with a bad flag deletes nothing), and again by :meth:`build`
        for callers that build directly."""

    @abc.abstractmethod
    def build(self, run: Any, accelerator: Any) -> TaskData:
        """Load data and model. Raise ``UsageError`` for bad names/columns. Runs on every process.

        Leaves ``self`` unchanged: what later methods need to know from the build (a tokenizer, class names)
        goes into ``TaskData.task``, a copy made by :meth:`learned`. So one task object can build several
        models (``samat evaluate``), and a build that fails leaves nothing half-set behind."""

    def learned(self, state: Any) -> "Task":
        """A copy of this task holding ``state`` (what :meth:`build` found out; read back as ``self.state``),
        for ``TaskData.task``. ``self`` is not changed."""
        built = copy.copy(self)
        built.state = state
        return built

    @abc.abstractmethod
    def forward(self, model: nn.Module, batch: dict) -> Tensor:
        """Clean logits, gradients flowing to every parameter. ``(B, K)`` or ``(B, K, H, W)``."""

    @abc.abstractmethod
    def surface(self, model: nn.Module, batch: dict) -> AttackSurface:
        """The attack surface of ``batch`` for ``model`` (wrapped or unwrapped)."""

    @abc.abstractmethod
    def loss(self, logits: Tensor, batch: dict) -> Tensor:
        """Mean training loss over the batch (scalar)."""

    def example_losses(self, logits: Tensor, batch: dict) -> Tensor:
        """Per-example training loss ``(B,)`` float32, for rules that rank examples by it (ESAM's data
        selection); its mean need not be :meth:`loss` exactly (segmentation weighs images by their pixels).
        A task without one refuses those rules in one line."""
        from .errors import UsageError

        raise UsageError(f"the {self.name} task gives no per-example loss (Task.example_losses), which esam "
                         "ranks examples by; use another efficient SAM rule")

    @abc.abstractmethod
    def example_stats(self, logits: Tensor, batch: dict) -> Tensor:
        """Per-example sufficient statistics, ``(B, ...)`` float. Summed over examples (after
        ``gather_for_metrics`` across processes) they give the metric via :meth:`compute_metrics`."""

    @abc.abstractmethod
    def compute_metrics(self, summed_stats: Tensor) -> dict[str, float]:
        """Metrics from summed stats; must contain ``headline_metric``."""

    def predictions(self, logits: Tensor) -> Tensor:
        """Predicted classes, used by the collapse guard (warn when a model predicts one class)."""
        return logits.argmax(dim=1)

    def extra_attacks(self, evals: Any = None) -> list["AttackSpec"]:
        """Attacks evaluated besides PGD-Linf/PGD-L2 on the task loss (segmentation: SegPGD). ``evals`` is
        the run's ``EvalArgs`` (radii the user asked for)."""
        return []

    def loss_mask(self, batch: dict) -> Optional[Tensor]:
        """Which output positions count in per-position losses such as TRADES' KL: ``(B, ...)`` bool shaped
        like the logits without the class dim, or ``None`` for all (segmentation: not ``ignore_index``)."""
        return None

    def extra_evaluation(self, model: nn.Module, accelerator: Any, run: Any) -> dict:
        """Task-specific evaluation after training (text: TextAttack recipes); merged into
        ``results["metrics"]``. ``model`` is unwrapped and in train mode: put it in eval mode (and back).
        A ``"warnings"`` entry (a list of one-line strings) is taken out and shown in the run's summary line
        and ``results["warnings"]`` (e.g. a segmentation model no better than predicting the majority class)."""
        return {}

    def extra_columns(self, metrics: dict) -> dict[str, float]:
        """Flat result columns ``{name: number}`` from this task's part of ``metrics`` (what
        :meth:`extra_evaluation` added). Stored in ``results["columns"]``; tables, trackers and the report
        show them without knowing the task."""
        return {}

    def save_model(self, model: nn.Module, path: str) -> None:
        """Save an unwrapped trained model into the folder ``path`` in a form :meth:`load_model` (and users,
        without samat) reload from the folder alone: config + safetensors, ``save_pretrained``, ..."""
        torch.save(model.state_dict(), f"{path}/model.pt")

    def load_model(self, path: str) -> nn.Module:
        """The model :meth:`save_model` wrote into the folder ``path``, on CPU, in eval mode; needs no training
        flags. ``UsageError`` when the folder holds no model of this task."""
        from .errors import UsageError

        raise UsageError(f"the {self.name} task cannot reload saved models")
