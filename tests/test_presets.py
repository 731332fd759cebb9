"""Every ``samat reproduce`` preset, ``gpu`` included, exercised on this CPU.

- Each planned run's flags, with only sizes overridden, resolve through ``scripts/run.py``'s own parser and
  checks to the preset's and the task recipe's stated values (AT radius, step and steps, threat model, SAM's
  rho, the suite with its real budget).
- Each preset's AT run trains and evaluates end to end on tiny data, its results.json recording those values.
  Here the attacks' iteration budgets are cut too (``CHEAP_EVAL``): at the presets' own budgets (APGD-100,
  the masking diagnostics, TextAttack) the nine runs took 2-5 minutes each on the 2-core CPU, past CI's budget,
  and the first test already pins those budgets.

A preset can then no longer drift from the task's recipe without a failing test (issue 19: the segmentation
gpu preset had trained PGD-3 with steps of eps/4)."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
from helpers import load_script

from samat.analysis.reproduce import PRESETS, plan_reproduction, resolve_preset
from samat.common.config import parse_eps
from samat.common.registry import task_recipe

# Only sizes: examples, batches, steps of training, and the examples of the costly side evaluations.
TINY = {
    "vision": ["--max_train_samples", "16", "--max_eval_samples", "4", "--batch_size", "4", "--eval_batch_size",
               "4", "--max_steps", "2", "--sharpness_examples", "0", "--eval_diagnostics_examples", "2"],
    "text": ["--max_train_samples", "16", "--max_eval_samples", "4", "--batch_size", "4", "--eval_batch_size", "4",
             "--max_steps", "2", "--sharpness_examples", "0", "--eval_diagnostics_examples", "2",
             "--textattack_num_examples", "1"],
    "segmentation": ["--max_train_samples", "8", "--max_eval_samples", "4", "--batch_size", "4",
                     "--eval_batch_size", "4", "--max_steps", "2", "--sharpness_examples", "0",
                     "--eval_diagnostics_examples", "2", "--canvas_train_size", "16", "--canvas_test_size", "8"],
}


CHEAP_EVAL = ["--eval_steps", "2", "--eval_apgd_steps", "2", "--eval_diagnostics", "false"]
TEXTATTACK_OFF = {"text": ["--textattack_recipes", "none"]}


@pytest.fixture(scope="module")
def run_py():
    return load_script("run")


def _flag(args: list[str], flag: str):
    return args[args.index(flag) + 1] if flag in args else None


def _jobs(task: str, scale: str, tmp_path):
    rep = plan_reproduction(task, scale, seeds=1, root=str(tmp_path / f"{task}-{scale}"))
    return rep, rep.jobs


def _expected_at(task: str, scale: str) -> tuple[float, float, int, str]:
    """(eps, alpha, steps, norm) of the preset's AT run at its primary eps, from the preset and the recipe."""
    preset, recipe = resolve_preset(task, PRESETS[(task, scale)]), task_recipe(task)
    steps = _flag(list(preset.run_flags), "--train_steps")
    pixel = recipe.pixel_space and preset.train_norm == "linf"
    eps = parse_eps(preset.primary_eps, pixel_space=pixel, flag="eps")
    return eps, float(Fraction(preset.primary_eps) * Fraction(preset.alpha_ratio)), int(
        steps or recipe.defaults.train_steps), preset.train_norm


@pytest.mark.parametrize("task, scale", sorted(PRESETS))
def test_every_planned_run_resolves_to_the_preset_and_the_recipe(run_py, tmp_path, task, scale):
    rep, jobs = _jobs(task, scale, tmp_path)
    preset = resolve_preset(task, PRESETS[(task, scale)])
    suite = preset.eval_attacks.split()
    for job in jobs:
        resolved, _ = run_py.resolve(job.args + TINY[task])
        method = resolved.method
        assert list(resolved.evals.eval_attacks) == suite, job.name
        if "rho" in method.method.flags:
            assert f"{method.rho:g}" in {f"{float(r):g}" for r in preset.rho}, job.name
        if method.method.objective == "pgd":
            eps_text = _flag(job.args, "--train_eps")
            assert eps_text in preset.train_eps and method.norm == preset.train_norm, job.name
            assert method.alpha == pytest.approx(float(Fraction(eps_text) * Fraction(preset.alpha_ratio))), job.name
            steps = _flag(list(preset.run_flags), "--train_steps")
            assert method.steps == int(steps or task_recipe(task).defaults.train_steps), job.name
    assert not (tmp_path / f"{task}-{scale}").exists()  # resolving writes nothing


@pytest.mark.slow
@pytest.mark.parametrize("task, scale", sorted(PRESETS))
def test_each_presets_at_run_trains_end_to_end(run_py, tmp_path, task, scale):
    rep, jobs = _jobs(task, scale, tmp_path)
    preset = resolve_preset(task, PRESETS[(task, scale)])
    at = [j for j in jobs if j.name.startswith("pgd-at") and _flag(j.args, "--train_eps") == preset.primary_eps]
    assert len(at) == 1
    out = tmp_path / "out"
    run_py.main(at[0].args + TINY[task] + CHEAP_EVAL + TEXTATTACK_OFF.get(task, []) + ["--output_dir", str(out),
                                                                                       "--log_with", "none"])
    results = json.loads((out / "results.json").read_text())
    eps, alpha, steps, norm = _expected_at(task, scale)
    got = results["method_resolved"]
    assert (got["eps"], got["steps"], got["norm"]) == (pytest.approx(eps), steps, norm)
    assert got["alpha"] == pytest.approx(alpha)
    assert results["cost"]["forward_passes"] == 2 * (steps + 1)  # PGD-K AT: K + 1 passes per step
    assert results["config"]["eval"]["eval_attacks"] == preset.eval_attacks.split()
    assert results["suite"]["name"] == "+".join(preset.eval_attacks.split())


def test_text_cpu_preset_runs_the_full_apgd_suite_on_500_sentences(run_py, tmp_path):
    """Issue 23: with length-grouped evaluation batches the text `apgd` suite at 100 iterations on 500
    sentences fits about 15 one-core minutes per model (bench/README.md), so the cpu preset runs it again
    instead of APGD-CE at 25 iterations on 100 sentences."""
    _, jobs = _jobs("text", "cpu", tmp_path)
    assert jobs
    for job in jobs:
        resolved, _ = run_py.resolve(job.args)
        evals = resolved.evals
        assert list(evals.eval_attacks) == ["apgd"] and evals.eval_apgd_steps == 100, job.name
        assert resolved.run.max_eval_samples == 500, job.name
