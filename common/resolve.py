"""Resolve once: the parsed flags of one run, checked and completed into one frozen :class:`ResolvedRun`.

``scripts/run.py`` parses the flags into the typed ``RunArgs``/``MethodArgs``/``EvalArgs`` and the task's
args; :func:`resolve_run` checks all of them against the task (before the output folder is touched), fills
what the user left open from the task's recipe, and returns one frozen record: the completed run and
evaluation flags, the method with every hyper-parameter decided, the evaluation attacks and the attack suite.
Nothing changes it afterwards; ``results.json``'s ``config`` is written from it (:meth:`ResolvedRun.config`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

from .checkpoint import check_output_dir
from .errors import UsageError
from .config import EvalArgs, MethodArgs, RunArgs, non_default_fields, parse_eps_list, resolve_defaults, validate
from .method_config import ResolvedMethod, resolve_method
from .model_io import check_push_to_hub
from .registry import METHODS, UPDATE_RULES
from .suites import Suite, resolve_suite
from .task import AttackSpec, Task


def attack_specs(task: Task, evals: EvalArgs) -> list[AttackSpec]:
    """PGD-L-inf and PGD-L2 on the task loss at the requested radii, plus the task's own attacks."""
    objective = lambda logits, batch, step, steps: task.loss(logits, batch)  # noqa: E731
    specs = []
    for norm, values, default in (("linf", evals.eval_linf, task.default_eval_linf),
                                  ("l2", evals.eval_l2, task.default_eval_l2)):
        eps = parse_eps_list(values, default, pixel_space=task.pixel_space and norm == "linf",
                             flag=f"--eval_{norm}")
        if eps:
            specs.append(AttackSpec(f"pgd-{norm}", norm, eps, objective))
    return specs + task.extra_attacks(evals)


@dataclass(frozen=True)
class Engine:
    """The sharded engine the launch asked for (``accelerate launch --use_fsdp/--use_deepspeed``, read from the
    environment Accelerate's launcher sets): ``"fsdp"``, ``"deepspeed"`` or ``None`` (DDP or one process), and
    the FSDP version. Accelerate 1.x engages neither on CPU, where such a launch trains as DDP (the run records
    what was engaged beside what was asked)."""

    sharded: Optional[str] = None
    fsdp_version: Optional[int] = None

    @classmethod
    def from_environment(cls) -> "Engine":
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            return cls("deepspeed")
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            return cls("fsdp", int(os.environ.get("FSDP_VERSION", "1")))
        return cls()

    def check(self, method: Any) -> None:
        """Refuse what cannot be correct under this engine (``UsageError``, before anything is written)."""
        sam_family = "rho" in method.flags
        if self.sharded == "deepspeed" and sam_family:
            # DeepSpeed's engine steps the optimizer inside backward() when gradients sync: SAM's ascent pass
            # would already update the weights, and its norm would see only a partition of the gradient.
            raise UsageError(f"--method {method.name} is not supported under DeepSpeed (its engine steps the "
                             "optimizer inside the ascent pass); shard with FSDP instead: accelerate launch "
                             "--use_fsdp --fsdp_version 2 ...")
        if self.sharded == "fsdp" and sam_family and self.fsdp_version != 2:
            # FSDP1's flat parameters hold one shard of the gradient per rank outside DTensor: a norm over them
            # is one shard's norm, not the full gradient's.
            raise UsageError(f"--method {method.name} under FSDP version {self.fsdp_version}: SAM's gradient norm "
                             "needs FSDP2's sharded tensors; launch with --fsdp_version 2")
        if self.sharded == "fsdp" and UPDATE_RULES[method.update].efficient:
            # Their update is exact on FSDP2 shards (tests/test_engines.py, looksam), but they keep their state
            # (LookSAM's direction, the schedules' counters, SAF's outputs) outside the per-parameter optimizer
            # state that FSDP2's sharded checkpoint saves: the run's checkpoint would fail after training.
            exact = [m.name for m in METHODS.values() if "rho" in m.flags and not UPDATE_RULES[m.update].efficient]
            raise UsageError(f"--method {method.name} is not supported under FSDP (its efficient-SAM state is not "
                             f"in FSDP2's sharded checkpoint); use one of {', '.join(exact)} (or a method without SAM)")


@dataclass(frozen=True)
class ResolvedRun:
    """One run with every flag decided.

    Attributes:
        run: the run flags, every default filled (subsets, schedule, batch sizes, output folder).
        method_args: the method flags as the user gave them (``method`` holds what they resolve to).
        method: the method with every hyper-parameter decided (floats).
        evals: the evaluation flags, every default filled.
        task_args: the task's own flags (its dataclass).
        specs: the evaluation attacks (PGD per norm at the resolved radii, plus the task's own).
        suite: the attack suite run besides them (``--eval_attacks``).
        notes: what the defaults chose, for the log.
        engine: the sharded engine the launch asked for.
    """

    run: RunArgs
    method_args: MethodArgs
    method: ResolvedMethod
    evals: EvalArgs
    task_args: Any
    specs: tuple[AttackSpec, ...]
    suite: Suite
    notes: tuple[str, ...]
    engine: Engine = Engine()

    def config(self) -> dict:
        """The ``config`` block of results.json: every flag group as resolved (method flags as given)."""
        return {"run": asdict(self.run), "method": asdict(self.method_args), "eval": asdict(self.evals),
                "task": asdict(self.task_args)}


def resolve_run(run: RunArgs, method_args: MethodArgs, evals: EvalArgs, task: Task, on_gpu: bool,
                engine: Engine = Engine()) -> ResolvedRun:
    """Every check of what the user asked for, then the task's recipe fills what the user left open.

    Raises ``UsageError`` (one line) for the first bad flag; reads the output folder but writes nothing.
    ``on_gpu``: the run trains on an accelerator (then the CPU subsets and schedule do not apply). ``engine``:
    the sharded engine asked for (:meth:`Engine.from_environment`), which some methods and flags refuse."""
    validate(run, method_args, evals)
    task.check_args()
    method = resolve_method(run.method, method_args, task, set(non_default_fields(method_args)),
                            sharded=engine.sharded == "fsdp")
    engine.check(method.method)
    specs = attack_specs(task, evals)
    suite = resolve_suite(task, evals)  # --eval_attacks and its budget flags, checked before any work
    if run.output_dir is None:
        run = replace(run, output_dir=f"runs/{run.task}-{run.method}-s{run.seed}")
    check_output_dir(Path(run.output_dir), task.name)
    check_push_to_hub(run)  # offline: refused now, not after training
    run, evals, notes = resolve_defaults(run, evals, task.defaults, on_gpu=on_gpu)
    return ResolvedRun(run=run, method_args=method_args, method=method, evals=evals, task_args=task.args,
                       specs=tuple(specs), suite=suite, notes=tuple(notes), engine=engine)
