"""Issue 12's frontier: Fieller's interval for the share of SAM's gain, the frontier table and its goal, the
reproduce grid with --efficient_sam, and the variant list kept equal to the engine's registry."""

from __future__ import annotations

import json
import math
import random

import pytest
from helpers import load_script
from test_reproduce import FakeRunner, _flag, _print, recorded_method_flags
from test_verdicts import results, write_run

from samat.analysis import efficient as E
from samat.analysis import verdicts as V
from samat.analysis.runs import load_runs
from samat.common.stats import effect_interval, fieller_ratio, t95, t_quantile


@pytest.fixture(scope="module")
def reproduce():
    return load_script("reproduce")


# ------------------------------------------------------------------------------------------- Fieller


def _inside(theta: float, num, den, t: float) -> bool:
    """Fieller's defining inequality at quantile ``t``, evaluated directly (the reference the closed form must
    match)."""
    n = len(num)
    d = [a - theta * b for a, b in zip(num, den)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) / n
    return mean * mean <= t ** 2 * var


@pytest.mark.parametrize("level", [0.95, 1 - 0.05 / 3])
def test_fieller_matches_its_defining_inequality(level):
    rng = random.Random(0)
    t = t95(3) if level == 0.95 else 4.8567  # two-sided 98.33 % Student-t quantile at 3 dof
    for _ in range(20):
        den = [2.0 + rng.gauss(0, 0.3) for _ in range(4)]
        num = [0.7 * b + rng.gauss(0, 0.2) for b in den]
        r = fieller_ratio(num, den, level)
        assert r.bounded and r.lo < r.value < r.hi
        for theta in (r.lo + 1e-3, r.hi - 1e-3, r.value):
            assert _inside(theta, num, den, t)
        for theta in (r.lo - 1e-3, r.hi + 1e-3):
            assert not _inside(theta, num, den, t)


def test_t_quantile_at_adjusted_levels():
    # the tables' 95 % and 90 % are unchanged (every committed verdict used them); other levels are exact
    assert t_quantile(10) == 2.228 and t_quantile(10, 0.90) == 1.812 and t_quantile(500) == 1.960
    assert t_quantile(10, 0.99) == pytest.approx(3.169, abs=1e-3)
    assert t_quantile(29, 1 - 0.05 / 3) == pytest.approx(2.566, abs=1e-3)  # conservative: 25 dof's quantile
    assert t_quantile(500, 1 - 0.05 / 3) == pytest.approx(2.394, abs=1e-3)  # the normal's beyond 120 dof
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="0 < level < 1"):
            t_quantile(10, bad)
    values, ses = [0.01, 0.03, 0.02, 0.05, 0.04], [0.01] * 5
    wide, usual = effect_interval(values, ses, level=0.99), effect_interval(values, ses)
    assert wide.lo < usual.lo < usual.mean < usual.hi < wide.hi and (wide.lo90, wide.hi90) == (usual.lo90, usual.hi90)


def test_fieller_edge_cases():
    exact = fieller_ratio([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert exact.value == 0.5 and exact.lo == pytest.approx(0.5) and exact.hi == pytest.approx(0.5)
    noisy_den = fieller_ratio([1.0, 1.2, 0.9], [0.1, -0.2, 0.15])  # SAM's gain not distinguishable from 0
    assert noisy_den.value is not None and not noisy_den.bounded
    one = fieller_ratio([1.0], [2.0])
    assert one.value == 0.5 and one.lo is None and one.n == 1
    assert fieller_ratio([], []).value is None and fieller_ratio([1.0, 2.0], [0.0, 0.0]).value is None
    assert fieller_ratio([1.0, math.nan, 2.0], [2.0, 1.0, 4.0]).n == 2  # a non-finite pair is dropped


# ------------------------------------------------------------------------------------------- frontier


WOBBLE = (0.0, 0.004, -0.003)


def _grid(root, sam_gain=0.05, variants=(("sam-every-k", 0.045, 120, 0.0), ("looksam", 0.01, 120, -0.03))):
    """ERM, SAM rho 0.1 (+``sam_gain`` robust), PGD-AT 2/255 and efficient variants ``(method, robust gain,
    forward passes over 100 steps, clean change)``, 3 seeds with a per-seed wobble."""
    for s in range(3):
        base, rob = 0.85 + 0.01 * s, 0.30 + 0.02 * s
        write_run(root, "erm", s, base, rob)
        write_run(root, "sam", s, base + WOBBLE[s], rob + sam_gain - WOBBLE[s], rho=0.1)
        write_run(root, "pgd-at", s, base - 0.05, rob + 0.15 + WOBBLE[s], eps=2 / 255)
        for method, gain, passes, clean in variants:
            write_run(root, method, s, base + clean + WOBBLE[s] / 2, rob + gain + WOBBLE[s] / 2, rho=0.1,
                      passes=passes)
    return V.decide(load_runs([str(root)]), primary_rho=0.1, primary_eps="2/255")


def test_frontier_rows_share_and_goal(tmp_path):
    f = E.frontier(_grid(tmp_path))
    rows = {r.name: r for r in f.rows}
    assert [r.role for r in f.rows[:3]] == ["reference"] * 3 and f.sam == "sam rho=0.1"
    assert rows["sam rho=0.1"].cost.mean == pytest.approx(2.0)
    every = rows["sam-every-k rho=0.1"]
    assert every.cost.mean == pytest.approx(1.2) and every.share.bounded
    assert every.share.value == pytest.approx(0.9, abs=0.02) and every.share.lo < 0.9 < every.share.hi
    assert every.gain.mean == pytest.approx(0.045, abs=1e-3)
    assert every.goal in ("shown", "point estimate only")
    look = rows["looksam rho=0.1"]
    # keeps 20 %, loses 3 pts clean: both intervals lie wholly on the wrong side, its cost (1.2x) does not
    assert look.share.value == pytest.approx(0.2, abs=0.02) and look.goal == "ruled out (share, clean)"
    assert look.clean_vs_sam.mean == pytest.approx(-0.03, abs=0.005)
    assert rows["pgd-at eps=2/255"].share.value == pytest.approx(3.0, abs=0.1)  # AT: 3x SAM's gain
    assert f.notes == []
    md = E.to_markdown(f, "efficient_frontier.png")
    assert "| sam-every-k rho=0.1 | 3 | 1.20 |" in md and "![cost vs robustness gain](efficient_frontier.png)" in md
    assert json.loads(json.dumps(E.to_json(f)))["rows"][3]["share"]["value"] == pytest.approx(0.9, abs=0.02)
    assert E.figure(f)[:4] == b"\x89PNG"


def test_goal_says_ruled_out_only_where_an_interval_excludes_the_goal(tmp_path):
    def row(cost, share, clean):
        """``_goal``'s arguments: share, clean change, cost."""
        (c, c_lo, c_hi), (r, r_lo, r_hi), (d, d_lo, d_hi) = cost, share, clean
        eff = lambda m, lo, hi: V.Effect("x", "a", "b", "difference", [0, 1], [m, m], m, lo, hi)  # noqa: E731
        return E.Ratio(r, r_lo, r_hi, 5), eff(d, d_lo, d_hi), eff(c, c_lo, c_hi)

    cheap, dear, dear_maybe = (1.2, 1.2, 1.2), (2.0, 2.0, 2.0), (1.42, 1.35, 1.49)
    keeps, loses, unsure = (0.9, 0.85, 0.95), (0.4, 0.15, 0.7), (0.41, 0.15, 1.2)
    same, worse = (0.0, -0.5, 0.5), (-3.0, -4.0, -2.0)
    scale = lambda t: tuple(x / 100 for x in t)  # noqa: E731  (clean changes are fractions)
    assert E._goal(*row(cheap, keeps, scale(same))) == "shown"
    assert E._goal(*row(cheap, (0.9, 0.5, 1.3), scale(same))) == "point estimate only"
    assert E._goal(*row(dear, keeps, scale(same))) == "ruled out (cost)"
    assert E._goal(*row(cheap, loses, scale(worse))) == "ruled out (share, clean)"
    # a mean misses the goal, but every interval still reaches it: not decided
    assert E._goal(*row(cheap, unsure, scale(same))) == "no, not ruled out"
    assert E._goal(*row(dear_maybe, keeps, scale(same))) == "no, not ruled out"  # cost varies by seed (AE-SAM)
    assert E._goal(*row(cheap, (0.5, None, None), scale(same))) == "no, not ruled out"  # unbounded: rules out nothing


def test_looks_widen_the_intervals_that_decide_the_goal(tmp_path):
    # keeps ~41 % of SAM's gain on 3 seeds: one look's 95 % interval rules it out, but after 3 looks the 98.33 %
    # interval (Bonferroni) still reaches 80 %: adding seeds until a look decides must not decide this yet
    v = _grid(tmp_path, variants=(("sam-every-k", 0.02, 120, 0.0),))
    one, three = E.frontier(v), E.frontier(v, looks=3)
    assert one.looks == 1 and one.level == 0.95 and three.level == pytest.approx(1 - 0.05 / 3)
    a, b = one.variants[0], three.variants[0]
    assert a.share_adjusted is None and a.goal == "ruled out (share)" and a.share.hi < 0.8
    assert b.share == a.share and b.clean_vs_sam.lo == a.clean_vs_sam.lo  # the 95 % columns are one look's
    assert b.share_adjusted.lo < a.share.lo and a.share.hi < 0.8 < b.share_adjusted.hi
    assert b.clean_vs_sam_adjusted.lo < a.clean_vs_sam.lo and b.goal == "no, not ruled out"
    assert "share kept [95 %]" not in E.table(one) and "share kept [98.33 %]" in E.table(three)
    md = E.to_markdown(three)
    assert "looked at 3 times" in md and "two-sided 98.33 % intervals (1 − 0.05/3, Bonferroni" in md
    data = json.loads(json.dumps(E.to_json(three)))
    assert data["looks"] == 3 and data["rows"][3]["share_adjusted"]["hi"] > 0.8
    with pytest.raises(ValueError, match="looks must be >= 1"):
        E.frontier(v, looks=0)


def test_a_variant_with_fewer_seeds_is_named_and_paired_on_its_own(tmp_path):
    _grid(tmp_path, variants=())
    for s in range(2):  # seeds 0 and 1 of 3
        write_run(tmp_path, "ae-sam", s, 0.85 + 0.01 * s, 0.30 + 0.02 * s + 0.04, rho=0.1, passes=130)
    f = E.frontier(V.decide(load_runs([str(tmp_path)]), primary_rho=0.1, primary_eps="2/255"))
    ae = f.variants[0]
    assert ae.robust.n == 2 and ae.share.n == 2 and ae.gain.seeds == [0, 1]
    assert any("ERM and SAM ran 3 seeds, these variants fewer: ae-sam rho=0.1 (2)" in n for n in f.notes)
    assert "| ae-sam rho=0.1 | 2 |" in E.table(f)


def test_frontier_gives_no_share_when_sams_gain_is_noise(tmp_path):
    f = E.frontier(_grid(tmp_path, sam_gain=0.0))
    assert any("is not significantly above 0: no share of it is given" in n for n in f.notes)
    assert all(r.share is None and r.goal == "–" for r in f.variants)


def test_frontier_gives_no_share_of_a_negative_sam_gain(tmp_path):
    # SAM significantly worse than ERM and a variant as bad: the old share read ~100 % [65 %, 159 %] and could
    # meet the goal; now no share is given and the note says SAM's gain is below 0
    f = E.frontier(_grid(tmp_path, sam_gain=-0.05, variants=(("sam-every-k", -0.05, 120, 0.0),)))
    assert f.rows[1].gain.hi < 0
    assert any("is significantly below 0: no share of it is given" in n for n in f.notes)
    assert f.variants[0].share is None and f.variants[0].goal == "–"
    assert "shown" not in E.table(f)


def test_no_variants_no_frontier_and_missing_sam_is_named(tmp_path):
    assert E.frontier(_grid(tmp_path / "a", variants=())) is None
    for s in range(2):
        write_run(tmp_path / "b", "erm", s, 0.8, 0.3)
        write_run(tmp_path / "b", "ae-sam", s, 0.8, 0.3, rho=0.1, passes=150)
    f = E.frontier(V.decide(load_runs([str(tmp_path / "b")]), primary_rho=0.1))
    assert f.rows == [] and "no SAM runs at the pre-specified rho" in f.notes[0]


def test_variant_list_is_the_registrys():
    from samat.common.methods import METHODS, UPDATES
    from samat.common.registry import UPDATE_RULES

    registry = [m.name for m in METHODS.values() if UPDATE_RULES[m.update].efficient and m.objective == "clean"]
    assert sorted(registry) == sorted(E.EFFICIENT)
    assert {"saf", "mesa", "esam"} <= set(E.EFFICIENT) and all(name in UPDATES for name in E.EFFICIENT)


def test_cost_counts_passes_in_examples():
    """ESAM's ranking forward and descent pass see part of the batch: its cost is in examples, not calls. 100
    steps of batch 128 on one process, gamma 0.5: forward 2.5 B, backward 1.5 B a step -> 2.0 (calls: 2.5)."""
    from types import SimpleNamespace

    from samat.analysis.verdicts import example_passes_per_step, passes_per_step

    b, steps = 128, 100
    cost = {"optimizer_steps": steps, "forward_passes": 3 * steps, "backward_passes": 2 * steps,
            "forward_examples": int(2.5 * b * steps), "backward_examples": int(1.5 * b * steps),
            "train_examples": b * steps}
    esam = SimpleNamespace(cost=cost, results=SimpleNamespace(num_processes=1))
    assert example_passes_per_step(esam) == pytest.approx(2.0) and passes_per_step(esam) == pytest.approx(2.5)
    # two processes: each counts its own half of the batch, train_examples counts both
    halves = {**cost, "forward_examples": cost["forward_examples"] // 2,
              "backward_examples": cost["backward_examples"] // 2}
    assert example_passes_per_step(SimpleNamespace(cost=halves, results=SimpleNamespace(num_processes=2))) == 2.0
    # an older run without example counts: the calls
    old = {k: v for k, v in cost.items() if "examples" not in k}
    assert example_passes_per_step(SimpleNamespace(cost=old, results=None)) == pytest.approx(2.5)


# ------------------------------------------------------------------------------------------- reproduce


class EfficientRunner(FakeRunner):
    """FakeRunner plus efficient variants: 1.2 passes per step, 90 % of SAM's +3 pts robust gain."""

    def __call__(self, command):
        method = _flag(command, "--method")
        if method not in E.EFFICIENT:
            return super().__call__(command)
        from pathlib import Path

        out, seed = Path(_flag(command, "--output_dir")), int(_flag(command, "--seed"))
        self.names.append(out.name)
        out.mkdir(parents=True)
        doc = results(method, seed, 0.85 + 0.01 * seed, 0.3 + 0.02 * seed + 0.027 + (0.0, 0.002, -0.001)[seed],
                      rho=float(_flag(command, "--rho")), passes=120)
        doc["config"]["method"] = recorded_method_flags(command)
        (out / "results.json").write_text(json.dumps(doc))
        return 0


def test_reproduce_plans_variants_at_the_primary_rho(reproduce, capsys, tmp_path):
    commands = _print(reproduce, capsys, "--scale", "cpu", "--root", str(tmp_path / "r"), "--efficient_sam",
                      "looksam", "ae-sam")
    extra = [c for c in commands if _flag(c, "--method") in E.EFFICIENT]
    assert len(commands) == 3 * (1 + 1 + 1) + 2 * 3 and len(extra) == 2 * 3
    assert {_flag(c, "--rho") for c in extra} == {"0.1"} and {_flag(c, "--seed") for c in extra} == {"0", "1", "2"}
    every = _print(reproduce, capsys, "--root", str(tmp_path / "q"), "--efficient_sam")
    assert len(every) == 9 + len(E.EFFICIENT) * 3
    # SAF and MESA take no ascent step: planned without --rho (run.py would refuse it)
    assert all("--rho" not in c for c in every if _flag(c, "--method") in ("saf", "mesa"))


def test_reproduce_writes_the_frontier(reproduce, capsys, tmp_path):
    root = tmp_path / "grid"
    assert reproduce.main(["--root", str(root), "--efficient_sam", "sam-every-k"], runner=EfficientRunner()) == 0
    out = capsys.readouterr().out
    assert "Efficient SAM (cost vs share of SAM's robust gain kept)" in out and "sam-every-k rho=0.1" in out
    md = (root / "verdicts.md").read_text()
    assert "## Efficient SAM: cost vs robustness gain kept" in md and (root / "efficient_frontier.png").is_file()
    data = json.loads((root / "verdicts.json").read_text())
    row = [r for r in data["efficient_sam"]["rows"] if r["method"] == "sam-every-k"][0]
    assert row["cost"]["mean"] == pytest.approx(1.2) and row["share"]["value"] == pytest.approx(0.9, abs=0.05)
    assert data["efficient_sam"]["looks"] == 1 and row["share_adjusted"] is None
    # a second look at the same root, after more seeds: the adjusted columns appear
    assert reproduce.main(["--root", str(root), "--efficient_sam", "sam-every-k", "--verdicts_only", "--looks", "2"],
                          runner=EfficientRunner()) == 0
    assert "share kept [97.5 %]" in capsys.readouterr().out
    assert json.loads((root / "verdicts.json").read_text())["efficient_sam"]["looks"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--looks", "0", "--efficient_sam"], "--looks 0: must be 1 or more"),
    (["--looks", "3"], "--looks 3: it adjusts the efficient SAM frontier's intervals; pass --efficient_sam"),
    (["--looks", "3", "--efficient_sam", "--print"], "--looks 3 with --print: --print writes no verdicts"),
])
def test_bad_looks_is_one_line_exit_2(reproduce, capsys, tmp_path, flags, message):
    from samat.common.cli import main_guard

    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: reproduce.main(["--root", str(tmp_path / "x"), *flags], runner=FakeRunner()))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}")
    assert not (tmp_path / "x").exists()


def test_unknown_variant_is_one_line_exit_2(reproduce, capsys, tmp_path):
    from samat.common.cli import main_guard

    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: reproduce.main(["--root", str(tmp_path / "x"), "--efficient_sam", "gsam"],
                                          runner=FakeRunner()))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --efficient_sam: unknown variant 'gsam'; choose from: sam-every-k, looksam, ae-sam, esam, "
                   "saf, mesa"]
    assert not (tmp_path / "x").exists()
