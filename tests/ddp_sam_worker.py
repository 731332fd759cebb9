"""Run under ``torchrun --nproc_per_node 2``: one SAM step per sync mode on each rank's half of a batch.

Rank 0 saves the resulting weights to ``argv[1]`` for tests/test_ddp.py to compare with a reference.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accelerate import Accelerator  # noqa: E402

from samat.common.methods import StepContext, train_step  # noqa: E402
from helpers import image_batch, resolved, tiny_mlp, vision_task  # noqa: E402


def main() -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank = accelerator.process_index
    batch = image_batch(n=8)
    half = {k: v[4 * rank: 4 * (rank + 1)] for k, v in batch.items()}
    out = {}
    for sync in ("local", "global"):
        model = tiny_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model, optimizer = accelerator.prepare(model, optimizer)
        ctx = StepContext(accelerator=accelerator, model=model, optimizer=optimizer, task=vision_task(),
                          method=resolved("sam", rho=0.2, sam_sync=sync))
        train_step(ctx, [half])
        out[sync] = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    if rank == 0:
        torch.save(out, sys.argv[1])
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
