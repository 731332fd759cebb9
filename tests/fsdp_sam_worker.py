"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU): samat's SAM family on an FSDP2-sharded model.

One launch checks several things (each torchrun start costs seconds of CI time); rank 0 saves them all to
``argv[1]`` for tests/test_engines.py to compare with one process on the whole batch:

- ``single``: one SAM (and ASAM) ascent with samat's :class:`SAM` class on a bare model whose 5-row weight is
  sharded 3 + 2 rows: the full perturbation ``e``, the weights after restore, the descent gradient at ``w + e``.
- ``runs``: :data:`STEPS` optimizer steps of samat's own update rules (``train_step`` with a ``StepContext``,
  the engine's code path) for every case of :func:`cases`, SGD with momentum: the full weights at the end;
  ``unsynced``: how many passes of each ran under Accelerate's ``no_sync``.
- ``resumed``: the ``sam`` run saved after step 2 with torch.distributed.checkpoint (DCP: ``get_state_dict``
  of the sharded model and optimizer, each rank writing its shards), loaded into a fresh sharded model and
  optimizer, and run to the end; ``weights_only``: the same with a fresh optimizer (no momentum), the control.
- ``efficient_state_dict``: whether DCP can take the state dict of the ``looksam`` run's optimizer.

Accelerate 1.16 engages FSDP only on accelerators (a CPU ``--use_fsdp`` launch runs as DDP), so the model is
sharded here with ``fully_shard`` directly and the step runs with :class:`FSDP2OnCPU`, an Accelerator that
answers ``is_fsdp2``: its ``no_sync`` (gradient accumulation's first micro-batch) then takes Accelerate's FSDP2
branch, ``set_requires_gradient_sync(False)``, as an accelerator run would. The optimizer is a plain torch SGD
(Accelerate's FSDP2 ``prepare`` rebinds it to the sharded parameters; here it is built on them).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accelerate import Accelerator  # noqa: E402

from samat.common.methods import ResolvedMethod, StepContext, train_step  # noqa: E402
from samat.common.sam import SAM  # noqa: E402
from helpers import image_batch, resolved, vision_task  # noqa: E402

STEPS = 3       # optimizer steps of each run
BATCH = 8       # the global batch of every step: 4 rows per rank
PIXELS = 3 * 8 * 8
LR, MOMENTUM = 0.1, 0.9


def cases() -> dict[str, tuple[ResolvedMethod, int]]:
    """Case name -> (method, micro-batches per rank per step). ``--sam_sync global`` as FSDP resolves it;
    LookSAM with k = 2 takes a SAM step, a cheap step on the cached direction, and a SAM step."""
    return {"sam": (resolved("sam", rho=0.05, sam_sync="global"), 1),
            "asam": (resolved("asam", rho=0.5, sam_sync="global"), 1),
            "sam-at": (resolved("sam-at", rho=0.05, sam_sync="global"), 1),
            "looksam": (resolved("looksam", rho=0.05, sam_interval=2), 1),
            "sam-accumulated": (resolved("sam", rho=0.05, sam_sync="global"), 2)}


class FSDP2OnCPU(Accelerator):
    """An Accelerator whose ``no_sync`` takes the FSDP2 branch (Accelerate engages no FSDP on CPU); it counts
    the passes run under it, so the test knows accumulation went through that branch."""

    unsynced = 0

    @property
    def is_fsdp2(self) -> bool:
        return self.__dict__.get("sharded", False)

    @contextlib.contextmanager
    def no_sync(self, model):
        self.unsynced += 1
        with super().no_sync(model):
            yield


def model() -> nn.Module:
    """The single-ascent model: (B, 6) -> (B, 3) logits."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def vision_model() -> nn.Module:
    """Pixels (B, 3, 8, 8) -> logits (B, 4); no BatchNorm (batch splits are exact); the hidden layer's 5 rows
    shard 3 + 2 over 2 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, 5), nn.Tanh(), nn.Linear(5, 4))


def shard(net: nn.Module) -> nn.Module:
    """FSDP2 as Accelerate applies it: each Linear its own unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(net)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def weights(net: nn.Module) -> list[torch.Tensor]:
    return [full(p.detach()).clone() for p in net.parameters()]


def run_steps(accelerator, net: nn.Module, optimizer, method: ResolvedMethod, steps: range, rank: int,
              world: int, micro: int) -> None:
    """Steps ``steps`` of ``method``: each a fresh global batch of :data:`BATCH` images, this rank's rows split
    into ``micro`` micro-batches. Before each step the RNG is seeded so that this rank's random attack starts
    are the rows of the single process's draw for the whole batch (CPU ``uniform_`` fills in element order:
    rank r skips the values of the rows before its own)."""
    ctx = StepContext(accelerator=accelerator, model=net, optimizer=optimizer, task=vision_task(), method=method)
    per = BATCH // world
    for step in steps:
        whole = image_batch(n=BATCH, seed=100 + step)
        mine = {k: v[rank * per: (rank + 1) * per] for k, v in whole.items()}
        size = per // micro
        micro_batches = [{k: v[i * size: (i + 1) * size] for k, v in mine.items()} for i in range(micro)]
        torch.manual_seed(step)
        torch.empty(rank * per * PIXELS).uniform_()
        train_step(ctx, micro_batches)


def single_ascent(rule: str, rho: float, rank: int) -> dict:
    """One SAM/ASAM ascent with the bare :class:`SAM` class on 3 + 2 row shards (no silent no-op)."""
    from torch.distributed.fsdp import fully_shard

    net = model()
    for layer in (net[0], net[2]):
        fully_shard(layer)
    fully_shard(net)
    x, y = batch()
    xh, yh = x[4 * rank: 4 * (rank + 1)], y[4 * rank: 4 * (rank + 1)]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    before = weights(net)
    F.cross_entropy(net(xh), yh).backward()  # synced: FSDP2 reduce-scatters the mean gradient
    sam = SAM(optimizer, rho=rho, adaptive=rule == "asam")
    sam.perturb()
    e = [full(p.detach()) - b for p, b in zip(net.parameters(), before)]
    shard_rows = [p.to_local().shape[0] for p in net.parameters()]
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(net(xh), yh).backward()
    descent = [full(p.grad).clone() for p in net.parameters()]
    sam.restore()
    return {"e": e, "restored": weights(net), "descent": descent, "shard_rows": shard_rows}


def sharded_sgd() -> tuple[nn.Module, torch.optim.Optimizer]:
    net = shard(vision_model())
    return net, torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)


def resumed(accelerator, method: ResolvedMethod, folder: str, rank: int, world: int) -> dict:
    """The ``sam`` run saved with DCP after step 2 and finished from the checkpoint; and the control that
    loads only the model (fresh momentum), which must end elsewhere."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

    net, optimizer = sharded_sgd()
    run_steps(accelerator, net, optimizer, method, range(2), rank, world, 1)
    model_state, optim_state = get_state_dict(net, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    out = {}
    for name, with_optimizer in (("resumed", True), ("weights_only", False)):
        net, optimizer = sharded_sgd()
        model_state, optim_state = get_state_dict(net, optimizer)
        state = {"model": model_state, "optim": optim_state} if with_optimizer else {"model": model_state}
        dcp.load(state, checkpoint_id=folder)
        if with_optimizer:
            set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            set_model_state_dict(net, state["model"])
        run_steps(accelerator, net, optimizer, method, range(2, STEPS), rank, world, 1)
        out[name] = weights(net)
    return out


def state_dict_probe(net: nn.Module, optimizer) -> str:
    """What DCP's ``get_state_dict`` (Accelerate's FSDP2 ``save_state`` calls it) makes of an optimizer that
    holds the efficient variants' state: ``"ok"`` or the error, one line."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    try:
        get_state_dict(net, optimizer)
    except Exception as err:  # noqa: BLE001 - reported to the test, which decides
        return f"{type(err).__name__}: {err}"
    return "ok"


def main() -> None:
    accelerator = FSDP2OnCPU(cpu=True)
    accelerator.sharded = True
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, world
    out: dict = {"single": {rule: single_ascent(rule, rho, rank) for rule, rho in (("sam", 0.05), ("asam", 0.5))}}
    out["runs"], out["unsynced"] = {}, {}
    for name, (method, micro) in cases().items():
        net, optimizer = sharded_sgd()
        accelerator.unsynced = 0
        run_steps(accelerator, net, optimizer, method, range(STEPS), rank, world, micro)
        out["runs"][name], out["unsynced"][name] = weights(net), accelerator.unsynced
        if name == "looksam":
            out["efficient_state_dict"] = state_dict_probe(net, optimizer)
    out.update(resumed(accelerator, cases()["sam"][0], sys.argv[2], rank, world))
    if rank == 0:
        torch.save(out, sys.argv[1])
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
