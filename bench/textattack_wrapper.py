#!/usr/bin/env python
"""Attack-evaluation speed: our ``BatchedModelWrapper`` vs TextAttack's stock ``HuggingFaceModelWrapper``.

Same recipe, model, sentences and per-sentence seeds; only the wrapper (and how many texts TextAttack's goal
function hands it per call: ours 8 x batch size, stock TextAttack's default 32) differ. One-time costs
(importing TextAttack, loading WordNet) are paid in a warm-up before timing; the two wrappers then alternate
for ``--rounds`` rounds and each one's fastest round is reported (robust to other load on a shared machine).
Reports wall time, speed-up and whether every per-sentence result (outcome, perturbed text, query count) is
identical.

    python bench/textattack_wrapper.py --recipe deepwordbug --num_examples 20
    python bench/textattack_wrapper.py --checkpoint runs/text-erm-s0 --recipe pwws --num_examples 20
"""

from __future__ import annotations

import json
import time


from samat.common.cli import ArgumentParser, main_guard, setup_logging  # noqa: E402
from samat.common.offline import probe_hub  # noqa: E402


def main() -> None:
    setup_logging()
    probe_hub()
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None,
                        help="Run folder or classifier folder (default: the embedded MiniLM, new seeded head).")
    parser.add_argument("--recipe", default="deepwordbug", help="TextAttack recipe (an offline one here).")
    parser.add_argument("--num_examples", type=int, default=20, help="Sentences attacked (test split).")
    parser.add_argument("--batch_size", type=int, default=64, help="Our wrapper's forward batch size.")
    parser.add_argument("--rounds", type=int, default=2, help="Timed rounds per wrapper (fastest is kept).")
    parser.add_argument("--out", default=None, help="Write the numbers as JSON here.")
    args = parser.parse_args()

    import torch

    from samat.text import data as text_data
    from samat.text import models as text_models
    from samat.text import resources
    from samat.text.task import ATTACK_EXAMPLES_SEED
    from samat.common.files import write_json_atomic
    from samat.text.textattack import attack_model, check_recipes

    check_recipes([args.recipe])
    folder = text_models.model_folder(args.checkpoint, "--checkpoint") if args.checkpoint else None
    torch.manual_seed(0)  # the new head of the default model
    loaded = text_models.load_classifier(str(folder) if folder else None, ["neg", "pos"], 128)
    dsd = text_data.load_raw(None)
    cols = text_data.resolve_columns(dsd, "test", None, None, None)
    examples = text_data.to_examples(dsd["test"], cols).shuffle(seed=ATTACK_EXAMPLES_SEED)
    ta = resources.import_textattack()
    stock = ta.models.wrappers.HuggingFaceModelWrapper(loaded.model, loaded.tokenizer)

    arms = {"ours": {}, "stock": {"wrapper": stock, "model_batch_size": 32}}
    attack_model(loaded.model, loaded.tokenizer, examples, [args.recipe], 1)  # warm-up: imports, WordNet
    runs: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, kwargs in arms.items():
            started = time.perf_counter()
            summaries, records = attack_model(loaded.model, loaded.tokenizer, examples, [args.recipe],
                                              args.num_examples, batch_size=args.batch_size, **kwargs)
            wall = time.perf_counter() - started
            runs.setdefault(name, {"walls": [], "summary": summaries[args.recipe], "records": records[args.recipe]})
            runs[name]["walls"].append(wall)
    for run in runs.values():
        run["wall_s"] = min(run["walls"])
    keys = ("result", "perturbed_text", "num_queries", "perturbed_output")
    same = sum(all(a[k] == b[k] for k in keys) for a, b in zip(runs["ours"]["records"], runs["stock"]["records"]))
    speedup = runs["stock"]["wall_s"] / runs["ours"]["wall_s"]
    report = {
        "recipe": args.recipe, "num_examples": args.num_examples, "checkpoint": args.checkpoint or "minilm-l6",
        "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
        "ours_wall_s": round(runs["ours"]["wall_s"], 2), "stock_wall_s": round(runs["stock"]["wall_s"], 2),
        "ours_rounds_s": [round(w, 2) for w in runs["ours"]["walls"]],
        "stock_rounds_s": [round(w, 2) for w in runs["stock"]["walls"]],
        "speedup": round(speedup, 2), "identical_examples": same,
        "ours_summary": runs["ours"]["summary"], "stock_summary": runs["stock"]["summary"],
    }
    print(json.dumps(report, indent=2))
    if args.out:
        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main_guard(main)
