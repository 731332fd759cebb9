"""Suites: validation per task, suite <= each attack <= clean, library attacks through samat's interface."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samat.common.attacks import eval_mode
from samat.common.config import EvalArgs
from samat.common.errors import UsageError
from samat.common.evaluate import evaluate_all
from samat.common.library_attacks import LIBRARY_ATTACKS
from samat.common.suites import SUITES, Suite, plan, resolve_suite, valid_names
from samat.common.task import AttackSpec
from samat.segmentation.task import SegmentationTask
from samat.text.task import TextTask
from helpers import image_batch, tiny_cnn, tiny_mlp, vision_task


def _ce(logits, batch, step, steps):
    return F.cross_entropy(logits, batch["labels"])


def _specs(linf=("4/255", 4 / 255), l2=None):
    specs = [AttackSpec("pgd-linf", "linf", [linf], _ce)]
    return specs + ([AttackSpec("pgd-l2", "l2", [l2], _ce)] if l2 else [])


def test_unknown_names_list_the_valid_ones_for_the_task():
    with pytest.raises(UsageError, match="choose from: pgd, apgd, autoattack, apgd-ce"):
        resolve_suite(vision_task(), EvalArgs(eval_attacks=["fgsm"]))
    with pytest.raises(UsageError, match="unknown attack or suite 'autoatack'") as err:
        resolve_suite(TextTask, EvalArgs(eval_attacks=["autoatack"]))
    assert "aa-" not in str(err.value) and "autoattack," not in str(err.value)  # not offered to text


@pytest.mark.parametrize("task,space", [(TextTask, "token embeddings"), (SegmentationTask, "per pixel")])
@pytest.mark.parametrize("names", [["autoattack"], ["apgd", "aa-square"]])
def test_library_attacks_are_refused_where_they_cannot_run(task, space, names):
    with pytest.raises(UsageError, match=f"pixel-space image classifiers only; the .* task .*{space}") as err:
        resolve_suite(task, EvalArgs(eval_attacks=names))
    assert "\n" not in str(err.value)
    assert resolve_suite(task, EvalArgs(eval_attacks=["apgd"])).attacks  # APGD with our PGD runs anywhere


def test_suite_budget_flags_and_diagnostics_default():
    assert not resolve_suite(vision_task(), EvalArgs()).diagnostics  # pgd keeps today's cost
    suite = resolve_suite(vision_task(), EvalArgs(eval_attacks=["autoattack"], eval_restarts=2))
    assert suite.diagnostics and suite.restarts == 2 and [a.name for a in suite.attacks] == list(LIBRARY_ATTACKS)
    assert resolve_suite(vision_task(), EvalArgs(eval_attacks=["apgd-ce", "apgd"])).name == "apgd-ce+apgd"
    with pytest.raises(UsageError, match="--eval_restarts"):
        resolve_suite(vision_task(), EvalArgs(eval_restarts=0))
    assert set(SUITES) <= set(valid_names(vision_task()))


def _loader(n=24, classes=4):
    return [image_batch(n=n // 2, classes=classes, seed=s) for s in (1, 2)]


def test_suite_is_below_each_attack_which_is_below_clean(accelerator):
    model, task = tiny_mlp(), vision_task()
    suite = Suite("apgd", resolve_suite(task, EvalArgs(eval_attacks=["apgd"])).attacks, apgd_steps=8,
                  diagnostics=False)
    torch.manual_seed(0)
    out = evaluate_all(model, task, _loader(), accelerator, _specs(l2=("0.5", 0.5)), steps=3, suite=suite)
    robust, clean = out["metrics"]["robust"], out["metrics"]["clean"]["accuracy"]
    assert set(robust) == {"pgd-linf", "pgd-l2", "apgd-ce-linf", "apgd-dlr-linf", "apgd-ce-l2", "apgd-dlr-l2",
                           "apgd-suite-linf", "apgd-suite-l2"}
    for norm, label in (("linf", "4/255"), ("l2", "0.5")):
        value = robust[f"apgd-suite-{norm}"][label]["accuracy"]
        for attack in out["suite"]["members"][f"apgd-suite-{norm}"]:
            assert value <= robust[attack][label]["accuracy"] <= clean
    assert out["sanity"]["passed"], out["sanity"]
    assert any(c["name"] == "apgd-suite-linf_le_each_attack" for c in out["sanity"]["checks"])
    assert {"predicted_class_counts", "collapsed"} <= set(out) and "diagnostics" not in out


def test_default_pgd_suite_keeps_todays_keys(accelerator):
    suite = resolve_suite(vision_task(), EvalArgs())
    out = evaluate_all(tiny_mlp(), vision_task(), _loader(), accelerator, _specs(l2=("0.5", 0.5)), steps=2,
                       suite=suite)
    assert set(out["metrics"]["robust"]) == {"pgd-linf", "pgd-l2"} and "diagnostics" not in out
    assert set(out) >= {"metrics", "predicted_class_counts", "collapsed", "sanity"}


@pytest.mark.parametrize("name", LIBRARY_ATTACKS)
def test_each_library_attack_runs_through_samats_model_interface(name):
    model, task, batch = tiny_cnn(classes=5), vision_task(), image_batch(n=6, classes=5)
    suite = resolve_suite(task, EvalArgs(eval_attacks=[name]))
    eps = 8 / 255
    planned = plan(_specs(("8/255", eps)), suite, steps=2, iterations=3, square_queries=20)
    assert [p.key for p in planned] == ["pgd-linf", f"{name}-linf"]
    with eval_mode(model):
        result = planned[1].run(model, task, batch, eps)
        clean = model(batch["pixel_values"])
    x_adv = batch["pixel_values"] + result.delta
    assert result.delta.abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert result.logits.shape == clean.shape and result.score.shape == (6,)
    assert torch.allclose(model.eval()(x_adv), result.logits, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # FAB's .backward() reached the input only


def test_apgd_suite_on_token_embeddings_through_evaluate_all(accelerator):
    from text_helpers import tiny_bert

    model, task = tiny_bert(vocab_size=40, num_labels=3), TextTask()
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[:3, 5:] = 0  # padding never moves
    batch = {"input_ids": torch.randint(5, 40, (6, 7), generator=g), "attention_mask": mask,
             "labels": torch.randint(0, 3, (6,), generator=g)}
    specs = [AttackSpec("pgd-l2", "l2", [("0.1", 0.1), ("0.5", 0.5)], lambda lg, b, s, n: task.loss(lg, b))]
    suite = resolve_suite(task, EvalArgs(eval_attacks=["apgd"], eval_apgd_steps=5, eval_diagnostics_examples=6))
    torch.manual_seed(0)
    out = evaluate_all(model, task, [batch], accelerator, specs, steps=2, suite=suite)
    robust = out["metrics"]["robust"]
    assert set(robust) == {"pgd-l2", "apgd-ce-l2", "apgd-dlr-l2", "apgd-suite-l2"}
    assert out["sanity"]["passed"], out["sanity"]
    assert {c["name"] for c in out["diagnostics"]["checks"]} == {"pgd_vs_white_box", "more_steps", "huge_radius"}


def test_apgd_suite_on_segmentation_keeps_the_fewest_correct_pixels(accelerator):
    from samat.segmentation.task import SegmentationArgs

    task = SegmentationTask(SegmentationArgs())
    task.num_classes, task.class_names = 3, ["a", "b", "c"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 3, 1))
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (4, 8, 8), generator=g)
    labels[:, 0] = task.args.ignore_index
    batch = {"pixel_values": torch.rand(4, 3, 8, 8, generator=g), "labels": labels}
    specs = [AttackSpec("pgd-linf", "linf", [("8/255", 8 / 255)], lambda lg, b, s, n: task.loss(lg, b))]
    specs += task.extra_attacks(EvalArgs(eval_linf=["8/255"]))
    suite = resolve_suite(task, EvalArgs(eval_attacks=["apgd"], eval_apgd_steps=5, eval_diagnostics_examples=4))
    out = evaluate_all(model, task, [batch], accelerator, specs, steps=3, suite=suite)
    robust = out["metrics"]["robust"]
    assert set(robust) == {"pgd-linf", "segpgd-linf", "apgd-ce-linf", "apgd-dlr-linf", "apgd-suite-linf"}
    suite_acc = robust["apgd-suite-linf"]["8/255"]["pixel_accuracy"]
    assert all(suite_acc <= robust[k]["8/255"]["pixel_accuracy"] for k in robust)
    assert all(c["passed"] for c in out["sanity"]["checks"] if "suite" in c["name"]), out["sanity"]
    assert "black_box_vs_white_box" not in {c["name"] for c in out["diagnostics"]["checks"]}


@pytest.mark.parametrize("classes", [2, 3])
def test_the_suite_record_says_when_apgd_dlr_ran_as_a_restart_of_apgd_ce(accelerator, classes):
    """On 2 classes DLR has no third logit: the record says its CW fallback is APGD-CE's objective up to a
    monotone transform, and the member still runs (its entry is there)."""
    model, task = tiny_mlp(classes=classes), vision_task()
    suite = Suite("apgd", resolve_suite(task, EvalArgs(eval_attacks=["apgd"])).attacks, apgd_steps=3,
                  diagnostics=False)
    torch.manual_seed(0)
    out = evaluate_all(model, task, _loader(classes=classes), accelerator, _specs(), steps=2, suite=suite,
                       attack_collapsed=True)  # the tiny binary model may predict one class
    assert "apgd-dlr-linf" in out["metrics"]["robust"]
    notes = out["suite"].get("notes", [])
    assert (len(notes) == 1 and "apgd-dlr" in notes[0] and "monotone" in notes[0]) if classes == 2 else not notes


def test_apgd_dlr_on_two_classes_retraces_apgd_ce_from_the_same_start():
    """The evidence behind the note: on a binary model, APGD on the DLR fallback and APGD on CE from one
    random start reach the same worst points (CE = softplus(CW margin); APGD only compares losses and
    normalises its steps)."""
    from samat.common.suites import ATTACKS

    model, task, batch = tiny_mlp(classes=2), vision_task(), image_batch(n=12, classes=2, seed=3)
    suite = resolve_suite(task, EvalArgs(eval_attacks=["apgd"], eval_apgd_steps=10))
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        planned = plan([AttackSpec(f"pgd-{norm}", norm, [("e", eps)], _ce)], suite, steps=2)
        runs = {p.key: p for p in planned}
        deltas = {}
        with eval_mode(model):
            for name in ("apgd-ce", "apgd-dlr"):
                torch.manual_seed(5)
                deltas[name] = runs[f"{name}-{norm}"].run(model, task, batch, eps).delta
        assert ATTACKS["apgd-dlr"].loss == "dlr"
        assert torch.allclose(deltas["apgd-ce"], deltas["apgd-dlr"], atol=1e-5), norm
