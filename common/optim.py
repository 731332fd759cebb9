"""SAM as a torch optimizer for the user's own training code: :class:`SAM` wraps any base optimizer.

It is a thin layer over the engine that ``scripts/run.py`` uses: :meth:`SAM.step` runs the registry's update
rule (``common/sam.py``'s ``sam_update``, or an efficient rule of ``common/efficient_sam.py``) with the user's
closure as the objective, and the two-step API (:meth:`SAM.first_step` / :meth:`SAM.second_step`) calls the
same perturbation (``common/sam.py``'s ``SAM.perturb``/``restore``), BatchNorm freeze and descent.

    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.05)

    def closure():                  # forward + backward, returns the loss; zeroes nothing
        loss = F.cross_entropy(model(x), y)
        opt.backward(loss)          # = loss.backward(), or scaler.scale(loss).backward() with a scaler
        return loss

    opt.step(closure)               # runs the closure at w, then at w + e; steps the base optimizer at w

What it handles, as samat's own loop does:

- **fp16**: pass ``scaler=torch.amp.GradScaler(...)``; the ascent divides out the loss scale, an overflow in
  the first gradient skips the step and backs the scale off, the descent goes through ``scaler.step``/``update``.
  bf16 autocast needs nothing (run the closure's forward under ``torch.autocast``).
- **BatchNorm**: the second pass (at ``w + e``) normalises with batch statistics but leaves the running
  statistics as the first pass set them (``frozen_batchnorm_stats``).
- **gradient accumulation**: the closure loops over the micro-batches and backpropagates ``loss_i / K``; SAM
  then ascends once along the gradient of all ``K`` micro-batches, as samat's loop does.
- **DDP**: pass the DDP-wrapped ``model``; ``sync="local"`` runs the first closure under ``model.no_sync()``
  (each replica climbs along its own gradient), ``"global"`` all-reduces it first.
- **checkpoints**: :meth:`state_dict` is the base optimizer's (momentum, Adam moments, the efficient rules'
  counters), so a resume continues where it stopped.

The davda54/pytorch_optimizer habit also works: if the parameters already hold a gradient when ``step(closure)``
is called (``loss.backward(); opt.step(closure)``), that gradient is taken as the first pass and the closure
runs only at ``w + e``. (DDP: that first backward then decides local/global itself.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .errors import UsageError
from .method_config import ResolvedMethod
from .registry import METHODS, UPDATE_RULES
from .sam import SAM as Perturbation
from .sam import frozen_batchnorm_stats
from .step import StepContext, StepResult, all_processes, descend, params_with_grad

# The update rules an optimizer can run on its own: those with a SAM ascent, on the clean objective (the
# closure is the objective; adversarial training needs inputs, see SAMTrainer and samat.step).
OPTIMIZER_METHODS = tuple(name for name, rule in UPDATE_RULES.items() if "rho" in rule.defaults)
SYNC_CHOICES = ("local", "global")


class _ClosureAccelerator:
    """The slice of ``accelerate.Accelerator`` that the update rules touch, for a plain PyTorch loop.

    ``backward`` does nothing: the user's closure has already backpropagated (with ``opt.backward`` or the
    scaler). ``no_sync`` is DDP's when the model has it.
    """

    def __init__(self, base: torch.optim.Optimizer, scaler: Any):
        self.base, self.scaler = base, scaler

    def backward(self, loss: Tensor) -> None:
        return None

    def no_sync(self, model: nn.Module):
        return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    @property
    def num_processes(self) -> int:
        """torch.distributed's world size when the user's loop initialised it, else 1."""
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def reduce(self, tensor: Tensor, reduction: str = "sum") -> Tensor:
        """All-reduce (``"sum"`` or ``"max"``) over the user's process group, as ``Accelerator.reduce``."""
        out = tensor.clone()
        if self.num_processes > 1:
            op = torch.distributed.ReduceOp.MAX if reduction == "max" else torch.distributed.ReduceOp.SUM
            torch.distributed.all_reduce(out, op=op)
        return out

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> Tensor:
        if self.scaler is not None:  # clip the true gradient; scaler.step then does not unscale twice
            self.scaler.unscale_(self.base)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


class _ScaledStep:
    """The base optimizer as the update rules see it: ``step`` goes through the GradScaler when there is one
    and reports ``step_was_skipped`` as ``AcceleratedOptimizer`` does."""

    def __init__(self, base: torch.optim.Optimizer, scaler: Any):
        self.optimizer, self.scaler, self.step_was_skipped = base, scaler, False

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
            self.step_was_skipped = False
            return
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_was_skipped = self.scaler.get_scale() < before

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


class _ClosureObjective:
    """The user's closure as an engine objective: every ``loss`` call runs it (forward + backward at the
    current weights). ``first_done``: the first pass's gradient is already in ``.grad``, so the first call
    only reports (no loss known: NaN)."""

    def __init__(self, closure: Callable[[], Any], first_done: bool):
        self.closure, self.first_done = closure, first_done

    def prepare(self, ctx: StepContext, batch: dict) -> None:
        return None

    def loss(self, ctx: StepContext, batch: dict, prepared: None) -> Tensor:
        if self.first_done:
            self.first_done = False
            return torch.tensor(float("nan"))
        with torch.enable_grad():
            value = self.closure()
        if value is None:
            return torch.tensor(float("nan"))
        return value if isinstance(value, Tensor) else torch.tensor(float(value))


def resolve_optimizer_method(method: str, rho: Optional[float], **flags: Any) -> ResolvedMethod:
    """The :class:`ResolvedMethod` of update rule ``method`` with the papers' defaults for what is not given.

    ``UsageError`` for an unknown method, an adversarial one, or a flag the method does not read."""
    if method not in OPTIMIZER_METHODS:
        hint = (" (adversarial training needs the inputs: use samat.SAMTrainer or samat.step)"
                if method in METHODS else "")
        raise UsageError(f"unknown optimizer method {method!r}{hint}; choose one of: {', '.join(OPTIMIZER_METHODS)}")
    rule = UPDATE_RULES[method]
    given = {k: v for k, v in flags.items() if v is not None}
    unused = sorted(set(given) - rule.flags - {"sam_sync"})
    if unused:
        raise UsageError(f"{unused[0]} does not apply to method {method!r} (it uses: "
                         f"{', '.join(sorted(rule.flags))})")
    resolved = ResolvedMethod(method=METHODS[method], rho=rule.defaults["rho"] if rho is None else float(rho))
    if "asam_eta" in given:
        resolved.eta = float(given.pop("asam_eta"))
    for name, value in given.items():
        setattr(resolved, name, value)
    if method == "esam" and resolved.esam_gamma < 1:
        raise UsageError("method 'esam' in samat.SAM needs esam_gamma=1 (stochastic weight perturbation only): the "
                         "closure gives one loss for the batch, and the data selection ranks each example's loss; "
                         "for the whole of ESAM use samat.step or scripts/run.py")
    return resolved


class SAM(torch.optim.Optimizer):
    """SAM, ASAM or an efficient SAM around any torch optimizer (see the module docstring for the usage).

    Args:
        base_optimizer: a ``torch.optim.Optimizer`` built on the model's parameters (its learning rate, momentum,
            weight decay, schedulers apply as usual; its state is this optimizer's state).
        model: the model being trained (DDP-wrapped or not): its BatchNorm layers are frozen on the second pass,
            its ``no_sync`` makes the first pass local under DDP.
        method: ``sam``, ``asam``, ``sam-every-k``, ``looksam``, ``ae-sam`` or ``esam`` (with ``esam_gamma=1``:
            the closure gives one loss for the batch, not the per-example losses ESAM's data selection ranks).
        rho: the radius (default: the paper's, 0.05 for SAM, 0.5 for ASAM).
        scaler: a ``torch.amp.GradScaler`` for fp16 (the closure must backpropagate the scaled loss:
            :meth:`backward` does).
        sync: ``local`` (each DDP replica climbs along its own gradient, as the original SAM) or ``global``.
        max_grad_norm: clip the descent gradient to this L2 norm (0: no clipping).
        total_steps: the run's optimizer steps (AE-SAM's threshold schedule; 0: the schedule's mean).
        **flags: the method's own hyper-parameters: ``asam_eta``, ``sam_interval``, ``looksam_alpha``,
            ``aesam_delta``, ``aesam_c_start``, ``aesam_c_end``, ``esam_beta``, ``esam_gamma``.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, method: str = "sam",
                 rho: Optional[float] = None, *, scaler: Any = None, sync: str = "local",
                 max_grad_norm: float = 0.0, total_steps: int = 0, **flags: Any):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer instance (e.g. "
                            f"torch.optim.SGD(model.parameters(), lr=0.1)), got {type(base_optimizer).__name__}")
        if isinstance(base_optimizer, SAM):
            raise TypeError("base_optimizer is already a samat.SAM; wrap the plain optimizer once")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be the torch.nn.Module being trained, got {type(model).__name__}")
        if sync not in SYNC_CHOICES:
            raise UsageError(f"unknown sync {sync!r}; choose one of: {', '.join(SYNC_CHOICES)}")
        self.method = resolve_optimizer_method(method, rho, **flags)
        self.method.sam_sync = sync
        if self.method.rho < 0:
            raise UsageError(f"rho must be >= 0, got {self.method.rho}")
        self.base_optimizer, self.model, self.scaler = base_optimizer, model, scaler
        self.max_grad_norm, self.total_steps = max_grad_norm, total_steps
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self._alias_base()
        self._perturbation: Optional[Perturbation] = None
        self._bn_freeze: Optional[contextlib.ExitStack] = None
        self._moved = False
        self.last_result: Optional[StepResult] = None

    def _alias_base(self) -> None:
        """Share the base optimizer's groups and state (not copies): schedulers, ``state_dict`` and
        ``load_state_dict`` see one optimizer."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults

    def _context(self) -> StepContext:
        return StepContext(accelerator=_ClosureAccelerator(self.base_optimizer, self.scaler), model=self.model,
                           optimizer=_ScaledStep(self.base_optimizer, self.scaler), task=None,
                           method=self.method, max_grad_norm=self.max_grad_norm, total_steps=self.total_steps)

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, through the GradScaler when there is one (use it inside the closure)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[float]:  # type: ignore[override]
        """One SAM step: the closure's gradient at ``w`` (or the one already in ``.grad``) sets ``e``, the
        closure's gradient at ``w + e`` steps the base optimizer at ``w``. Returns the loss at ``w`` (None when
        the first gradient was computed outside). ``self.last_result.skipped``: an fp16 overflow skipped it."""
        if closure is None:
            raise RuntimeError(
                "samat.SAM.step() needs a closure: SAM evaluates the loss twice per step (at w and at w + e). "
                "Call opt.step(closure) with a closure that runs forward + backward and returns the loss, or "
                "use opt.first_step() / opt.second_step(). In a transformers Trainer use samat.SAMTrainer; "
                "in an Accelerate loop, samat.step(...)")
        from .methods import UPDATES  # the registry of update rules (imports the attacks: only when stepping)

        first_done = bool(params_with_grad(self.base_optimizer))
        objective = _ClosureObjective(closure, first_done)
        self.last_result = UPDATES[self.method.method.update](self._context(), objective, [{}])
        return None if first_done else self.last_result.loss

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> bool:
        """Move to ``w + e`` along the gradient in ``.grad`` and freeze the BatchNorm running statistics until
        :meth:`second_step`. Returns False on an fp16 overflow (nothing moved; the scale backs off; still call
        :meth:`second_step`, which then skips the update). Plain SAM/ASAM only."""
        if self.method.method.update not in ("sam", "asam"):
            raise UsageError(f"first_step/second_step run sam or asam; method {self.method.method.name!r} decides "
                             "per step which passes to run: use step(closure)")
        if self._perturbation is not None:
            raise RuntimeError("first_step called twice without second_step")
        m = self.method
        self._perturbation = Perturbation(self.base_optimizer, rho=m.rho, adaptive=m.method.update == "asam",
                                          eta=m.eta)
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        accelerator = self._context().accelerator
        moved = self._perturbation.perturb(grad_scale=scale, check_finite=self.scaler is not None,
                                           agree=lambda finite: all_processes(accelerator, finite))
        self._moved = moved
        if not moved:
            self.scaler.update(scale * self.scaler.get_backoff_factor())
        else:
            self._bn_freeze = contextlib.ExitStack()
            self._bn_freeze.enter_context(frozen_batchnorm_stats(self.model))
        if zero_grad or not moved:
            self.base_optimizer.zero_grad(set_to_none=True)
        return moved

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> bool:
        """Back to ``w`` exactly and step the base optimizer with the gradient in ``.grad`` (taken at
        ``w + e``); the gradient is then cleared whatever ``zero_grad`` (kept for davda54's signature) says.
        Returns True if the step was skipped (fp16 overflow)."""
        if self._perturbation is None:
            raise RuntimeError("second_step called before first_step")
        moved = self._moved
        self._perturbation.restore()
        self._perturbation = None
        if self._bn_freeze is not None:
            self._bn_freeze.close()
            self._bn_freeze = None
        if not moved:
            self.base_optimizer.zero_grad(set_to_none=True)
            self.last_result = StepResult(loss=float("nan"), skipped=True)
            return True
        skipped = descend(self._context())  # clip, step (through the scaler), clear the spent gradient
        self.last_result = StepResult(loss=float("nan"), skipped=skipped)
        return skipped

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The base optimizer's ``state_dict`` (momentum, moments and the efficient rules' counters)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._alias_base()  # load_state_dict replaced the base's state object

    def __repr__(self) -> str:
        return f"samat.SAM({self.method.describe()}, base={self.base_optimizer!r})"
