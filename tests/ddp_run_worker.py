"""Run under ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` (gloo) by
tests/test_ddp.py: ``scripts/run.py`` end to end for each method named in ``argv[2:]`` (one folder each under
``argv[1]``), then one SAM step (``--sam_sync local``) with a real fp16 GradScaler in which only rank 1's ascent
gradient overflows. Each rank writes what it saw to ``argv[1]/overflow_rank<r>.json``.

One launch for all of it: starting two processes costs more than the runs themselves.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from samat.common.methods import CleanObjective, StepContext  # noqa: E402
from samat.common.sam import SAM_UPDATES  # noqa: E402
from samat.scripts.run import main as run_main  # noqa: E402
from helpers import image_batch, resolved, tiny_mlp, vision_task  # noqa: E402

FAST = ["--task", "vision", "--model", "small_cnn", "--width", "4", "--max_train_samples", "128",
        "--max_eval_samples", "39", "--batch_size", "16", "--eval_batch_size", "16", "--eval_linf", "2/255",
        "--eval_l2", "0.25", "--eval_steps", "2", "--sharpness_examples", "0", "--log_with", "none",
        "--max_steps", "4"]
METHOD_FLAGS = {"pgd-at": ["--train_steps", "3"], "sam-every-k": ["--sam_interval", "2"]}


class OverflowOnRank1(CleanObjective):
    """The clean loss, times inf on rank 1's first call (its ascent pass): an fp16 overflow on one rank only."""

    def __init__(self, rank: int):
        self.rank, self.calls = rank, 0

    def loss(self, ctx, batch, prepared):
        self.calls += 1
        loss = super().loss(ctx, batch, prepared)
        return loss * float("inf") if self.rank == 1 and self.calls == 1 else loss


def overflow_step(out: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    # accelerate gives CPU fp16 no scaler; torch's own CPU GradScaler is the real one.
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model = tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    ctx = StepContext(accelerator=accelerator, model=model, optimizer=optimizer, task=vision_task(),
                      method=resolved("sam", rho=0.2, sam_sync="local"))
    batch = image_batch(n=8)
    half = {k: v[4 * rank: 4 * (rank + 1)] for k, v in batch.items()}
    before = [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()]
    objective = OverflowOnRank1(rank)
    first = SAM_UPDATES["sam"](ctx, objective, [half])
    unchanged = all(torch.equal(a, b) for a, b in zip(before, accelerator.unwrap_model(model).parameters()))
    scale_after_skip = accelerator.scaler.get_scale()
    second = SAM_UPDATES["sam"](ctx, objective, [half])  # the collectives still pair up afterwards
    weights = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(model).parameters()])
    (out / f"overflow_rank{rank}.json").write_text(json.dumps({
        "skipped": [first.skipped, second.skipped], "unchanged_after_skip": unchanged,
        "scale_after_skip": scale_after_skip, "scale_end": accelerator.scaler.get_scale(),
        "weights_sum": float(weights.double().sum()), "weights_first": weights[:5].tolist()}))
    accelerator.wait_for_everyone()


def main() -> None:
    out = Path(sys.argv[1])
    for method in sys.argv[2:]:
        run_main([*FAST, "--method", method, *METHOD_FLAGS.get(method, []), "--output_dir", str(out / method)])
    overflow_step(out)


if __name__ == "__main__":
    main()
