"""A training method with every hyper-parameter decided: :class:`ResolvedMethod`, and :func:`resolve_method`,
which fills it from the method flags (``MethodArgs``) and the task's defaults.

Torch-free apart from the task it reads (its defaults and whether eps is in pixel units); the step machinery
(``common/step.py``) and the update rules read a :class:`ResolvedMethod` through ``StepContext.method``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import MethodArgs, parse_eps
from .errors import UsageError, lookup
from .registry import METHODS, UPDATE_RULES, Method
from .task import Task

# The efficient SAM rules' own flags with one default each (a field default of ResolvedMethod, from the registry).
SCHEDULE_FIELDS = ("sam_interval", "looksam_alpha", "aesam_delta", "aesam_c_start", "aesam_c_end", "esam_beta",
                   "esam_gamma")
# The trajectory-loss flags of SAF and MESA: defaults per rule (UPDATE_RULES[...].defaults).
TRAJECTORY_FIELDS = ("traj_lambda", "traj_temperature", "traj_start_epoch", "saf_delay_epochs", "mesa_decay")

# The papers' hyper-parameters, from the method registry (common/registry.py).
DEFAULT_RHO = {name: rule.defaults["rho"] for name, rule in UPDATE_RULES.items() if "rho" in rule.defaults}


@dataclass
class ResolvedMethod:
    """A method with every hyper-parameter decided (floats, not strings)."""

    method: Method
    rho: float = 0.0
    eta: float = 0.01
    sam_sync: str = "local"
    eps: float = 0.0
    alpha: float = 0.0
    steps: int = 0
    norm: str = "linf"
    trades_beta: float = 6.0
    clean_weight: float = 0.0
    sam_interval: int = UPDATE_RULES["looksam"].defaults["sam_interval"]
    looksam_alpha: float = UPDATE_RULES["looksam"].defaults["looksam_alpha"]
    aesam_delta: float = UPDATE_RULES["ae-sam"].defaults["aesam_delta"]
    aesam_c_start: float = UPDATE_RULES["ae-sam"].defaults["aesam_c_start"]
    aesam_c_end: float = UPDATE_RULES["ae-sam"].defaults["aesam_c_end"]
    esam_beta: float = UPDATE_RULES["esam"].defaults["esam_beta"]
    esam_gamma: float = UPDATE_RULES["esam"].defaults["esam_gamma"]
    # SAF / MESA (common/saf.py); the rule's own defaults are filled by resolve_method (lambda differs)
    traj_lambda: float = 0.0
    traj_temperature: float = UPDATE_RULES["saf"].defaults["traj_temperature"]
    traj_start_epoch: int = UPDATE_RULES["saf"].defaults["traj_start_epoch"]
    saf_delay_epochs: int = UPDATE_RULES["saf"].defaults["saf_delay_epochs"]
    mesa_decay: float = UPDATE_RULES["mesa"].defaults["mesa_decay"]

    def describe(self) -> dict:
        """Only the hyper-parameters the method uses (for results.json and tables)."""
        out: dict[str, Any] = {"method": self.method.name}
        flags = self.method.flags
        if "rho" in flags:
            out["rho"] = self.rho
        if "sam_sync" in flags:
            out["sam_sync"] = self.sam_sync
        if self.method.update == "asam":
            out["asam_eta"] = self.eta
        for name in (*SCHEDULE_FIELDS, *TRAJECTORY_FIELDS):
            if name in flags:
                out[name] = getattr(self, name)
        if self.method.objective != "clean":
            out.update(eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm)
        if self.method.objective == "trades":
            out["trades_beta"] = self.trades_beta
        elif self.method.objective != "clean":
            out["at_clean_weight"] = self.clean_weight
        return out


def resolve_method(name: str, args: MethodArgs, task: Task, explicit: set[str],
                   sharded: bool = False) -> ResolvedMethod:
    """Check the flags against the method and fill the task's defaults.

    ``explicit`` is the set of MethodArgs fields the user set; a flag the method does not read is an error
    rather than silently ignored. ``sharded``: the model is sharded (FSDP), where SAM's ascent must use the
    reduce-scattered gradient: ``--sam_sync`` defaults to ``global`` and ``local`` is refused.
    """
    method = lookup(METHODS, "method", name)
    unused = sorted(explicit - method.flags)
    if unused:
        raise UsageError(f"--{unused[0]} does not apply to --method {name} (it uses: "
                         f"{', '.join('--' + f for f in sorted(method.flags)) or 'no method flags'})")
    defaults = task.defaults
    norm = args.train_norm or defaults.train_norm
    if sharded and args.sam_sync == "local" and "sam_sync" in method.flags:
        # FSDP2 keeps an un-synced gradient unsharded and out of .grad: the ascent would move nothing
        raise UsageError("--sam_sync local: under FSDP each rank holds only its shard of the gradient, so the "
                         "per-replica ascent is not available; use --sam_sync global (the default under FSDP)")
    sam_sync = args.sam_sync or ("global" if sharded else "local")
    resolved = ResolvedMethod(method=method, sam_sync=sam_sync, eta=args.asam_eta,
                              trades_beta=args.trades_beta, norm=norm)
    if "rho" in method.flags:
        resolved.rho = DEFAULT_RHO[method.update] if args.rho is None else args.rho
    for field_name in SCHEDULE_FIELDS:
        if getattr(args, field_name) is not None:  # else the paper's default, a field default of ResolvedMethod
            setattr(resolved, field_name, getattr(args, field_name))
    rule = UPDATE_RULES[method.update]
    if rule.needs_index and not task.recipe.pipeline_tag.endswith("classification"):
        # one stored output distribution per example: per-pixel outputs (segmentation) would be H*W times that
        raise UsageError(f"--method {name}: stores one output distribution per training example, which needs a "
                         f"classification task; the {task.name} task has per-position outputs (use mesa)")
    if "esam_gamma" in method.flags and resolved.esam_gamma < 1 and type(task).example_losses is Task.example_losses:
        raise UsageError(f"--method {method.name}: the {task.name} task gives no per-example loss, which ESAM's data "
                         "selection ranks examples by; use --esam_gamma 1 (stochastic weight perturbation only)")
    for field_name in TRAJECTORY_FIELDS:
        if field_name in rule.defaults:
            value = getattr(args, field_name)
            setattr(resolved, field_name, rule.defaults[field_name] if value is None else value)
    if "at_clean_weight" in method.flags:
        resolved.clean_weight = (defaults.at_clean_weight if args.at_clean_weight is None
                                 else args.at_clean_weight)
    if method.objective != "clean":
        eps_text = args.train_eps or defaults.train_eps(norm)
        resolved.eps = parse_eps(eps_text, pixel_space=task.pixel_space and norm == "linf", flag="--train_eps")
        resolved.steps = 1 if method.objective == "fgsm" else (args.train_steps or defaults.train_steps)
        if args.train_alpha:
            resolved.alpha = parse_eps(args.train_alpha, pixel_space=task.pixel_space and norm == "linf",
                                       flag="--train_alpha")
        elif method.objective == "fgsm":
            resolved.alpha = 1.25 * resolved.eps  # Wong et al. 2020
        else:
            # Madry's 2/255 steps for an 8/255 ball: alpha = eps/4 unless the task says otherwise.
            resolved.alpha = defaults.train_alpha_ratio * resolved.eps
    return resolved
