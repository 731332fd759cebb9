"""SAF and MESA (Du et al. 2022, "Sharpness-Aware Training for Free", NeurIPS, arXiv 2205.14083): sharpness
awareness without SAM's second pass, from a *trajectory loss* added to the training objective,

    L(w) + lambda * tau^2 * mean_i KL( softmax(r_i / tau) || softmax(f_w(x_i) / tau) ),

where ``r_i`` are reference outputs of example ``i`` that the weights have moved away from: a sudden drop of the
loss along the trajectory (a sharp valley) makes the current outputs leave the reference fast, which the KL
penalises.

    saf   ``r_i``: the model's own logits for example ``i`` from ``E`` epochs ago (``--saf_delay_epochs``), kept
          per example in a ring of ``E + 1`` slots, written by the training forward itself. Passes per step:
          1 forward, 1 backward (ERM's); memory: ``N x (E + 1) x C`` float32 logits.
    mesa  ``r_i``: the outputs of an EMA of the weights (decay ``--mesa_decay``, updated after every optimizer
          step), one extra no-grad forward per step while the loss is on. Passes: 2 forwards, 1 backward;
          memory: one copy of the parameters and floating buffers.

Both follow the authors' code (AngusDujw/SAF, ``SAF_train.py``/``MESA_train.py``): the KL is summed over classes,
averaged over examples and scaled by ``tau^2``; the loss is on from epoch ``E_start`` (``--traj_start_epoch``;
the authors' ``epoch > kl_start_epoch`` starts one epoch later: here 0 means from the first step); the EMA model
runs in eval mode (timm's ``ModelEmaV2`` keeps its copy in eval mode) and averages BatchNorm's running stats too.

Where samat differs, and why:
- SAF counts *visits of each example* rather than the run's epochs: the reference of an example is its output
  ``E`` visits ago, and the loss is on for an example from its ``E_start``-th visit. With the usual loader (each
  example once per epoch) this is the authors' rule; it also holds under ``--max_steps`` mid-epoch and resume.
- The outputs are those of the forward the objective trains on: clean for ``saf``/``mesa``, adversarial for the
  ``-at`` forms (the adversarial half of a doubled clean+adversarial batch); MESA's EMA model sees the same input.
- MESA skips its EMA forward before ``E_start`` (its output is unused there); the EMA itself is updated from step 0.

State lives in the base optimizer's ``state`` (``common/efficient_sam.update_state``), so checkpoints hold it and
``--resume`` continues bit-identically. SAF needs each example's dataset index in the batch (key
:data:`INDEX_KEY`, added by ``common/experiment.py`` through :class:`IndexedDataset`); it refuses, in one line, a batch
without one, and multi-process runs (each process would only see the outputs of the examples it drew).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import eval_mode
from .efficient_sam import update_state
from .errors import UsageError
from .step import Objective, StepContext, StepResult, UpdateRule, descend, sync_context

INDEX_KEY = "sample_index"


# ------------------------------------------------------------------------------------------- data: indices


class IndexedDataset(torch.utils.data.Dataset):
    """``dataset`` whose items carry their position: item ``i`` is ``(i, dataset[i])``, made into a batch by
    :func:`indexed_collate` (SAF's per-example memory is keyed by it)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return int(index), self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[int, Any]]:
        # DataLoader fetches through __getitems__ when the dataset has one: it must carry the positions too
        return [self[i] for i in indices]

    def __getattr__(self, name: str) -> Any:  # set_epoch, labels, ... of the wrapped dataset
        if name == "dataset" or name.startswith("__"):  # unpickling; dunders (__getitems__) are our own
            raise AttributeError(name)
        return getattr(self.dataset, name)


def indexed_collate(collate: Callable[[list], dict]) -> Callable[[list], dict]:
    """The task's ``collate`` on the items, plus ``batch[INDEX_KEY]``: ``(B,)`` int64 dataset positions (last key,
    so code reading the batch's first tensor still reads the task's)."""

    def collate_with_index(items: list) -> dict:
        batch = dict(collate([item for _, item in items]))
        batch[INDEX_KEY] = torch.tensor([i for i, _ in items], dtype=torch.long)
        return batch

    return collate_with_index


# ------------------------------------------------------------------------------------------- the loss


def trajectory_kl(logits: Tensor, reference: Tensor, temperature: float, mask: Optional[Tensor] = None) -> Tensor:
    """``tau^2 * mean KL(softmax(reference/tau) || softmax(logits/tau))``, class dim 1, summed over classes and
    averaged over examples (and positions, where ``mask`` (logits' shape without the class dim) says which
    count). ``reference`` carries no gradient. 0 exactly when ``logits == reference``."""
    log_q = F.log_softmax(logits.float() / temperature, dim=1)
    log_p = F.log_softmax(reference.detach().float() / temperature, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    kl = kl.mean() if mask is None else (kl * mask).sum() / mask.sum().clamp_min(1)
    return kl * temperature ** 2


class _Capture:
    """Records what a module's forward calls got and gave while active (the objective's training forward)."""

    def __init__(self, module: nn.Module):
        self.calls: list[tuple[tuple, dict, Tensor]] = []
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
        if isinstance(logits, Tensor):
            self.calls.append((args, kwargs, logits))

    def close(self) -> None:
        self._handle.remove()


def _trained_logits(calls: list, rows: int) -> tuple[tuple, dict, Tensor]:
    """The last forward of the objective's loss, narrowed to the trained-on outputs: of a doubled
    clean+adversarial batch (``2 * rows``), the adversarial second half; its inputs likewise."""
    if not calls:
        raise UsageError("saf/mesa: the objective's loss made no forward call with logits to regularise")
    args, kwargs, logits = calls[-1]
    if logits.shape[0] == 2 * rows:
        def half(v: Any) -> Any:
            return v.chunk(2)[1] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == 2 * rows else v
        return tuple(half(a) for a in args), {k: half(v) for k, v in kwargs.items()}, logits.chunk(2)[1]
    return args, kwargs, logits


def _rows(batch: dict) -> int:
    return int(next(v for v in batch.values() if isinstance(v, Tensor)).shape[0])


def _epoch(ctx: StepContext, state: dict) -> int:
    """The run's epoch of this step (MESA's ``E_start`` gate); 0 when the context has no epoch length."""
    steps_per_epoch = getattr(ctx, "steps_per_epoch", 0)
    return state["step"] // steps_per_epoch if steps_per_epoch else 0


def _trajectory_update(ctx: StepContext, objective: Objective, micro_batches: list[dict],
                       reference: Callable[[dict, tuple, dict, Tensor], Optional[Tensor]],
                       after_step: Callable[[], None]) -> StepResult:
    """One pass per micro-batch: objective loss + lambda * trajectory KL to ``reference(batch, args, kwargs,
    logits)`` (``None``: no term for this micro-batch), summed over micro-batches / K; then the base step."""
    m, k = ctx.method, len(micro_batches)
    state = update_state(ctx.optimizer)
    prepared = [objective.prepare(ctx, b) for b in micro_batches]
    total = None
    for i, (batch, prep) in enumerate(zip(micro_batches, prepared)):
        with sync_context(ctx, i == k - 1):
            capture = _Capture(ctx.unwrapped)
            try:
                loss = objective.loss(ctx, batch, prep)
            finally:
                capture.close()
            args, kwargs, logits = _trained_logits(capture.calls, _rows(batch))
            ref = reference(batch, args, kwargs, logits)
            if ref is not None and m.traj_lambda > 0:
                loss = loss + m.traj_lambda * trajectory_kl(logits, ref, m.traj_temperature,
                                                            ctx.task.loss_mask(batch))
            loss = loss / k
            ctx.accelerator.backward(loss)
        # a 0-dim tensor on the device, as StepResult's contract: no host sync here (the loop reads it when it logs)
        total = loss.detach().float() if total is None else total + loss.detach().float()
    skipped = descend(ctx)
    after_step()
    state["step"] += 1
    return StepResult(loss=total, skipped=skipped)


# ------------------------------------------------------------------------------------------- SAF


def _saf_memory(state: dict, n: int, classes: int, slots: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The ring of past logits ``(N, slots, C)`` float32 and the visit counts ``(N,)`` int64, grown to ``n``
    examples (zeros / 0 visits for the new ones) and on ``device`` (a resumed checkpoint's are on the CPU)."""
    logits, visits = state.get("saf_logits"), state.get("saf_visits")
    if logits is None:
        logits = torch.zeros(0, slots, classes, device=device)
        visits = torch.zeros(0, dtype=torch.long, device=device)
    if tuple(logits.shape[1:]) != (slots, classes):
        raise UsageError(f"saf: the stored outputs have shape {tuple(logits.shape[1:])} per example, this run "
                         f"gives ({slots}, {classes}): --saf_delay_epochs or the classes changed on resume")
    logits, visits = logits.to(device), visits.to(device)
    if n > logits.shape[0]:
        logits = torch.cat([logits, logits.new_zeros(n - logits.shape[0], slots, classes)])
        visits = torch.cat([visits, visits.new_zeros(n - visits.shape[0])])
    state["saf_logits"], state["saf_visits"] = logits, visits
    return logits, visits


def saf_update(ctx: StepContext, objective: Objective, micro_batches: list[dict]) -> StepResult:
    """SAF: the trajectory KL to each example's own logits from ``E`` visits ago; this visit's logits stored."""
    m = ctx.method
    if getattr(ctx.accelerator, "num_processes", 1) > 1:
        raise UsageError("saf: single process only (each process would keep the outputs of only the examples "
                         "it drew, from other epochs); use mesa on several processes")
    state = update_state(ctx.optimizer)
    slots = m.saf_delay_epochs + 1

    def reference(batch: dict, args: tuple, kwargs: dict, logits: Tensor) -> Optional[Tensor]:
        index = batch.get(INDEX_KEY)
        if not isinstance(index, Tensor):
            raise UsageError(f"saf: the batch has no {INDEX_KEY!r} (each example's dataset index), which SAF keys "
                             "its stored outputs by; samat's training loop adds it, a custom loop must too")
        if logits.dim() != 2:
            raise UsageError(f"saf: needs one output vector per example, (batch, classes); got logits of shape "
                             f"{tuple(logits.shape)}")
        index = index.to(logits.device)
        past, visits = _saf_memory(state, int(index.max()) + 1, logits.shape[1], slots, logits.device)
        v = visits[index]  # this visit's number, 0-based, per example
        ref_slot = (v - m.saf_delay_epochs) % slots
        reference_logits = past[index, ref_slot]
        on = (v >= m.saf_delay_epochs) & (v >= m.traj_start_epoch)  # a reference exists and E_start is reached
        past[index, v % slots] = logits.detach().float()
        visits[index] = v + 1
        if not bool(on.any()):
            return None
        # Examples without a reference yet get their own logits: a KL of exactly 0 and no gradient.
        return torch.where(on[:, None], reference_logits, logits.detach().float())

    return _trajectory_update(ctx, objective, micro_batches, reference, after_step=lambda: None)


# ------------------------------------------------------------------------------------------- MESA


def _ema_tensors(ctx: StepContext, state: dict) -> dict[str, Tensor]:
    """The EMA model's parameters and floating buffers by name (created as a copy of the current ones), on the
    model's device."""
    model = ctx.unwrapped
    current = dict(model.named_parameters())
    current.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    ema = state.get("mesa_ema")
    if ema is None or set(ema) != set(current):
        ema = {n: t.detach().clone() for n, t in current.items()}
    elif any(ema[n].device != t.device for n, t in current.items()):  # resumed: on the CPU
        ema = {n: ema[n].to(t.device) for n, t in current.items()}
    state["mesa_ema"] = ema
    return ema


@torch.no_grad()
def _ema_update(ctx: StepContext, ema: dict[str, Tensor], decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * current`` for every parameter and floating buffer (timm's
    ``ModelEmaV2`` rule, which averages BatchNorm's running stats too)."""
    model = ctx.unwrapped
    current = dict(model.named_parameters())
    current.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    names = list(ema)
    targets = [ema[n] for n in names]
    torch._foreach_lerp_(targets, [current[n].detach().to(ema[n].dtype) for n in names], 1.0 - decay)


def mesa_update(ctx: StepContext, objective: Objective, micro_batches: list[dict]) -> StepResult:
    """MESA: the trajectory KL to the EMA model's outputs on the same input (one no-grad forward)."""
    m = ctx.method
    state = update_state(ctx.optimizer)
    ema = _ema_tensors(ctx, state)
    if m.traj_start_epoch > 0 and not getattr(ctx, "steps_per_epoch", 0):
        raise UsageError("mesa: --traj_start_epoch > 0 needs the run's epoch length (StepContext.steps_per_epoch, "
                         "set by samat's loop); set it, or use --traj_start_epoch 0")
    on = _epoch(ctx, state) >= m.traj_start_epoch

    def reference(batch: dict, args: tuple, kwargs: dict, logits: Tensor) -> Optional[Tensor]:
        if not on:
            return None
        model = ctx.unwrapped
        with torch.no_grad(), eval_mode(model):
            detached_args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            detached_kwargs = {n: v.detach() if isinstance(v, Tensor) else v for n, v in kwargs.items()}
            out = torch.func.functional_call(model, ema, detached_args, detached_kwargs)
        return out if isinstance(out, Tensor) else out.logits

    return _trajectory_update(ctx, objective, micro_batches, reference,
                              after_step=lambda: _ema_update(ctx, ema, m.mesa_decay))


# ------------------------------------------------------------------------------------------- records


def extra_memory(optimizer: Any, method_update: str) -> dict:
    """What SAF/MESA hold beyond ERM (for results.json): SAF's stored logits (shape, bytes), MESA's EMA copy
    (values, bytes); ``{}`` for other rules."""
    state = update_state(optimizer)
    if method_update == "saf" and "saf_logits" in state:
        logits, visits = state["saf_logits"], state["saf_visits"]
        return {"stored_outputs_shape": list(logits.shape),
                "stored_bytes": logits.numel() * logits.element_size() + visits.numel() * visits.element_size()}
    if method_update == "mesa" and "mesa_ema" in state:
        tensors = list(state["mesa_ema"].values())
        return {"ema_values": sum(t.numel() for t in tensors),
                "stored_bytes": sum(t.numel() * t.element_size() for t in tensors)}
    return {}


TRAJECTORY_UPDATES: dict[str, UpdateRule] = {"saf": saf_update, "mesa": mesa_update}
