"""``samat reproduce``: the grid of one task at one scale, trained through the sweep machinery, then verdicts.

A *preset* (task × scale) fixes what a reproduction runs: the methods, SAM's rho grid and AT's eps grid, the
radii the verdicts use (pre-specified, :mod:`samat.analysis.verdicts`), the seeds, the flags of every run and
the attack suite. :func:`plan_reproduction` turns it into :class:`samat.analysis.sweep.Job` s (finished runs
skipped, interrupted ones resumed); :func:`run_jobs` runs them with progress across the whole grid;
:func:`write_verdicts` writes ``<root>/verdicts.md`` and ``verdicts.json``. ``scripts/reproduce.py`` is the
command line.

Scales: ``quick`` (a few minutes on a 2-core CPU; low-powered: a smoke test of the protocol, not evidence),
``cpu`` (a fair test that fits a 2-core CPU: the verdicts' pre-specified radii only; vision measured at 66
one-core minutes for 3 seeds, 121 with the first three efficient variants (sam-every-k, looksam, ae-sam); with all
six and 5 seeds about 4.5 one-core hours, estimated from those; text about 4 one-core hours, estimated (2
measured with the earlier APGD-CE-25 evaluation); segmentation about 5 one-core hours, measured) and ``gpu`` (the paper's grid, full data, PGD-10).
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

from samat.common.errors import UsageError
from samat.common.files import write_bytes_atomic, write_json_atomic, write_text_atomic

from samat.common.registry import task_recipe

from .runs import RESULTS_FILE, find_results, load_run, portable, read_results
from .sweep import SWEEP_FLAGS, Job, execute, flag_name, plan, split_passthrough

MANIFEST = "reproduce.json"
FRONTIER_FIGURE = "efficient_frontier.png"
SCALES = ("quick", "cpu", "gpu")


@dataclass(frozen=True)
class Preset:
    """What a reproduction of one task at one scale runs, stated as what differs from the task's recipe
    (:class:`samat.common.recipe.TaskRecipe`). ``run_flags`` go to every run (method flags only to the methods
    that read them, as in a sweep); ``primary_rho``/``primary_eps`` are the radii the verdicts use, fixed here,
    before any result exists. ``None`` fields take the recipe's: ``rho``/``train_eps`` its sweep grids,
    ``train_norm`` its threat model, ``alpha_ratio`` its AT step as a share of eps."""

    summary: str
    primary_rho: str
    primary_eps: str
    seeds: int
    run_flags: tuple[str, ...]
    eval_attacks: str
    rho: Optional[tuple[str, ...]] = None
    train_eps: Optional[tuple[str, ...]] = None
    train_norm: Optional[str] = None
    low_powered: bool = False
    methods: tuple[str, ...] = ("erm", "sam", "pgd-at")
    # Few-step presets on images take eps/2 instead of the recipe's eps/4 (made for PGD-10), so that 3 steps
    # from the random start can reach the ball's surface (SegPGD-AT's 3 steps of eps/2).
    alpha_ratio: Optional[float] = None


@dataclass(frozen=True)
class ResolvedPreset:
    """A :class:`Preset` with the task recipe's values filled in: every grid and ratio the runs receive."""

    preset: Preset
    rho: tuple[str, ...]
    train_eps: tuple[str, ...]
    train_norm: str
    alpha_ratio: float

    def __getattr__(self, name: str):  # the preset's own fields (summary, seeds, run_flags, ...)
        if name == "preset":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.preset, name)

    def record(self) -> dict:
        """What verdicts.json records: the preset's fields with the recipe's values filled in."""
        return {**asdict(self.preset), "rho": list(self.rho), "train_eps": list(self.train_eps),
                "train_norm": self.train_norm, "alpha_ratio": self.alpha_ratio}


def resolve_preset(task: str, preset: Preset) -> ResolvedPreset:
    """Fill the preset's ``None`` fields from the task's recipe."""
    recipe = task_recipe(task)
    norm = preset.train_norm or recipe.defaults.train_norm
    return ResolvedPreset(preset, rho=preset.rho or recipe.rho_grid, train_eps=preset.train_eps or recipe.eps_grid(norm),
                          train_norm=norm,
                          alpha_ratio=recipe.alpha_ratio if preset.alpha_ratio is None else preset.alpha_ratio)


_VISION_EVAL = ("--eval_linf", "1/255", "2/255", "4/255", "8/255", "--eval_l2", "none")
PRESETS: dict[tuple[str, str], Preset] = {
    # small_cnn on 5,000 Fashion-MNIST images: converges in a few hundred steps; the 10 % warm-up keeps lr 0.1
    # out of the divergence guard on this short schedule. PGD-3 AT so that 3 seeds fit.
    ("vision", "quick"): Preset(
        summary="LOW-POWERED: small CNN, 5,000 Fashion-MNIST images, 6 epochs, 500 test images, PGD-3 AT; "
                "one rho and one eps",
        rho=("0.1",), train_eps=("2/255",), primary_rho="0.1", primary_eps="2/255", seeds=3,
        run_flags=("--model", "small_cnn", "--max_train_samples", "5000", "--max_eval_samples", "500",
                   "--epochs", "6", "--warmup_ratio", "0.1", *_VISION_EVAL, "--train_steps", "3",
                   "--sharpness_examples", "0", "--log_with", "none"),
        eval_attacks="pgd", low_powered=True, alpha_ratio=0.5),
    # Measured on the 2-core CPU (RESULTS.md, section A), seed 0, one torch thread: ERM's clean accuracy on
    # 1,000 test images was 0.850 / 0.876 / 0.895 after 20 / 40 / 80 epochs (small CNN, 5,000 images), so 40
    # epochs is NOT converged by the 1-point rule (80 would double a grid that takes 66 one-core minutes); PreAct
    # ResNet-18 at width 8 reached 0.792 / 0.870 at 10 / 20 epochs at twice the small CNN's step time, past
    # the CPU budget. One rho, one eps: SAM's and AT's pre-specified radii, the settings the verdicts use.
    ("vision", "cpu"): Preset(
        summary="small CNN, 5,000 Fashion-MNIST images, 40 epochs, 1,000 test images, APGD at L-inf 2/255 and "
                "8/255, PGD-3 AT (step eps/2); rho 0.1, eps 2/255",
        rho=("0.1",), train_eps=("2/255",), primary_rho="0.1", primary_eps="2/255", seeds=3,
        run_flags=("--model", "small_cnn", "--max_train_samples", "5000", "--max_eval_samples", "1000",
                   "--epochs", "40", "--warmup_ratio", "0.1", "--eval_linf", "2/255", "8/255", "--eval_l2", "none",
                   "--train_steps", "3", "--sharpness_examples", "0", "--log_with", "none"),
        eval_attacks="apgd", alpha_ratio=0.5),
    ("vision", "gpu"): Preset(
        summary="the paper's grid: PreAct ResNet-18, full Fashion-MNIST, 10 epochs, full test set, PGD-10 AT; "
                "rho 0.05/0.1/0.2/0.5, eps 1/2/4/8 /255",
        primary_rho="0.1", primary_eps="2/255", seeds=3,
        run_flags=("--model", "preact_resnet18", "--max_train_samples", "0", "--max_eval_samples", "0",
                   *_VISION_EVAL, "--train_steps", "10"),
        eval_attacks="apgd"),
    # Text: MiniLM on Rotten Tomatoes; AT in embedding space (L2, relative radii, half clean loss).
    ("text", "quick"): Preset(
        summary="LOW-POWERED: MiniLM, 1,000 sentences, 1 epoch, 200 test sentences, no TextAttack; one rho and "
                "one eps",
        rho=("0.05",), train_eps=("0.02",), primary_rho="0.05", primary_eps="0.02", seeds=3,
        run_flags=("--max_train_samples", "1000", "--max_eval_samples", "200", "--epochs", "1",
                   "--textattack_recipes", "none", "--sharpness_examples", "0", "--log_with", "none"),
        eval_attacks="pgd", low_powered=True),
    # Text on 2 CPU cores, one thread per run, two runs side by side (RESULTS.md section E, 2026-12-01): training
    # took ERM 293-333 s, SAM 1.8-2.0x, embedding PGD-AT 3.2-3.6x per seed. Attacks in embedding space cost a full
    # forward and backward pass of the transformer per step, over the padded tokens of the sentences still
    # attacked. With the evaluation batches grouped by length (1.16x the real tokens instead of 2.17x) and the
    # cascade, the full `apgd` suite (PGD-10 + APGD-CE-100 + APGD-DLR-100) on 500 sentences costs about 15 one-core
    # minutes per ERM model, measured on 100 sentences and extrapolated by padded tokens (bench/README.md, issue
    # 23); a model that keeps more sentences robust costs in proportion (PGD-AT's robust share, RESULTS.md
    # section E: ~1.3x, ~20 minutes). No TextAttack and no gradient-masking diagnostics (both can be run later on
    # the saved models with `samat evaluate`). About 4 one-core hours for the 9 runs (estimated: 125 minutes were
    # measured with APGD-CE-25 on 100 sentences, of which ~95 training).
    ("text", "cpu"): Preset(
        summary="MiniLM, 2,000 sentences, 3 epochs, 500 test sentences, the apgd suite (PGD-10 + APGD-CE + "
                "APGD-DLR, 100 iterations) at embedding L2 0.02 and 0.05, no TextAttack; rho 0.05, L2 eps 0.02 "
                "(the verdicts' radii); about 80 one-core minutes per seed (estimated)",
        rho=("0.05",), train_eps=("0.02",), primary_rho="0.05", primary_eps="0.02",
        seeds=3,
        run_flags=("--max_train_samples", "2000", "--max_eval_samples", "500", "--eval_apgd_steps", "100",
                   "--eval_diagnostics", "false", "--textattack_recipes", "none", "--sharpness_examples", "0",
                   "--log_with", "none"),
        eval_attacks="apgd"),
    ("text", "gpu"): Preset(
        summary="MiniLM, every sentence, 3 epochs, full test split, 500 TextAttack sentences; rho "
                "0.05/0.1/0.2/0.5, L2 eps 0.005-0.04",
        primary_rho="0.05", primary_eps="0.02", seeds=3,
        run_flags=("--max_train_samples", "0", "--max_eval_samples", "0"),
        eval_attacks="apgd"),
    # Segmentation: U-Net on fashion-canvas; mIoU under PGD and SegPGD.
    ("segmentation", "quick"): Preset(
        summary="LOW-POWERED: the default U-Net, 1,000 canvases, 2 epochs, 100 test canvases, PGD-2 AT; one rho "
                "and one eps",
        rho=("0.05",), train_eps=("2/255",), primary_rho="0.05", primary_eps="2/255", seeds=3,
        run_flags=("--max_train_samples", "1000", "--max_eval_samples", "100", "--epochs", "2", "--eval_linf",
                   "2/255", "8/255", "--train_steps", "2", "--sharpness_examples", "0", "--log_with", "none"),
        eval_attacks="pgd", low_powered=True),
    # Segmentation on 2 CPU cores (RESULTS.md section D; one thread per run, two runs side by side): the default
    # U-Net's 5 CPU epochs take ERM ~14 min of training, SAM ~2x, PGD-3 AT ~3x (4 passes per step, but its
    # attack steps need no weight gradients), plus ~4 min of evaluation each at two radii: about 1.6 one-core
    # hours per seed. AT trains at the task's default budget, 8/255 with 3 steps of eps/2 (the segmentation AT
    # papers'; chosen before any AT result on this data existed), and the evaluation is the task's own strong
    # pair, PGD-10 and SegPGD-10 with the worst iterate and the worst of both per image: APGD-CE + APGD-DLR at
    # 100 steps would cost ~10x the evaluation.
    ("segmentation", "cpu"): Preset(
        summary="the default U-Net and CPU subset (8,000 canvases, 5 epochs, 400 test canvases), PGD-10 and "
                "SegPGD-10 at L-inf 2/255 and 8/255, PGD-3 AT; rho 0.05, eps 8/255 (the verdicts' radii); "
                "about 1.6 one-core hours per seed",
        rho=("0.05",), train_eps=("8/255",), primary_rho="0.05", primary_eps="8/255", seeds=3,
        run_flags=("--eval_linf", "2/255", "8/255", "--log_with", "none"),
        eval_attacks="pgd"),
    ("segmentation", "gpu"): Preset(
        summary="the default U-Net, every canvas, 10 epochs, PGD-3 AT; rho 0.05/0.1/0.2/0.5, eps 1/2/4/8 /255",
        primary_rho="0.05", primary_eps="8/255", seeds=3,
        run_flags=("--max_train_samples", "0", "--max_eval_samples", "0"),
        eval_attacks="apgd"),
}
TASKS = tuple(dict.fromkeys(t for t, _ in PRESETS))


@dataclass
class Reproduction:
    """A checked request: the preset, the seeds, the root and the planned jobs."""

    task: str
    scale: str
    preset: ResolvedPreset
    seeds: list[str]
    root: Path
    eval_attacks: str
    passthrough: list[str]
    jobs: list[Job]
    efficient: list[str] = field(default_factory=list)  # efficient SAM variants, at the preset's primary rho

    def manifest(self) -> dict:
        """What the root's runs were asked for; a later call into the same root must ask for the same."""
        return _manifest(self.task, self.scale, self.eval_attacks, self.passthrough)


def _manifest(task: str, scale: str, eval_attacks: str, passthrough: Sequence[str]) -> dict:
    return {"task": task, "scale": scale, "eval_attacks": eval_attacks, "passthrough": list(passthrough)}


def _check_eval_attacks(value: str, task: str) -> None:
    """Names from the engine's suite registry; library (AutoAttack) attacks need pixels (the runs check the
    rest, e.g. a segmentation model)."""
    from samat.common.suites import ATTACKS, SUITES

    for name in value.split():
        if name not in SUITES and name not in ATTACKS:
            raise UsageError(f"--eval_attacks: unknown suite or attack {name!r}; suites: {', '.join(SUITES)}")
        library = name == "autoattack" or (name in ATTACKS and ATTACKS[name].library)
        if library and not task_recipe(task).pixel_space:
            raise UsageError(f"--eval_attacks: {name} attacks pixel-space image classifiers only, not {task}")


def _check_root(root: Path, task: str, manifest: dict) -> None:
    """Refuse a root that is a file, holds another task's runs, or was filled by another request."""
    if root.exists() and not root.is_dir():
        raise UsageError(f"--root {root}: is a file, not a folder")
    if not root.is_dir():
        return
    saved = root / MANIFEST
    if saved.is_file():
        try:
            previous = json.loads(saved.read_text())
        except (OSError, ValueError):
            raise UsageError(f"--root {root}: unreadable {MANIFEST}; use another --root") from None
        if previous.get("task") != task:
            raise UsageError(f"--root {root}: holds a reproduction of task {previous.get('task')!r}, not {task!r}; "
                             "use another --root")
        differ = [k for k in manifest if previous.get(k) != manifest[k]]
        if differ:
            raise UsageError(f"--root {root}: holds runs of another request ({', '.join(differ)}: "
                             f"{', '.join(repr(previous.get(k)) for k in differ)}); finished runs would be mixed "
                             "with new ones: use another --root")
    for path in find_results([str(root)]):
        other = read_results(path).get("task")
        if other != task:
            raise UsageError(f"--root {root}: holds a {other!r} run ({path.parent}), not {task!r}; use another --root")


def plan_reproduction(task: str, scale: str, seeds: Optional[int] = None, root: Optional[str] = None,
                      eval_attacks: Optional[str] = None, passthrough: Sequence[str] = (),
                      efficient: Sequence[str] = ()) -> Reproduction:
    """Check the request and plan its runs (``UsageError`` before anything is run or written). ``efficient``:
    efficient SAM variants (:data:`samat.analysis.efficient.EFFICIENT`) to add at the preset's primary rho,
    every seed, on the same flags (issue 12's frontier)."""
    from .efficient import EFFICIENT

    for name in efficient:
        if name not in EFFICIENT:
            raise UsageError(f"--efficient_sam: unknown variant {name!r}; choose from: {', '.join(EFFICIENT)}")
    if task not in TASKS:
        raise UsageError(f"--task: unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if scale not in SCALES:
        raise UsageError(f"--scale: unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")
    preset = resolve_preset(task, PRESETS[(task, scale)])
    n_seeds = preset.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise UsageError(f"--seeds: {n_seeds} must be >= 1 (3 or more for verdicts with an interval)")
    attacks = eval_attacks or preset.eval_attacks
    _check_eval_attacks(attacks, task)
    user = split_passthrough(list(passthrough))
    for g in user:
        if flag_name(g) == "eval_attacks":
            raise UsageError("after --: --eval_attacks is a flag of reproduce itself (before --)")
        if flag_name(g) in SWEEP_FLAGS:
            raise UsageError(f"after --: {g[0]} is set by reproduce itself")
    # the user's flags replace the preset's of the same name
    overridden = {flag_name(g) for g in user}
    preset_groups = [g for g in split_passthrough(list(preset.run_flags)) if flag_name(g) not in overridden]
    flags = [t for g in preset_groups + [["--eval_attacks", *attacks.split()]] + user for t in g]
    seed_list = [str(s) for s in range(n_seeds)]
    root_path = Path(root or f"runs/reproduce-{task}-{scale}")
    # before plan(), which refuses a finished run made with other flags: a root of another task or request
    # gets its own message first
    _check_root(root_path, task, _manifest(task, scale, attacks, passthrough))
    args = argparse.Namespace(task=task, model=None, dataset=None, methods=list(preset.methods),
                              rho=list(preset.rho), train_eps=list(preset.train_eps), train_norm=preset.train_norm,
                              alpha_ratio=preset.alpha_ratio, seeds=seed_list, root=str(root_path))
    jobs = plan(args, flags)
    if efficient:
        extra = argparse.Namespace(**{**vars(args), "methods": list(dict.fromkeys(efficient)),
                                      "rho": [preset.primary_rho]})
        jobs += plan(extra, flags)
    rep = Reproduction(task, scale, preset, seed_list, root_path, attacks, list(passthrough), jobs,
                       list(dict.fromkeys(efficient)))
    return rep


def progress_runner(jobs: Sequence[Job], runner: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """``runner`` that first prints the run's place in the whole grid: ``reproduce: run 7/21 sam_rho0.1_s0``."""
    place = {tuple(j.command): (i, j) for i, j in enumerate(jobs, 1)}

    def run(command: list[str]) -> int:
        i, job = place[tuple(command)]
        print(f"reproduce: run {i}/{len(jobs)} {job.name} ({'resuming' if job.status == 'resume' else 'training'})",
              flush=True)
        return runner(command)

    return run


def summary(rep: Reproduction) -> str:
    """The preset's description of what runs, true once the user's flags after ``--`` are applied (a changed
    dataset, model or size rebuilds it from the flags: :func:`samat.analysis.describe.preset_summary`), and the
    number of seeds that run (the presets' prose names none: their count is the ``seeds`` field alone)."""
    from .describe import preset_summary

    p = rep.preset
    text = preset_summary(rep.task, p.summary, p.run_flags, rep.passthrough, p.low_powered,
                          f"rho {', '.join(p.rho)}, eps {', '.join(p.train_eps)}")
    n = len(rep.seeds)
    seeds = f"{n} seed{'s' if n != 1 else ''}" + ("" if n == p.seeds else f" (--seeds; the preset's {p.seeds})")
    return f"{text}; {seeds}"


def run_jobs(rep: Reproduction, runner: Callable[[list[str]], int]) -> int:
    """Write the root's manifest, then run what is left of the grid (every run, even after a failure)."""
    rep.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(rep.root / MANIFEST, rep.manifest())
    done = sum(j.status == "done" for j in rep.jobs)
    print(f"reproduce: {rep.task} at scale {rep.scale} ({summary(rep)}); {len(rep.jobs)} runs, {done} "
          f"already finished", flush=True)
    return execute(rep.jobs, progress_runner(rep.jobs, runner), keep_going=True)


def header_lines(rep: Reproduction, missing: Sequence[str], records: Sequence = ()) -> list[str]:
    """The verdicts' header: scale, what ran (:func:`summary`), seeds, attacks, extra flags, and, from the
    finished runs' ``records`` (results), the data and model they really used."""
    from .describe import data_used

    p = rep.preset
    lines = []
    if p.low_powered:
        lines += ["**LOW-POWERED (`--scale quick`)**: a short schedule and few examples, to check that the protocol "
                  "runs end to end; its verdicts are not evidence for or against the paper.", ""]
    lines += [f"Scale `{rep.scale}`: {summary(rep)}. Seeds: {', '.join(rep.seeds)}. Attack suite: `{rep.eval_attacks}`."
              + (f" Extra run flags: `{shlex.join(rep.passthrough)}`." if rep.passthrough else ""),
              f"Runs under `{rep.root}`; generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}. "
              f"Figures and the full tables: `samat report {rep.root}`."]
    used = data_used(records) if records else ""
    if used:
        lines += ["", used]
    if missing:
        lines += ["", f"Unfinished runs (left out; rerun the same command to finish them): {', '.join(missing)}."]
    return lines


EVIDENCE = "runs"  # <results folder>/runs/<run name>/results.json: every run's record, committed with the verdicts


def write_evidence(rep: Reproduction, out: Path) -> list[Path]:
    """Every finished run's results.json into ``out/runs/<run name>/`` (a few kB each; no checkpoints or
    models), with absolute paths made relative to ``out`` (:func:`samat.analysis.runs.portable`), so that the
    numbers behind the verdicts can be checked from a clone. Nothing where ``out`` is the root itself (the runs
    are there already; copies would be read twice by ``samat report``)."""
    written: list[Path] = []
    if out.resolve() == rep.root.resolve():
        return written
    for job in rep.jobs:
        source = job.output_dir / RESULTS_FILE
        if source.is_file():
            target = out / EVIDENCE / job.output_dir.name / RESULTS_FILE
            write_json_atomic(target, portable(json.loads(source.read_text()), target.parent))
            written.append(target)
    return written


def write_verdicts(rep: Reproduction, results_dir: Optional[Path] = None,
                   allow_unlike: bool = False, looks: int = 1) -> tuple[str, str, list[str], str]:
    """Decide the claims from the grid's finished runs and write ``verdicts.md``/``verdicts.json`` and every
    run's results.json (:func:`write_evidence`) into ``results_dir`` (default: the root; with efficient SAM
    variants in the grid: also their frontier, :mod:`samat.analysis.efficient`, and ``efficient_frontier.png``).
    ``allow_unlike``: pair runs that differ in more than method and seed, with a warning in the verdicts.
    ``looks``: the looks at the frontier so far, this one included (:func:`samat.analysis.efficient.frontier`).
    Returns the verdict table, the settings table, the notes (collapsed runs, ...) and the frontier table
    (empty without variants) for the terminal."""
    from . import efficient as E
    from . import verdicts as V

    out = Path(results_dir) if results_dir is not None else rep.root
    finished = [j for j in rep.jobs if (j.output_dir / RESULTS_FILE).is_file()]
    missing = [j.name for j in rep.jobs if j not in finished]
    if not finished:
        raise UsageError(f"no finished runs under {rep.root}: nothing to decide")
    runs = [load_run(j.output_dir / RESULTS_FILE) for j in finished]
    v = V.decide(runs, primary_rho=float(rep.preset.primary_rho), primary_eps=rep.preset.primary_eps,
                 allow_unlike=allow_unlike)
    lines = header_lines(rep, missing, [r.results for r in runs])
    if write_evidence(rep, out):
        # a real run's name: a "<run>/..." placeholder reads as an absolute path to portable() below
        lines += ["", f"Every run's results.json is beside this file, one folder per run under `{EVIDENCE}/` (e.g. "
                      f"`{EVIDENCE}/{finished[0].output_dir.name}/{RESULTS_FILE}`; paths in them relative to it)."]
    frontier = E.frontier(v, looks)
    markdown, frontier_table = V.to_markdown(v, lines), ""
    if frontier is not None:
        png = E.figure(frontier)
        if png is not None:
            write_bytes_atomic(out / FRONTIER_FIGURE, png)
        markdown += "\n" + E.to_markdown(frontier, FRONTIER_FIGURE if png is not None else None)
        frontier_table = E.table(frontier, pad=True)
    write_text_atomic(out / "verdicts.md", portable(markdown, out) + "\n")
    extra = {"scale": rep.scale, "low_powered": rep.preset.low_powered,
             "preset": {**rep.preset.record(), "summary": summary(rep)}, "data_used": _data_rows(runs),
             "seeds": [int(s) for s in rep.seeds], "eval_attacks": rep.eval_attacks, "unfinished": missing,
             "efficient_sam": E.to_json(frontier) if frontier else None}
    write_json_atomic(out / "verdicts.json", portable(strict_json(V.to_json(v, extra)), out))
    return V.verdict_table(v, pad=True), V.settings_table(v, pad=True), v.notes, frontier_table


def _data_rows(runs: Sequence) -> list[dict]:
    """The distinct data blocks (dataset, model, sizes) of the finished runs, for ``verdicts.json``."""
    rows = []
    for r in runs:
        data = r.results.data or {}
        row = {k: data.get(k) for k in ("dataset", "model", "train_examples", "eval_examples")}
        if row not in rows:
            rows.append(row)
    return rows


def strict_json(value):
    """NaN/inf as ``None``, so the file is strict JSON."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
