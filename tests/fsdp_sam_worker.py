"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU): samat's SAM on an FSDP2-sharded model.

Each rank holds its half of a batch; the model's layers are sharded unequally (a 5-row weight over 2 ranks is
3 + 2 rows). The ascent uses FSDP2's reduce-scattered gradient (``--sam_sync global``). Rank 0 saves, for
tests/test_engines.py to compare with one process on the whole batch: the full perturbation ``e``, the
weights after restore, and the descent gradient at ``w + e``.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))

from samat.common.sam import SAM  # noqa: E402


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net = model()
    for layer in (net[0], net[2]):
        fully_shard(layer)
    fully_shard(net)
    x, y = batch()
    xh, yh = x[4 * rank: 4 * (rank + 1)], y[4 * rank: 4 * (rank + 1)]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    rho = float(sys.argv[2])
    adaptive = sys.argv[3] == "asam"
    before = [full(p.detach()).clone() for p in net.parameters()]
    F.cross_entropy(net(xh), yh).backward()  # synced: FSDP2 reduce-scatters the mean gradient
    sam = SAM(optimizer, rho=rho, adaptive=adaptive)
    sam.perturb()
    e = [full(p.detach()) - b for p, b in zip(net.parameters(), before)]
    shard_rows = [p.to_local().shape[0] for p in net.parameters()]
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(net(xh), yh).backward()
    descent = [full(p.grad).clone() for p in net.parameters()]
    sam.restore()
    restored = [full(p.detach()) for p in net.parameters()]
    if rank == 0:
        torch.save({"e": e, "restored": restored, "descent": descent, "shard_rows": shard_rows}, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
