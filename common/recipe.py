"""A task's recipe: every fact about a task that code outside the task needs, in one light record.

Each task module exports one :class:`TaskRecipe` as ``samat.<task>.recipe.RECIPE`` (registered in
:data:`samat.common.registry.RECIPES`). The task class, the sweep and reproduce grids, the model cards and the
evaluation all read that record through :func:`samat.common.registry.task_recipe`; nothing copies a value out of
it. The record and this module import no torch, so the command lines can plan grids and print help without
loading a model library.

The recipe is the paper's where the paper has one (SAM's rho grid, Madry's PGD-10 with steps of eps/4 for
images); a task states why it departs (text: FreeLB-style 2 steps of eps/2; segmentation: SegPGD-AT's 3
steps of eps/2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import UsageError

NORMS = ("linf", "l2")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


def check_choice(flag: str, value: Optional[str], choices: tuple[str, ...]) -> None:
    """``UsageError`` naming ``flag``, the bad ``value`` and the valid ``choices`` (``None`` passes)."""
    if value is not None and value not in choices:
        raise UsageError(f"{flag}: unknown value {value!r}; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class TaskDefaults:
    """A task's training and evaluation recipe: the values of flags the user left at ``None``.

    ``cpu_*`` fields are what a run without a GPU uses instead: the subset sizes (a GPU uses the full data; 0
    means all) and, when set, a shorter schedule (``cpu_epochs``; ``None``: ``epochs`` everywhere).
    """

    optimizer: str
    lr: float
    weight_decay: float
    lr_scheduler: str
    warmup_ratio: float
    epochs: float
    batch_size: int
    eval_batch_size: Optional[int] = None    # None: twice batch_size
    # Adversarial training: the threat model and its radius per norm (strings, parsed like the flags).
    train_norm: str = "linf"
    train_eps_linf: str = "8/255"            # Madry et al.'s CIFAR budget
    train_eps_l2: str = "0.5"
    train_steps: int = 10                    # PGD-10
    train_alpha_ratio: float = 0.25          # step = eps/4: Madry's 2/255 at 8/255
    at_clean_weight: float = 0.0             # 0: Madry's pure adversarial loss
    cpu_max_train_samples: int = 0
    cpu_max_eval_samples: int = 0
    cpu_sharpness_examples: int = 256
    cpu_epochs: Optional[float] = None

    def __post_init__(self) -> None:  # a task's own recipe is checked like a user's flags
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        check_choice("train_norm", self.train_norm, NORMS)

    def train_eps(self, norm: str) -> str:
        """The default AT radius for threat model ``norm``."""
        return self.train_eps_linf if norm == "linf" else self.train_eps_l2


# SAM's radii in the paper's grid (Zhang et al. 2024; Foret et al.'s 0.05 is the smallest).
PAPER_RHO_GRID = ("0.05", "0.1", "0.2", "0.5")


@dataclass(frozen=True)
class TaskRecipe:
    """Everything outside a task needs to know about it. Radii are strings, parsed like the flags.

    Attributes:
        name: the registry name (``--task``).
        headline_metric: the metric tables, sanity checks and verdicts use (``accuracy``, ``miou``).
        pixel_space: the perturbation lives in pixels in ``[0, 1]`` (then a radius above 1 is a unit mistake,
            and the pixel-space library attacks apply); ``False`` for token embeddings.
        input_key: the batch key of the perturbed input (``pixel_values``), ``None`` where the perturbation is
            not on a batch tensor (text perturbs embeddings computed inside the model).
        pipeline_tag: the Hugging Face hub pipeline tag of the task's models (model cards).
        saved_config: the file that marks a saved model folder of this task (``model/``) and names the library
            it loads with.
        defaults: the training recipe for flags left unset (:class:`TaskDefaults`); its ``train_alpha_ratio``
            is the AT step as a share of eps that the sweep and reproduce grids use too.
        rho_grid: SAM's radii in a sweep.
        eps_grid_linf, eps_grid_l2: AT's radii in a sweep, per threat model.
        eval_linf, eval_l2: the default radii of the robustness evaluation (``--eval_linf``/``--eval_l2``).
    """

    name: str
    headline_metric: str
    pixel_space: bool
    input_key: Optional[str]
    pipeline_tag: str
    saved_config: str
    defaults: TaskDefaults
    eps_grid_linf: tuple[str, ...]
    eps_grid_l2: tuple[str, ...]
    eval_linf: tuple[str, ...]
    eval_l2: tuple[str, ...]
    rho_grid: tuple[str, ...] = PAPER_RHO_GRID

    def eps_grid(self, norm: str) -> tuple[str, ...]:
        """AT's sweep radii for threat model ``norm``; ``UsageError`` for an unknown norm."""
        check_choice("--train_norm", norm, NORMS)
        return self.eps_grid_linf if norm == "linf" else self.eps_grid_l2

    @property
    def alpha_ratio(self) -> float:
        """Multi-step AT's PGD step as a share of eps."""
        return self.defaults.train_alpha_ratio
