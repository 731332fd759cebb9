"""Typed run configuration: one dataclass per concern, parsed by ``transformers.HfArgumentParser``.

``RunArgs`` (what to train, how long, where), ``MethodArgs`` (SAM / adversarial-training knobs) and
``EvalArgs`` (the robustness evaluation) are shared by every task; each task adds its own args dataclass
(``vision.task.VisionArgs`` ...). Fields left at ``None`` take the task's recipe, a typed
:class:`TaskDefaults` (``Task.defaults``), resolved once by :func:`resolve_defaults` (into new objects; see
:mod:`samat.common.resolve` for the frozen record of a whole run) before anything touches the
output folder, so "SGD lr 0.1 for a ResNet" and "AdamW lr 5e-5 for BERT" both come from the papers' recipes
without flags, and a misspelled default is an error at import rather than a silent fallback.

Precision (fp32/bf16/fp16) and the number of processes are not flags here: they belong to
``accelerate config`` / ``accelerate launch --mixed_precision ... --num_processes ...``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from typing import Optional

from .errors import UsageError
from .recipe import NORMS, OPTIMIZERS, SCHEDULERS, TaskDefaults, check_choice
from .registry import METHODS, TASKS, UPDATE_RULES, task_recipe

SAM_SYNC = ("local", "global")


def _per_task(describe) -> str:
    """``"vision: x; text: y; ..."`` from each task's recipe (help texts read the recipes, never a copy)."""
    return "; ".join(f"{name}: {describe(task_recipe(name).defaults)}" for name in TASKS)


def _rule_default(flag: str) -> str:
    """The papers' default of a method flag from ``UPDATE_RULES`` (help texts read the registry, never a copy):
    ``"5"`` when every rule that sets it agrees, else ``"0.05 for sam, ...; 0.5 for asam"`` grouped by value."""
    by_value: dict = {}
    for name, rule in UPDATE_RULES.items():
        if flag in rule.defaults:
            by_value.setdefault(rule.defaults[flag], []).append(name)
    if len(by_value) == 1:
        return f"{next(iter(by_value)):g}"
    return "; ".join(f"{value:g} for {', '.join(names)}" for value, names in by_value.items())


MAX_RHO = 10.0  # SAM's radius bound (the paper uses 0.05-0.5); the sweep checks its grid against it


@dataclass
class RunArgs:
    task: str = field(default="vision", metadata={"help": f"Task: {', '.join(TASKS)}."})
    method: str = field(
        default="erm",
        metadata={"help": f"Training method: {', '.join(METHODS)} (summaries: --help's epilog)."},
    )
    model: Optional[str] = field(
        default=None,
        metadata={"help": "Model: a built-in name (vision: preact_resnet18, small_cnn; segmentation: an smp "
                  "architecture such as unet, fpn), 'timm:<name>', a Hugging Face hub id or a local folder. "
                  "Default: the task's embedded default."},
    )
    dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Dataset: a Hugging Face hub id, a local `save_to_disk` folder, or a built-in "
                  "name. Default: the task's embedded offline dataset."},
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Dataset config name on the hub."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: Optional[str] = field(
        default=None, metadata={"help": "Split to evaluate on. Default: 'test', else 'validation'."}
    )
    label_column: Optional[str] = field(
        default=None,
        metadata={"help": "Label column (the mask column for segmentation). Default: found automatically."},
    )
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Train on the first N (shuffled, seeded) examples. Default: all on a GPU, the "
                  "task's CPU subset on CPU (logged). 0 = all."},
    )
    max_eval_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Evaluate clean and robust accuracy on N test examples. Default: all on a GPU, "
                  "the task's CPU subset on CPU. 0 = all."},
    )
    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Run folder. Default: runs/<task>-<method>-s<seed>."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for data order, init, augmentation and attacks."})
    epochs: Optional[float] = field(default=None, metadata={"help": "Training epochs (task default)."})
    max_steps: Optional[int] = field(
        default=None, metadata={"help": "Optimizer steps; overrides --epochs when given."}
    )
    batch_size: Optional[int] = field(
        default=None, metadata={"help": "Per-process micro-batch size (task default)."}
    )
    eval_batch_size: Optional[int] = field(default=None, metadata={"help": "Per-process eval batch size."})
    optimizer: Optional[str] = field(default=None, metadata={"help": "Base optimizer: sgd or adamw."})
    lr: Optional[float] = field(default=None, metadata={"help": "Peak learning rate (task default)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: Optional[float] = field(default=None, metadata={"help": "Weight decay (task default)."})
    lr_scheduler: Optional[str] = field(
        default=None, metadata={"help": "LR schedule: cosine, linear, constant, constant_with_warmup."}
    )
    warmup_ratio: Optional[float] = field(default=None, metadata={"help": "Share of steps for LR warm-up."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches per optimizer step. SAM perturbs and descends once per optimizer "
                  "step, with the perturbation set by the gradient of all micro-batches together."},
    )
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Clip the descent gradient to this norm; 0 disables clipping."}
    )
    checkpoint_every: int = field(
        default=0, metadata={"help": "Save a resumable checkpoint every N optimizer steps (0: only at end)."}
    )
    resume: bool = field(
        default=False, metadata={"help": "Resume from the newest checkpoint in --output_dir."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Start over even if --output_dir holds a run."}
    )
    log_with: str = field(
        default="tensorboard", metadata={"help": "Accelerate tracker: tensorboard, wandb, all or none."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log loss and LR every N optimizer steps."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    cpu_threads: Optional[int] = field(
        default=None,
        metadata={"help": "Torch CPU threads. Default: on a single-process CPU run, every core this process may "
                  "use (accelerate launch sets OMP_NUM_THREADS=1, which would leave the other cores idle); "
                  "otherwise the launcher's setting."},
    )
    find_unused_parameters: bool = field(
        default=False,
        metadata={"help": "Multi-process: let DDP find parameters that get no gradient in a step (hub models with "
                  "unused heads or poolers fail without it; it costs an extra pass over the graph each step)."},
    )
    divergence_guard: bool = field(
        default=True,
        metadata={"help": "Stop with one line (exit 2, no results.json) when the training loss is non-finite (read "
                  "every --logging_steps steps, not to wait on the device every step), or "
                  "no lower than predicting the training labels' prior (its entropy; ln K when balanced) after the "
                  "warm-up and 512 examples and again at twice that step, naming the likely fix (--lr, "
                  "--warmup_ratio, more steps); false trains on regardless."},
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Upload <output_dir>/model (weights, config, model card) to the Hugging Face hub after "
                  "evaluation; refused before training when the hub cannot be reached."},
    )
    hub_model_id: Optional[str] = field(
        default=None, metadata={"help": "Hub repository for --push_to_hub. Default: the output folder's name."}
    )
    config: Optional[str] = field(
        default=None, metadata={"help": "YAML/JSON file of flag values; flags on the command line win."}
    )


@dataclass
class MethodArgs:
    rho: Optional[float] = field(
        default=None, metadata={"help": "SAM/ASAM neighbourhood radius (default " + _rule_default("rho")
                                + "; their -at forms alike)."}
    )
    asam_eta: float = field(default=0.01, metadata={"help": "ASAM's eta: |w| + eta scales the ball."})
    sam_sync: Optional[str] = field(
        default=None,
        metadata={"help": "Multi-process SAM: 'local' perturbs each replica with its own gradient (as the "
                  "original SAM, first pass under no_sync); 'global' uses the all-reduced gradient. Default: "
                  "local under DDP; global under FSDP, where each rank holds only a shard of the gradient "
                  "(local is refused there)."},
    )
    train_eps: Optional[str] = field(
        default=None,
        metadata={"help": "AT radius, e.g. 8/255 in pixel units; relative to the mean token-embedding norm "
                  "for text. Default: the task's (" + _per_task(lambda d: d.train_eps(d.train_norm)) + ")."},
    )
    train_alpha: Optional[str] = field(
        default=None,
        metadata={"help": "AT PGD step size. Default: the task's share of eps ("
                  + _per_task(lambda d: f"{d.train_alpha_ratio:g}*eps") + "); fgsm-at: 1.25*eps."},
    )
    train_steps: Optional[int] = field(
        default=None, metadata={"help": "AT PGD steps. Default: the task's (" + _per_task(lambda d: str(d.train_steps))
                                + ")."}
    )
    train_norm: Optional[str] = field(
        default=None, metadata={"help": f"AT threat model: {', '.join(NORMS)}. Default: the task's ("
                                + _per_task(lambda d: d.train_norm) + ")."}
    )
    trades_beta: float = field(default=6.0, metadata={"help": "TRADES robustness weight beta."})
    sam_interval: Optional[int] = field(
        default=None,
        metadata={"help": "sam-every-k, looksam (and -at): k, a full SAM step on every k-th optimizer step, the "
                  "first included; 1 is SAM (default " + _rule_default("sam_interval")
                  + ", LookSAM's k, Liu et al. 2022)."},
    )
    looksam_alpha: Optional[float] = field(
        default=None,
        metadata={"help": "looksam: weight alpha of the reused orthogonal SAM-gradient component between SAM "
                  "steps; 0 is sam-every-k (default " + _rule_default("looksam_alpha") + ", Liu et al. 2022)."},
    )
    aesam_delta: Optional[float] = field(
        default=None,
        metadata={"help": "ae-sam: decay in [0, 1) of the EMA mean and variance of the squared gradient norm "
                  "(default " + _rule_default("aesam_delta") + ", Jiang et al. 2023)."},
    )
    aesam_c_start: Optional[float] = field(
        default=None,
        metadata={"help": "ae-sam: c at the first step; SAM when ||g||^2 >= mean + c*std, c moving linearly to "
                  "--aesam_c_end (default " + _rule_default("aesam_c_start")
                  + ", Jiang et al. 2023; -inf for both is SAM, inf is ERM)."},
    )
    aesam_c_end: Optional[float] = field(
        default=None,
        metadata={"help": "ae-sam: c at the last step. Default " + _rule_default("aesam_c_end") + ", samat's budget "
                  "schedule, fewer SAM steps than the paper's -1 (Jiang et al. 2023: about half the steps); "
                  "RESULTS.md section B has the measured shares and costs."},
    )
    esam_beta: Optional[float] = field(
        default=None,
        metadata={"help": "esam (and -at): SWP's keep probability beta in (0, 1]: each parameter tensor is "
                  "perturbed with probability beta, by e/beta; 1 perturbs all, as SAM (default "
                  + _rule_default("esam_beta") + ", Du et al. 2022)."},
    )
    esam_gamma: Optional[float] = field(
        default=None,
        metadata={"help": "esam (and -at): SDS's share gamma in (0, 1] of each batch the second pass runs on: the "
                  "examples whose loss rises most at w + e; 1 is the whole batch, as SAM (default "
                  + _rule_default("esam_gamma") + ", Du et al. 2022)."},
    )
    traj_lambda: Optional[float] = field(
        default=None,
        metadata={"help": "saf, mesa (and -at): weight lambda of the trajectory loss lambda*tau^2*KL(reference || "
                  "current) (default " + _rule_default("traj_lambda")
                  + ": the authors' ImageNet runs, Du et al. 2022)."},
    )
    traj_temperature: Optional[float] = field(
        default=None,
        metadata={"help": "saf, mesa: softmax temperature tau of both outputs in the trajectory loss (default "
                  + _rule_default("traj_temperature") + ", Du et al. 2022)."},
    )
    traj_start_epoch: Optional[int] = field(
        default=None,
        metadata={"help": "saf, mesa: the trajectory loss is on from this (0-based) epoch on, E_start (default "
                  + _rule_default("traj_start_epoch") + ", Du et al. 2022); 0: from the first step."},
    )
    saf_delay_epochs: Optional[int] = field(
        default=None,
        metadata={"help": "saf: the reference outputs of an example are the model's own from this many epochs "
                  "(visits of the example) ago, E-tilde >= 1 (default " + _rule_default("saf_delay_epochs")
                  + ", Du et al. 2022)."},
    )
    mesa_decay: Optional[float] = field(
        default=None,
        metadata={"help": "mesa: decay in [0, 1) of the EMA model that gives the reference outputs, updated "
                  "every optimizer step (default " + _rule_default("mesa_decay") + ", the authors' code)."},
    )
    at_clean_weight: Optional[float] = field(
        default=None,
        metadata={"help": "pgd-at/fgsm-at/sam-at: train on (1-w)*adversarial + w*clean loss (Goodfellow et al. "
                  "used 0.5); 0 is Madry's pure adversarial loss. Default: the task's ("
                  + _per_task(lambda d: f"{d.at_clean_weight:g}") + ")."},
    )


EVAL_PRECISIONS = ("fp32", "train")


@dataclass
class EvalArgs:
    eval_linf: Optional[list[str]] = field(
        default=None,
        metadata={"help": "L-inf PGD radii for robust accuracy, e.g. 1/255 2/255 4/255 8/255 (task "
                  "default); 'none' to skip."},
    )
    eval_l2: Optional[list[str]] = field(
        default=None, metadata={"help": "L2 PGD radii, e.g. 0.25 0.5 (task default); 'none' to skip."}
    )
    eval_steps: int = field(default=10, metadata={"help": "PGD steps for evaluation."})
    eval_attacks: list[str] = field(
        default_factory=lambda: ["pgd"],
        metadata={"help": "Attack suite(s) or attacks run besides the task's PGD: pgd (fast default, PGD only), "
                  "apgd (APGD-CE + APGD-DLR, any task), autoattack (standard AutoAttack via pyautoattack: "
                  "aa-apgd-ce aa-apgd-t aa-fab-t aa-square; pixel-space classifiers only), or attack names "
                  "(apgd-ce, apgd-dlr, apgd-cw, aa-...). An example is robust only if no attack fools it."},
    )
    eval_restarts: int = field(
        default=1, metadata={"help": "Random restarts per attack; each keeps its worst iterate per example."}
    )
    eval_apgd_steps: int = field(default=100, metadata={"help": "Iterations of the APGD attacks (AutoAttack: 100)."})
    eval_cascade: bool = field(
        default=True,
        metadata={"help": "Run each suite attack only on the examples still robust after the task's PGD and the "
                  "suite attacks before it (as AutoAttack's standard run does): the suite's worst case is the "
                  "same, at a fraction of the cost, and each suite attack's entry counts what is robust after "
                  "it and everything before it. false: every attack on every example (its standalone "
                  "number)."},
    )
    eval_diagnostics: Optional[bool] = field(
        default=None,
        metadata={"help": "Gradient-masking diagnostics on a subset (PGD vs APGD gap, huge radius, Square vs "
                  "white-box, twice the steps). Default: on for suites beyond pgd, off for pgd."},
    )
    eval_diagnostics_examples: int = field(
        default=100, metadata={"help": "Evaluation examples the gradient-masking diagnostics run on."}
    )
    sharpness_examples: Optional[int] = field(
        default=None,
        metadata={"help": "Measure weight-space sharpness on the first N evaluation examples (0 skips it). "
                  "Default: 256 on a GPU, the task's CPU default on CPU."},
    )
    sharpness_rho: list[str] = field(
        default_factory=lambda: ["0.05", "0.1"],
        metadata={"help": "Radii of the SAM-form sharpness probe (L2 ball over all weights)."},
    )
    sharpness_asam_rho: list[str] = field(
        default_factory=lambda: ["0.5", "1.0"],
        metadata={"help": "Radii of the adaptive (ASAM-form) sharpness probe, in units of |w| + 0.01."},
    )
    sharpness_steps: int = field(default=5, metadata={"help": "Projected ascent steps of the sharpness probe."})
    eval_precision: str = field(
        default="fp32",
        metadata={"help": "Precision of the evaluation (clean, attacks, sharpness): fp32 (default, whatever the "
                  "training precision: bf16/fp16 round the attacks' inputs and gradients, and AutoAttack and "
                  "RobustBench evaluate in fp32) or train (the run's --mixed_precision autocast). results.json "
                  "records it as eval_precision."},
    )
    attack_collapsed: bool = field(
        default=False,
        metadata={"help": "Attack a model that predicts a single class for every evaluation example (and run the "
                  "task's attacks and the sharpness probe on it). By default its evaluation stops after the clean "
                  "pass: no attack can flip a constant prediction, so its robust accuracy would only repeat the "
                  "clean one at the attacks' full cost; results.json and the summary say so."},
    )


def resolve_defaults(run: RunArgs, evals: EvalArgs, defaults: TaskDefaults,
                     on_gpu: bool) -> tuple[RunArgs, EvalArgs, list[str]]:
    """``run`` and ``evals`` with the fields left at ``None`` filled from ``defaults``, as new objects (the
    inputs are not changed), and notes for the log (which CPU subsets and schedule were chosen).
    ``max_*_samples`` at ``None``: all on a GPU, the CPU subset on CPU; ``epochs`` at ``None``: ``cpu_epochs``
    on CPU when the task sets it."""
    notes, filled = [], {}
    if run.epochs is None and not on_gpu and defaults.cpu_epochs is not None:
        filled["epochs"] = defaults.cpu_epochs
        notes.append(f"no GPU: --epochs defaults to {defaults.cpu_epochs:g} (a GPU trains {defaults.epochs:g})")
    for name in ("optimizer", "lr", "weight_decay", "lr_scheduler", "warmup_ratio", "epochs", "batch_size"):
        if getattr(run, name) is None and name not in filled:
            filled[name] = getattr(defaults, name)
    if run.eval_batch_size is None:
        filled["eval_batch_size"] = defaults.eval_batch_size or 2 * filled.get("batch_size", run.batch_size)
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(run, name) is None:
            cpu_default = getattr(defaults, f"cpu_{name}")
            filled[name] = 0 if on_gpu else cpu_default
            if not on_gpu and cpu_default:
                notes.append(f"no GPU: --{name} defaults to {cpu_default} (pass --{name} 0 for all)")
    sharpness = evals.sharpness_examples
    if sharpness is None:
        sharpness = 256 if on_gpu else defaults.cpu_sharpness_examples
    return replace(run, **filled), replace(evals, sharpness_examples=sharpness), notes


def parse_eps(text: str, *, pixel_space: bool, flag: str) -> float:
    """Parse a radius like ``"8/255"``, ``"0.03"`` or ``"1e-2"`` into a float.

    Raises ``UsageError`` for non-numbers, negatives, and, in pixel space, values over 1 (pixels live in
    ``[0, 1]``, so ``8`` almost surely meant ``8/255``).
    """
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{flag}: {text!r} is not a number (write e.g. 8/255 or 0.03)") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{flag}: {text!r} must be a finite number >= 0")
    if pixel_space and value > 1:
        raise UsageError(
            f"{flag}: {text!r} is larger than 1, but pixels live in [0, 1]; did you mean {text}/255?"
        )
    return value


def parse_eps_list(values: Optional[list[str]], default: tuple[str, ...], *, pixel_space: bool,
                   flag: str) -> list[tuple[str, float]]:
    """``[(label, value)]`` for an eps-list flag; ``['none']`` gives an empty list."""
    raw = list(default) if values is None else list(values)
    if [v.lower() for v in raw] == ["none"]:
        return []
    return [(v, parse_eps(v, pixel_space=pixel_space, flag=flag)) for v in raw]


def validate(run: RunArgs, method: MethodArgs, evals: EvalArgs) -> None:
    """Range checks that do not need the task. Raises ``UsageError``."""
    if evals.eval_precision not in EVAL_PRECISIONS:
        raise UsageError(f"--eval_precision: {evals.eval_precision!r} is not one of {', '.join(EVAL_PRECISIONS)}")
    check_choice("--optimizer", run.optimizer, OPTIMIZERS)
    check_choice("--lr_scheduler", run.lr_scheduler, SCHEDULERS)
    check_choice("--sam_sync", method.sam_sync, SAM_SYNC)
    check_choice("--train_norm", method.train_norm, NORMS)
    positive = {"--batch_size": run.batch_size, "--eval_batch_size": run.eval_batch_size,
                "--max_steps": run.max_steps, "--lr": run.lr, "--epochs": run.epochs,
                "--gradient_accumulation_steps": run.gradient_accumulation_steps,
                "--train_steps": method.train_steps, "--eval_steps": evals.eval_steps,
                "--sam_interval": method.sam_interval,
                "--sharpness_steps": evals.sharpness_steps, "--logging_steps": run.logging_steps,
                "--cpu_threads": run.cpu_threads}
    for flag, value in positive.items():
        if value is not None and not value > 0:
            raise UsageError(f"{flag}: {value!r} must be > 0")
    non_negative = {"--max_train_samples": run.max_train_samples, "--max_eval_samples": run.max_eval_samples,
                    "--checkpoint_every": run.checkpoint_every, "--max_grad_norm": run.max_grad_norm,
                    "--weight_decay": run.weight_decay, "--momentum": run.momentum,
                    "--trades_beta": method.trades_beta, "--asam_eta": method.asam_eta,
                    "--looksam_alpha": method.looksam_alpha,
                    "--at_clean_weight": method.at_clean_weight,
                    "--num_workers": run.num_workers, "--sharpness_examples": evals.sharpness_examples}
    for flag, value in non_negative.items():
        if value is not None and not value >= 0:
            raise UsageError(f"{flag}: {value!r} must be >= 0")
    if method.rho is not None and not 0 <= method.rho <= MAX_RHO:
        raise UsageError(f"--rho: {method.rho!r} must be in [0, {MAX_RHO:g}] (the paper uses 0.05-0.5)")
    for flag, values in (("--sharpness_rho", evals.sharpness_rho), ("--sharpness_asam_rho",
                                                                     evals.sharpness_asam_rho)):
        for value in values:
            parse_eps(value, pixel_space=False, flag=flag)
    if method.aesam_delta is not None and not 0 <= method.aesam_delta < 1:
        raise UsageError(f"--aesam_delta: {method.aesam_delta!r} must be in [0, 1)")
    c_start, c_end = method.aesam_c_start, method.aesam_c_end
    for flag, c, other in (("--aesam_c_start", c_start, c_end), ("--aesam_c_end", c_end, c_start)):
        if c is not None and (math.isnan(c) or (math.isinf(c) and c != other)):
            raise UsageError(f"{flag}: {c!r} must be a number (inf or -inf only with the same value for "
                             "--aesam_c_start and --aesam_c_end)")
    for flag, value in (("--esam_beta", method.esam_beta), ("--esam_gamma", method.esam_gamma)):
        if value is not None and not 0 < value <= 1:
            raise UsageError(f"{flag}: {value!r} must be in (0, 1]")
    if method.traj_lambda is not None and not method.traj_lambda >= 0:
        raise UsageError(f"--traj_lambda: {method.traj_lambda!r} must be >= 0")
    if method.traj_temperature is not None and not method.traj_temperature > 0:
        raise UsageError(f"--traj_temperature: {method.traj_temperature!r} must be > 0")
    if method.traj_start_epoch is not None and not method.traj_start_epoch >= 0:
        raise UsageError(f"--traj_start_epoch: {method.traj_start_epoch!r} must be >= 0")
    if method.saf_delay_epochs is not None and not method.saf_delay_epochs >= 1:
        raise UsageError(f"--saf_delay_epochs: {method.saf_delay_epochs!r} must be >= 1")
    if method.mesa_decay is not None and not 0 <= method.mesa_decay < 1:
        raise UsageError(f"--mesa_decay: {method.mesa_decay!r} must be in [0, 1)")
    if method.at_clean_weight is not None and not 0 <= method.at_clean_weight <= 1:
        raise UsageError(f"--at_clean_weight: {method.at_clean_weight!r} must be in [0, 1]")
    if run.warmup_ratio is not None and not 0 <= run.warmup_ratio < 1:
        raise UsageError(f"--warmup_ratio: {run.warmup_ratio!r} must be in [0, 1)")


def non_default_fields(obj) -> dict:
    """Fields of a dataclass instance that differ from their defaults (for 'flag not used' checks)."""
    out = {}
    for f in fields(obj):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if getattr(obj, f.name) != default:
            out[f.name] = getattr(obj, f.name)
    return out
