"""samat.analysis.verdicts on hand-made results.json files: the rules for claims (a)-(c) give "holds", "does
not hold" and "inconclusive" where they should, runs pair by seed (a seed one side lacks is dropped and said),
one seed gives no interval, and the cost verdict comes from the exact pass counts."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Optional, Sequence

import pytest

from samat.analysis import verdicts as V
from samat.analysis.runs import load_runs
from samat.common.errors import UsageError
from samat.common.stats import effect_interval, paired_binomial_se

RADII = ("1/255", "2/255", "4/255", "8/255")


def results(method: str, seed: int, clean: float, robust: float | Sequence[float], *, rho: Optional[float] = None,
            eps: Optional[float] = None, steps: int = 3, passes: Optional[int] = None,
            suite: Optional[float] = None, n: Optional[int] = None, run_flags: Optional[dict] = None,
            eval_flags: Optional[dict] = None) -> dict:
    """A results.json document: ``robust`` per radius (one number for all radii); ``passes`` forward (=
    backward) passes over 100 optimizer steps (default: ERM 1, SAM 2, PGD-K K+1 per step); ``suite`` adds an
    ``apgd-suite-linf`` worst case ``suite`` below PGD at every radius; ``n`` evaluation examples (a subset
    drawn per seed); ``run_flags``/``eval_flags`` go to the config's run and eval blocks."""
    values = [robust] * len(RADII) if isinstance(robust, (int, float)) else list(robust)
    per_step = {"erm": 1, "sam": 2, "pgd-at": steps + 1}.get(method, 1)
    fwd = 100 * per_step if passes is None else passes
    resolved = {"method": method}
    if rho is not None:
        resolved.update(rho=rho, sam_sync="local")
    if eps is not None:
        resolved.update(eps=eps, alpha=eps / 4, steps=steps, norm="linf")
    metrics = {"clean": {"accuracy": clean},
               "robust": {"pgd-linf": {e: {"accuracy": v} for e, v in zip(RADII, values)}}}
    if suite is not None:
        metrics["robust"]["apgd-suite-linf"] = {e: {"accuracy": v - suite} for e, v in zip(RADII, values)}
    run = {"seed": seed, **({"max_eval_samples": n} if n else {}), **(run_flags or {})}
    return {"task": "vision", "method": method, "headline_metric": "accuracy", "schema_version": 1,
            "config": {"run": run, "method": {"rho": rho, "train_eps": None}, "eval": eval_flags or {}},
            "data": {"eval_examples": n} if n else {},
            "method_resolved": resolved, "metrics": metrics,
            "cost": {"optimizer_steps": 100, "forward_passes": fwd, "backward_passes": fwd}}


def write_run(root: Path, method: str, seed: int, clean: float, robust: float | Sequence[float], **kw) -> None:
    """:func:`results` into ``root/<method>[_rho][_eps]_s<seed>/results.json``."""
    rho, eps = kw.get("rho"), kw.get("eps")
    name = method + (f"_rho{rho:g}" if rho else "") + (f"_eps{round(eps * 255)}" if eps else "") + f"_s{seed}"
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(results(method, seed, clean, robust, **kw)))


NOISE = (0.0, 0.004, -0.003, 0.002)


def grid(root: Path, seeds=(0, 1, 2), sam_robust=0.05, sam_clean=0.0, at_robust=0.15, at_clean=-0.05,
         noise=NOISE, at_passes=None) -> list:
    """ERM, SAM rho 0.1 and PGD-AT 2/255: per seed, SAM and AT differ from ERM by the given amounts, plus
    a per-seed wobble ``noise`` (method-specific, so the paired differences have a spread)."""
    for i, s in enumerate(seeds):
        base = 0.85 + 0.01 * s
        write_run(root, "erm", s, base, 0.30 + 0.02 * s)
        write_run(root, "sam", s, base + sam_clean + noise[i], 0.30 + 0.02 * s + sam_robust - noise[i], rho=0.1)
        write_run(root, "pgd-at", s, base + at_clean - noise[i], 0.30 + 0.02 * s + at_robust + noise[i],
                  eps=2 / 255, passes=at_passes)
    return load_runs([str(root)])


def verdicts(runs) -> dict[str, V.Verdict]:
    return {c.claim: c for c in V.decide(runs, primary_rho=0.1, primary_eps="2/255").claims}


def test_all_claims_hold(tmp_path):
    v = verdicts(grid(tmp_path))
    assert [v[c].verdict for c in "abc"] == [V.HOLDS] * 3
    robust, clean = v["a"].effects
    assert robust.n == 3 and robust.seeds == [0, 1, 2]
    assert robust.mean == pytest.approx(0.05 - sum(NOISE[:3]) / 3) and robust.lo > 0
    assert clean.lo > -V.MARGIN
    assert v["b"].effects[0].mean == pytest.approx(0.10 + 2 * sum(NOISE[:3]) / 3)  # AT - SAM
    assert all(e.mean == pytest.approx(e.lo) for e in v["c"].effects)  # exact counts: zero-width interval
    assert {round(e.mean, 6) for e in v["c"].effects} == {2.0, 4.0}


@pytest.mark.parametrize("kwargs, claim", [
    (dict(sam_robust=-0.05), "a"),                # SAM less robust than ERM
    (dict(sam_clean=-0.05), "a"),                 # clean loss beyond the 1-point margin
    (dict(at_robust=-0.02), "b"),                 # AT less robust than SAM
    (dict(at_clean=0.03), "b"),                   # AT gains clean accuracy
    (dict(at_passes=300), "c"),                   # PGD-3 at 3 passes per step, not 4
])
def test_does_not_hold(tmp_path, kwargs, claim):
    v = verdicts(grid(tmp_path, **kwargs))
    assert v[claim].verdict == V.FAILS
    assert "DOES NOT HOLD" in v[claim].rule


def test_inconclusive_when_the_interval_straddles_the_threshold(tmp_path):
    # SAM's gain is +1 pt on average but -3, +4, +2 across seeds: the interval covers 0
    v = verdicts(grid(tmp_path, sam_robust=0.0, noise=(0.03, -0.04, -0.02)))
    robust = v["a"].effects[0]
    assert robust.lo < 0 < robust.hi and v["a"].verdict == V.INCONCLUSIVE
    # a clean change of -1 pt +- a little straddles the non-inferiority margin
    v = verdicts(grid(tmp_path / "b", sam_clean=-0.01, noise=(0.004, -0.003, 0.0)))
    assert v["a"].effects[1].lo < -V.MARGIN < v["a"].effects[1].hi and v["a"].verdict == V.INCONCLUSIVE


def test_single_seed_is_inconclusive_with_no_interval(tmp_path):
    v = verdicts(grid(tmp_path, seeds=(0,)))
    assert [v[c].verdict for c in "abc"] == [V.INCONCLUSIVE] * 3
    assert all(e.lo is None and "(no interval)" in e.text() for c in "abc" for e in v[c].effects)


def test_pairing_drops_a_seed_one_side_lacks_and_says_so(tmp_path):
    runs = [r for r in grid(tmp_path, seeds=(0, 1, 2, 3)) if not (r.method == "sam" and r.seed == 2)]
    a = verdicts(runs)["a"]
    robust = a.effects[0]
    assert robust.seeds == [0, 1, 3] and robust.n == 3 and robust.dropped == ["seed 2 (only in erm)"]
    assert any(line.startswith("erm_s2 (erm, seed 2): no usable run of seed 2 in sam rho=0.1")
               for line in V.decide(runs, 0.1, "2/255").excluded)
    # the difference is taken within a seed: ERM's seed-to-seed spread (2 pts per seed) does not enter it
    assert robust.hi - robust.lo < 0.02


def test_robust_endpoint_is_the_strongest_attack_averaged_over_radii(tmp_path):
    write_run(tmp_path, "erm", 0, 0.9, (0.8, 0.6, 0.4, 0.2), suite=0.05)
    write_run(tmp_path, "sam", 0, 0.9, (0.8, 0.6, 0.4, 0.2), rho=0.1)
    runs = load_runs([str(tmp_path)])
    ep = V.endpoint(runs)
    assert ep.norm == "linf" and ep.radii == RADII
    erm = next(r for r in runs if r.method == "erm")
    assert ep.mean(erm) == pytest.approx(0.5 - 0.05)  # the suite's worst case, where it was run
    assert ep.mean(next(r for r in runs if r.method == "sam")) == pytest.approx(0.5)


def test_markdown_and_json_carry_rules_effects_and_the_table(tmp_path):
    v = V.decide(grid(tmp_path, seeds=(0, 1, 2)), primary_rho=0.1, primary_eps="2/255")
    md = V.to_markdown(v, ["header line"])
    for text in ("(a) SAM raises robustness", "Rule: Paired by seed", "non-inferiority margin", "pgd-at eps=2/255",
                 "passes/step", "header line", "HOLDS", "test set's sampling noise", "Runs left out"):
        assert text in md
    row = next(line for line in md.splitlines() if line.startswith("| sam rho=0.1"))
    assert row.endswith("| 2.00 | 2.00 |")  # forward-backward passes per step and its multiple of ERM's
    data = V.to_json(v)
    assert [c["verdict"] for c in data["claims"]] == [V.HOLDS] * 3
    assert data["settings"][0]["name"] == "erm" and data["settings"][0]["seeds"] == [0, 1, 2]
    json.dumps(data, allow_nan=False)  # strict JSON


def test_collapsed_runs_are_named(tmp_path):
    runs = grid(tmp_path, seeds=(0, 1))
    runs[0].results.collapsed = True
    notes = V.decide(runs, 0.1, "2/255").notes
    assert len(notes) == 1 and notes[0].startswith(f"{runs[0].path.name}: the model predicts a single class")


def test_missing_settings_are_inconclusive_and_named(tmp_path):
    write_run(tmp_path, "erm", 0, 0.9, 0.3)
    write_run(tmp_path, "erm", 1, 0.9, 0.3)
    v = verdicts(load_runs([str(tmp_path)]))
    assert [v[c].verdict for c in "abc"] == [V.INCONCLUSIVE] * 3
    assert "no finished SAM" in v["a"].notes[0] and "PGD-AT" in v["b"].notes[0]


def test_text_like_runs_use_the_at_norm_and_no_robust_numbers_is_inconclusive(tmp_path):
    for seed in (0, 1):
        for method, kw in (("erm", {}), ("pgd-at", {"eps": 0.02})):
            data = results(method, seed, 0.8, 0.5, **kw)
            data["metrics"]["robust"]["pgd-l2"] = {"0.02": {"accuracy": 0.4}, "0.05": {"accuracy": 0.2}}
            if kw:
                data["method_resolved"]["norm"] = "l2"
            (tmp_path / f"{method}_{seed}").mkdir()
            (tmp_path / f"{method}_{seed}" / "results.json").write_text(json.dumps(data))
    ep = V.endpoint(load_runs([str(tmp_path)]))
    assert ep.norm == "l2" and ep.radii == ("0.02", "0.05") and ep.attacks == ("pgd-l2",)
    for d in tmp_path.iterdir():
        data = json.loads((d / "results.json").read_text())
        data["metrics"]["robust"] = {}
        (d / "results.json").write_text(json.dumps(data))
    v = V.decide(load_runs([str(tmp_path)]))
    assert v.endpoint is None and [c.verdict for c in v.claims[:2]] == [V.INCONCLUSIVE] * 2
    assert "no robust metric common to every run" in v.notes[-1]
    assert "robust mean" in V.to_markdown(v)  # the table still renders


# ------------------------------------------------------------------------------------------- issue 25


def _pair(root: Path, seeds, erm: tuple, sam: tuple, n: Optional[int] = 100, erm_kw=None, sam_kw=None) -> list:
    """ERM and SAM rho 0.1 runs with ``(clean, robust)`` per seed (callables of the seed or numbers)."""
    def val(x, s):
        return x(s) if callable(x) else x

    for s in seeds:
        write_run(root, "erm", s, val(erm[0], s), val(erm[1], s), n=n, **(erm_kw or {}))
        write_run(root, "sam", s, val(sam[0], s), val(sam[1], s), rho=0.1, n=n, **(sam_kw or {}))
    return load_runs([str(root)])


def test_identical_one_point_steps_on_100_examples_are_not_a_certainty(tmp_path):
    # robust +1 point on each of 3 seeds, clean unchanged: the old rule read "holds [+1.00, +1.00]"
    v = verdicts(_pair(tmp_path, (0, 1, 2), (0.80, 0.50), (0.80, 0.51)))
    robust, clean = v["a"].effects
    assert robust.mean == pytest.approx(0.01) and robust.hi - robust.lo > 0.05  # binomial noise on 100 examples
    assert robust.test_se and all(se > 0.05 for se in robust.test_se)
    assert v["a"].verdict == V.INCONCLUSIVE and "seeds" in v["a"].power
    assert "test-set" in robust.noise


def test_a_clean_change_of_exactly_minus_one_point_is_not_below_the_margin(tmp_path):
    assert 0.84 - 0.85 < -0.01 and not V.below(0.84 - 0.85, -0.01)  # the float residue the old rule tripped on
    v = verdicts(_pair(tmp_path, (0, 1, 2), (0.85, 0.50), (0.84, 0.60)))
    assert v["a"].effects[1].mean == pytest.approx(-0.01) and v["a"].verdict != V.FAILS
    # without a known test-set error, identical per-seed values give no interval, never a zero-width one
    v = verdicts(_pair(tmp_path / "no_n", (0, 1, 2), (0.85, 0.50), (0.84, 0.60), n=None))
    assert v["a"].effects[1].lo is None and v["a"].verdict == V.INCONCLUSIVE


def test_mixed_suites_are_refused_naming_the_fields(tmp_path):
    # ERM attacked with the APGD suite (lower), SAM with PGD only: SAM identical to ERM would read +5 points
    runs = _pair(tmp_path, (0, 1, 2), (0.85, 0.50), (0.85, 0.50), erm_kw=dict(suite=0.05, eval_flags={
        "eval_attacks": ["apgd"]}), sam_kw=dict(eval_flags={"eval_attacks": ["pgd"]}))
    with pytest.raises(UsageError) as err:
        V.decide(runs, 0.1, "2/255")
    assert "eval.eval_attacks" in str(err.value) and "attacks@8/255" in str(err.value)
    v = V.decide(runs, 0.1, "2/255", allow_unlike=True)
    assert any(line.startswith("eval.eval_attacks: ") for line in v.unlike)
    assert "WARNING: unlike runs paired" in V.to_markdown(v) and V.to_json(v)["unlike_runs_paired"] == v.unlike


def test_mixed_epochs_are_refused(tmp_path):
    runs = _pair(tmp_path, (0, 1, 2), (0.85, 0.50), (0.86, 0.55), erm_kw=dict(run_flags={"epochs": 5}),
                 sam_kw=dict(run_flags={"epochs": 10}))
    with pytest.raises(UsageError, match=r"recipe\.epochs: 5 \(erm_s0\), 10 \(sam_rho0\.1_s0\)"):
        V.decide(runs, 0.1, "2/255")


def test_a_duplicated_seed_is_dropped_and_both_runs_named(tmp_path):
    runs = grid(tmp_path, seeds=(0, 1, 2, 3))
    write_run(tmp_path / "again", "erm", 1, 0.9, 0.4)
    runs += load_runs([str(tmp_path / "again")])
    v = V.decide(runs, 0.1, "2/255")
    robust = v.claims[0].effects[0]
    assert robust.seeds == [0, 2, 3]
    assert any("erm_s1, erm_s1 (erm): seed 1 run 2 times" in line for line in v.excluded)
    assert "seed 1 run 2 times" in V.to_markdown(v)


def test_a_nan_drops_the_seed_from_every_component_and_names_the_run(tmp_path):
    for s in range(4):
        write_run(tmp_path, "erm", s, 0.85, 0.50 + 0.01 * s)
        write_run(tmp_path, "sam", s, math.nan if s == 1 else 0.85, 0.55 + 0.01 * s, rho=0.1)
    v = V.decide(load_runs([str(tmp_path)]), 0.1)
    robust, clean = v.claims[0].effects
    assert robust.seeds == clean.seeds == [0, 2, 3]  # robust is finite on seed 1, but the seed leaves as a whole
    assert any(line.startswith("sam_rho0.1_s1 (sam rho=0.1, seed 1): a missing or non-finite value")
               for line in v.excluded)
    assert clean.n == 3 and robust.dropped == []  # the old rule paired robust on 4 seeds, clean on 3


def test_a_true_zero_effect_with_many_seeds_reads_no_effect(tmp_path):
    rng = random.Random(1)
    for s in range(20):
        base = 0.80 + rng.gauss(0, 0.01)
        write_run(tmp_path, "erm", s, base, 0.5, n=10000)
        write_run(tmp_path, "sam", s, base + rng.gauss(0, 0.003), 0.5 + rng.gauss(0, 0.003), rho=0.1, n=10000)
    a = verdicts(load_runs([str(tmp_path)]))["a"]
    assert a.verdict == V.NO_EFFECT and -V.MARGIN < a.effects[0].lo90 < a.effects[0].hi90 < V.MARGIN
    assert "NO EFFECT within ±1 point" in V.verdict_table(V.decide(load_runs([str(tmp_path)]), 0.1))
    # the same zero effect on 3 seeds is inconclusive, and the power note says how many seeds would decide it
    wobble = {0: 0.01, 1: -0.01, 2: 0.0}
    a3 = verdicts(_pair(tmp_path / "three", (0, 1, 2), (0.8, 0.5), (lambda s: 0.8 + wobble[s], 0.5)))["a"]
    assert a3.verdict == V.INCONCLUSIVE and "would show it within ±1 pts (no effect)" in a3.power


def test_interval_coverage_with_seed_and_binomial_noise_is_95_percent():
    """1,000 simulated grids: per seed a true effect of +2 points, a seed-to-seed wobble and binomial test-set
    noise on n examples drawn per seed; the 95 % interval must cover the true effect 93-97 % of the time."""
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)

    def coverage(k: int, n: int, seed_sd: float, sims: int = 1000) -> float:
        hits = 0
        for _ in range(sims):
            pa = 0.8 + rng.normal(0, 0.02, k)
            pb = pa + 0.02 + rng.normal(0, seed_sd, k)
            a, b = rng.binomial(n, pa) / n, rng.binomial(n, pb) / n
            iv = effect_interval(list(b - a), [paired_binomial_se(x, y, n) for x, y in zip(a, b)])
            hits += iv.lo <= 0.02 <= iv.hi
        return hits / sims

    se = math.sqrt(2 * 0.16 / 1000)
    assert abs(coverage(5, 1000, se) - 0.95) <= 0.02  # seed and test-set noise alike
    assert abs(coverage(5, 100, 0.0) - 0.95) <= 0.03  # binomial noise only, 1-point steps: never below ~92 %


def test_test_set_noise_never_narrows_the_seed_only_interval():
    rng = random.Random(3)
    for _ in range(200):
        values = [rng.gauss(0.01, 0.02) for _ in range(3)]
        ses = [abs(rng.gauss(0.015, 0.01)) for _ in range(3)]
        both, seeds_only = effect_interval(values, ses), effect_interval(values)
        assert both.hi - both.lo >= seeds_only.hi - seeds_only.lo - 1e-12
