"""Evaluation cost before and after the cascade, side by side in one process, on the vision CPU default.

The vision cpu preset's model and radii (small CNN, Fashion-MNIST, L-inf 2/255 and 8/255, PGD-10, the `apgd`
suite at 100 iterations), two models trained here in seconds (ERM, and PGD-3 AT at 2/255 with step eps/2),
then, per model, on the same test images and seeds, in interleaved order:

- ``before``: the evaluation as it was (``--old`` names a checkout of the previous code, imported as a second
  package, e.g. a symlink ``/tmp/oldpkg/samat_old -> <checkout>``);
- ``full``: this code with ``--eval_cascade false`` (every suite attack on every example it has not broken
  itself; broken examples still leave each attack early);
- ``cascade``: this code's default.

Writes times, ratios and the suite's robust accuracy per mode (the worst case must not move), and, between
``full`` and ``cascade``, whether every example's suite outcome is the same.

``--suite autoattack`` times the standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square with 5,000 queries, from
``pyautoattack``) instead of ``apgd``, in ``full`` and ``cascade`` mode only (``before`` too if ``--old`` is
given). Its per-example outcomes are read off the timed runs themselves (a run of that suite costs minutes, so
it is not repeated for the check), and the JSON also counts, per radius, the examples robust in one mode only:
the library seeds its random starts per subset it is handed, so the two modes need not agree bit for bit.

    OMP_NUM_THREADS=1 PYTHONPATH=<samat>:/tmp/oldpkg python bench/eval_cascade.py --old samat_old \\
        --examples 200 --out bench/results/eval_cascade_cpu.json
    OMP_NUM_THREADS=1 python bench/eval_cascade.py --suite autoattack --examples 100 --rounds 1 \\
        --check_outcomes --out bench/results/eval_cascade_autoattack_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import platform
import time

import torch
import torch.nn.functional as F

from samat.common import evaluate as evaluate_module
from samat.common.attacks import eval_mode, pgd
from samat.common.config import EvalArgs
from samat.common.evaluate import _attack_batch
from samat.common.offline import fashion_mnist_arrays
from samat.common.suites import plan, resolve_suite
from samat.common.task import AttackSpec
from samat.vision.models import build_model
from samat.vision.task import VisionArgs, VisionTask

RADII = [("2/255", 2 / 255), ("8/255", 8 / 255)]


def _data(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = fashion_mnist_arrays(split)
    return torch.as_tensor(images[:n].copy()).float().div(255).unsqueeze(1), torch.as_tensor(labels[:n]).long()


def _train(task, x, y, adversarial: bool, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    model, _ = build_model("small_cnn", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for rows in torch.randperm(len(y)).split(128):
            batch = {"pixel_values": x[rows], "labels": y[rows]}
            if adversarial:
                with eval_mode(model):
                    surface = task.surface(model, batch)
                    batch["pixel_values"] = x[rows] + pgd(
                        surface, lambda lg, s: F.cross_entropy(lg, y[rows]), eps=2 / 255, alpha=1 / 255, steps=3)
            opt.zero_grad()
            F.cross_entropy(model(batch["pixel_values"]), y[rows]).backward()
            opt.step()
    return model.eval()


def _specs(task):
    return [AttackSpec("pgd-linf", "linf", RADII, lambda logits, batch, step, steps: task.loss(logits, batch))]


def _suite(module_prefix: str, task, names, cascade=None):
    suites = importlib.import_module(f"{module_prefix}.common.suites")
    config = importlib.import_module(f"{module_prefix}.common.config")
    extra = {} if cascade is None else {"eval_cascade": cascade}
    return suites.resolve_suite(task, config.EvalArgs(eval_attacks=names, eval_diagnostics=False, **extra))


def _time_eval(module_prefix, task, model, loader, accelerator, names, cascade=None, outcomes=None):
    """Seconds of one ``evaluate_all``, its robust accuracies and the key of its worst case. With a list
    ``outcomes`` (this code only), each batch's suite outcomes are appended to it: ``{("suite", norm, label):
    bool (B,)}``, True where the example is robust to the whole suite."""
    evaluate = importlib.import_module(f"{module_prefix}.common.evaluate")
    suite = _suite(module_prefix, task, names, cascade)
    torch.manual_seed(0)
    with _recording(outcomes) if outcomes is not None else contextlib.nullcontext():
        start = time.perf_counter()
        out = evaluate.evaluate_all(model, task, loader, accelerator, _specs(task), 10, suite=suite)
        seconds = time.perf_counter() - start
    robust = out["metrics"]["robust"]
    key = f"{names[0]}-suite-linf" if f"{names[0]}-suite-linf" in robust else "pgd-linf"
    return seconds, {k: {label: m["accuracy"] for label, m in v.items()} for k, v in robust.items()}, key


class _Keep:
    def __init__(self):
        self.logits, self.sums = {}, self

    def add(self, key, logits, batch=None):
        if isinstance(key, tuple):
            self.logits[key] = logits.detach().clone()


class _Tee:
    """The evaluation's recorder, passed through, keeping a copy of the suite's worst logits per radius."""

    def __init__(self, rec):
        self.rec, self.sums, self.logits = rec, rec.sums, {}

    def add(self, key, logits, batch=None):
        self.rec.add(key, logits, batch)
        if isinstance(key, tuple) and key[0] == "suite":
            self.logits[key] = logits.detach().clone()


@contextlib.contextmanager
def _recording(outcomes: list):
    """While open, ``evaluate_all`` (this code) appends each batch's per-example suite outcomes to
    ``outcomes``; the evaluation itself runs unchanged (one argmax per radius and batch is added)."""
    original = evaluate_module._attack_batch

    def attack_batch(model, task, batch, planned, suite_norms, rec, cascade=False):
        tee = _Tee(rec)
        original(model, task, batch, planned, suite_norms, tee, cascade=cascade)
        outcomes.append({k: v.argmax(1) == batch["labels"] for k, v in tee.logits.items()})

    evaluate_module._attack_batch = attack_batch
    try:
        yield
    finally:
        evaluate_module._attack_batch = original


def _compare_outcomes(full: list, cascade: list) -> dict:
    """Per radius label, the examples robust to the suite in ``full`` mode only and in ``cascade`` mode only
    (both lists as :func:`_recording` fills them, over the same batches)."""
    diff: dict[str, dict[str, int]] = {}
    for a, b in zip(full, cascade, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            row = diff.setdefault(key[2], {"robust_full_only": 0, "robust_cascade_only": 0})
            row["robust_full_only"] += int((a[key] & ~b[key]).sum())
            row["robust_cascade_only"] += int((b[key] & ~a[key]).sum())
    return diff


def _same_outcomes(task, model, loader) -> bool:
    """Every example's suite outcome, full vs cascade (this code), at every radius."""
    same = True
    for batch in loader:
        robust = {}
        for cascade in (False, True):
            suite = resolve_suite(task, EvalArgs(eval_attacks=["apgd"], eval_cascade=cascade))
            rec = _Keep()
            torch.manual_seed(0)
            with eval_mode(model):
                _attack_batch(model, task, batch, plan(_specs(task), suite, 10), {"linf"}, rec, cascade=cascade)
            robust[cascade] = {k: v.argmax(1) == batch["labels"] for k, v in rec.logits.items() if k[0] == "suite"}
        same &= all(torch.equal(robust[False][k], robust[True][k]) for k in robust[False])
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("apgd", "autoattack"), default="apgd",
                        help="the suite timed in before/full/cascade mode (autoattack: full and cascade only, "
                             "unless --old is given)")
    parser.add_argument("--old", default=None, help="package name of the previous code (e.g. samat_old)")
    parser.add_argument("--examples", type=int, default=200, help="test images per model")
    parser.add_argument("--train_examples", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--check_outcomes", action="store_true", help="also compare every example's outcome")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from accelerate import Accelerator

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    task = VisionTask(VisionArgs())
    x, y = _data("train", args.train_examples)
    tx, ty = _data("test", args.examples)
    loader = [{"pixel_values": tx[i:i + args.batch_size], "labels": ty[i:i + args.batch_size]}
              for i in range(0, len(ty), args.batch_size)]
    report = {"command": "OMP_NUM_THREADS=1 python bench/eval_cascade.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False)),
              "machine": "2-core CPU, shared", "threads": 1, "platform": platform.platform(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "models": {}}
    for name, adversarial in (("erm", False), ("pgd-at", True)):
        start = time.perf_counter()
        model = _train(task, x, y, adversarial, args.epochs)
        with torch.no_grad():
            clean = sum((model(b["pixel_values"]).argmax(1) == b["labels"]).sum().item() for b in loader) / len(ty)
        row = {"train_s": round(time.perf_counter() - start, 1), "clean_accuracy": clean, "runs": {}}
        suite = args.suite
        modes = [("pgd", "samat", ["pgd"], None)]
        if args.old:
            modes += [(f"{suite} before", args.old, [suite], None)]
        modes += [(f"{suite} full", "samat", [suite], False), (f"{suite} cascade", "samat", [suite], True)]
        # autoattack: the outcome check reads the timed runs (the last round's), apgd reruns (below)
        record = args.check_outcomes and suite != "apgd"
        outcomes: dict[str, list] = {}
        _time_eval("samat", task, model, loader, accelerator, ["pgd"])  # warm-up (imports, first passes)
        for round_ in range(args.rounds):  # interleaved; the minimum over rounds is kept
            for label, prefix, names, cascade in modes:
                if record and cascade is not None:
                    outcomes[label] = []
                seconds, robust, key = _time_eval(prefix, task, model, loader, accelerator, names, cascade,
                                                  outcomes.get(label) if cascade is not None else None)
                best = row["runs"].get(label, {}).get("seconds", float("inf"))
                row["runs"][label] = {"seconds": round(min(seconds, best), 2), "suite_key": key,
                                      "worst_case": robust[key], "entries": robust}
                print(name, round_, label, f"{seconds:.1f}s", key, robust[key], flush=True)
        pgd_s = row["runs"]["pgd"]["seconds"]
        row["ratios_to_pgd"] = {k: round(v["seconds"] / pgd_s, 2) for k, v in row["runs"].items()}
        if suite != "apgd":
            row["cascade_to_full"] = round(row["runs"][f"{suite} cascade"]["seconds"]
                                           / row["runs"][f"{suite} full"]["seconds"], 3)
        if args.check_outcomes and suite == "apgd":
            row["same_per_example_outcome_full_vs_cascade"] = _same_outcomes(task, model, loader)
        elif args.check_outcomes:
            diff = _compare_outcomes(outcomes[f"{suite} full"], outcomes[f"{suite} cascade"])
            row["same_per_example_outcome_full_vs_cascade"] = not any(n for d in diff.values() for n in d.values())
            row["outcome_differences_full_vs_cascade"] = diff
        report["models"][name] = row
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if args.suite == "apgd":
        print(json.dumps({m: r["ratios_to_pgd"] for m, r in report["models"].items()}))
    else:
        print(json.dumps({m: {k: r.get(k) for k in ("ratios_to_pgd", "cascade_to_full",
                                                      "same_per_example_outcome_full_vs_cascade")}
                          for m, r in report["models"].items()}))


if __name__ == "__main__":
    main()
