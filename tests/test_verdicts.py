"""The verdict rule on synthetic per-seed results, and the mapping of time-dependent knobs to a shorter run."""

import math

import pytest

from largebatch.experiments import scaling
from largebatch.experiments import verdicts as V

WIN = V.Claim("win", "a beats b", "a", "b", "greater", 1.0)


def test_clear_win_is_reproduced():
    v = V.compare(WIN, [80.1, 80.3, 79.9, 80.2, 80.0], [75.0, 75.2, 74.9, 75.1, 75.3])
    assert v.verdict == V.REPRODUCED and v.lo > 4 and v.p < 1e-6


def test_overlapping_intervals_are_inconclusive():
    v = V.compare(WIN, [80.0, 82.0, 78.0, 81.0, 79.0], [79.0, 81.5, 77.5, 80.0, 79.5])
    assert v.lo < 0 < v.hi and v.verdict == V.INCONCLUSIVE


def test_opposite_direction_is_contradicted():
    v = V.compare(WIN, [75.0, 75.2, 74.9, 75.1, 75.3], [80.1, 80.3, 79.9, 80.2, 80.0])
    assert v.verdict == V.CONTRADICTED


def test_significant_but_below_the_smallest_effect_that_matters():
    # +0.3 points, tight: significant, but the interval excludes the 1-point effect the claim needs
    v = V.compare(WIN, [80.3, 80.31, 80.29, 80.3, 80.32], [80.0, 80.01, 79.99, 80.0, 80.02])
    assert v.p < 0.05 and v.hi < 1.0 and v.verdict == V.CONTRADICTED


def test_failed_control_makes_the_other_claims_not_testable():
    claims = [V.Claim("ctl", "warm-up matters", "warm", "cold", "greater", 2.0, control=True), WIN]
    samples = {"warm": [80.0, 80.2, 79.9], "cold": [79.9, 80.1, 80.0], "a": [90, 90.1, 89.9], "b": [80, 80.1, 79.9]}
    out = V.evaluate(claims, samples)
    assert out[0].verdict != V.REPRODUCED
    assert out[1].verdict == V.NOT_TESTABLE and "ctl" in out[1].note
    # a passing control leaves the claim's own verdict
    samples["cold"] = [60.0, 61.0, 59.5]
    assert [v.verdict for v in V.evaluate(claims, samples)] == [V.REPRODUCED, V.REPRODUCED]
    # an external control (another artifact's) counts the same way
    assert V.evaluate([WIN], samples, control=V.INCONCLUSIVE)[0].verdict == V.NOT_TESTABLE


def test_noninferior_and_equivalent():
    ni = V.Claim("ni", "a matches b", "a", "b", "noninferior", 1.0)
    eq = V.Claim("eq", "a equals b", "a", "b", "equivalent", 1.0)
    same = ([80.0, 80.1, 79.9, 80.05, 79.95], [80.02, 80.08, 79.93, 80.0, 79.97])
    assert V.compare(ni, *same).verdict == V.REPRODUCED and V.compare(eq, *same).verdict == V.REPRODUCED
    worse = ([75.0, 75.1, 74.9, 75.05, 74.95], same[1])
    assert V.compare(ni, *worse).verdict == V.CONTRADICTED and V.compare(eq, *worse).verdict == V.CONTRADICTED


def test_holm_correction_can_turn_a_win_inconclusive():
    # p ~ 0.02 alone; with four equally weak claims Holm's smallest multiplier is 4
    a, b = [81.0, 79.5, 81.0, 80.0, 81.5], [79.5, 78.5, 80.0, 79.5, 78.5]
    alone = V.compare(WIN, a, b)
    assert alone.p < 0.05 and alone.verdict == V.REPRODUCED
    claims = [V.Claim(f"c{i}", "a beats b", "a", "b", "greater", 1.0) for i in range(4)]
    out = V.evaluate(claims, {"a": a, "b": b})
    assert all(math.isclose(v.p_holm, min(1.0, 4 * alone.p)) for v in out)
    assert all(v.verdict == V.INCONCLUSIVE for v in out)


def test_holm_adjusted_values():
    assert V.holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)


def test_welch_matches_scipy():
    from scipy import stats

    a, b = [1.0, 2.0, 3.5, 2.2], [0.5, 0.7, 1.9, 0.1, 0.4]
    d, lo, hi, p = V.welch(a, b)
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert (lo + hi) / 2 == pytest.approx(d)


def test_one_seed_or_no_run_is_inconclusive():
    assert V.compare(WIN, [90.0], [80.0, 80.1]).verdict == V.INCONCLUSIVE
    assert V.compare(WIN, [], [80.0, 80.1]).verdict == V.NOT_RUN
    # a claim that was not run stays "not run" under a failed control
    assert V.evaluate([WIN], {"b": [80.0, 80.1]}, control=V.INCONCLUSIVE)[0].verdict == V.NOT_RUN


def test_cells_report_save_and_glance(tmp_path):
    claims = [V.Claim("c", "a beats b", "a", "b", "greater", 1.0, cell="B=4096")]
    out = V.evaluate(claims, {"B=4096": {"a": [90.0, 90.2, 89.9], "b": [80.0, 80.1, 79.9]}})
    assert out[0].verdict == V.REPRODUCED
    assert "**reproduced**" in V.report(out)
    V.save(str(tmp_path / "art" / "mini"), "art", out, "stamp")
    g = V.glance(str(tmp_path), "mini")
    assert "`art`" in g and "reproduced" in g and "[B=4096]" in g


def test_claim_rejects_bad_direction():
    with pytest.raises(ValueError, match="direction"):
        V.Claim("x", "x", "a", "b", "bigger")


# ----------------------------------------------------------------------------- time knobs
def test_tvlars_knobs_keep_lam_times_steps_and_the_delay_fraction():
    # the paper: CIFAR-10 at B = 1024, 100 epochs = 48 x 100 steps; a 12-epoch Fashion-MNIST run: 58 x 12 steps
    k = scaling.tvlars_knobs(1024, 60_000, 12, lam=1e-4, delay_epochs=10)
    t_paper, t_run = scaling.paper_steps(1024), scaling.steps(60_000, 1024, 12)
    assert (t_paper, t_run) == (4800, 696)
    assert k["tvlars_lam"] * t_run == pytest.approx(1e-4 * t_paper, rel=1e-5)
    assert k["tvlars_delay_epochs"] / 12 == pytest.approx(10 / 100)
    # phi therefore ends where the paper's does
    end_run = scaling.phi_end(k["tvlars_lam"], k["tvlars_delay_epochs"] * 58, t_run)
    assert end_run == pytest.approx(scaling.phi_end(1e-4, 10 * 48, t_paper), rel=1e-4)
    # the same run length as the paper changes nothing
    assert scaling.tvlars_knobs(16384, 50_000, 100) == {"tvlars_lam": 1e-4, "tvlars_delay_epochs": 10}


def test_warmup_and_steps_mapping():
    assert scaling.warmup_epochs(20, 100, 12) == pytest.approx(2.4)
    assert scaling.warmup_epochs(20, 1000, 5) == pytest.approx(0.1)  # Barlow Twins: 20 of 1000 epochs
    assert scaling.epochs_for_steps(scaling.paper_steps(16384), 60_000, 16384) == 100  # 3 steps per epoch both
    assert scaling.gamma_min(16384) == pytest.approx(0.032)
    line = scaling.describe_mapping(1024, 60_000, 12, warmup=20)
    assert "lam 0.0001 -> " in line and "warm-up 20 -> 2.4 epochs" in line and "phi at the end" in line


# ----------------------------------------------------------------------------- grids that cannot end at an edge
def test_grid_extends_at_the_edge_until_interior():
    from largebatch.experiments import grids

    peak = 27.0  # the best LR multiplier lies beyond the initial grid's top
    score = {}

    def run(x):  # what a finished trial scores: closer to the peak is better
        return score.get(x)

    g, state = grids.extend([1 / 9, 1 / 3, 1, 3, 9], run, 3.0, cap=8)
    assert state == grids.PENDING and g == pytest.approx([1 / 9, 1 / 3, 1, 3, 9])
    for _ in range(5):  # run what is pending, extend again
        for x in g:
            score.setdefault(x, -abs(math.log(x / peak)))
        g, state = grids.extend([1 / 9, 1 / 3, 1, 3, 9], run, 3.0, cap=8)
        if state != grids.PENDING:
            break
    assert state == grids.INTERIOR and max(g) == pytest.approx(81) and min(g) == pytest.approx(1 / 9)


def test_grid_stops_at_the_cap_and_says_edge():
    from largebatch.experiments import grids

    def run(x):  # monotone: the best is always the lowest value
        return -x

    g, state = grids.extend([1, 3, 9], run, 3.0, cap=5)
    assert state == grids.EDGE and len(g) == 5 and min(g) == pytest.approx(1 / 9)
    # a diverged trial scores -inf and does not count as the best
    g, state = grids.extend([1, 3, 9], lambda x: -math.inf if x == 9 else {1: 0.5, 3: 0.9}[x], 3.0, cap=5)
    assert state == grids.INTERIOR and g == [1, 3, 9]


def test_fair_baselines_search_extends_at_the_edge(tmp_path):
    """An optimizer whose best held-out accuracy sits at the lowest LR gets one more LR below it."""
    import os

    from largebatch.experiments.artifacts import ARTIFACTS, fair
    from largebatch.experiments.reproduce import context

    ctx = context(ARTIFACTS["fair-baselines"], "smoke", 1, str(tmp_path), {})
    first = fair.search_runs(ctx, "sgd")
    assert sorted({r.tags["mult"] for r in first}) == pytest.approx([1 / 3, 3])
    for r in first:  # fake finished trials: the lowest LR is best
        os.makedirs(ctx.path(r), exist_ok=True)
        acc = 0.9 if r.tags["mult"] < 1 else 0.5
        with open(os.path.join(ctx.path(r), "metrics.csv"), "w") as f:
            f.write(f"epoch,step,test_acc\n2,10,{acc}\n")
        open(os.path.join(ctx.path(r), "config.yaml"), "w").close()
    mults, state = fair.multipliers(ctx, "sgd")
    assert state == "pending" and min(mults) == pytest.approx(1 / 9)
    assert any(r.tags["mult"] == pytest.approx(1 / 9) for r in fair.search_runs(ctx, "sgd"))


def test_a_control_from_another_network_does_not_apply(tmp_path):
    """warmup-control's regime (an MLP without BatchNorm) passing says nothing about the BN-MLP proxy's claims."""
    from largebatch.experiments.artifacts import ARTIFACTS
    from largebatch.experiments.artifacts.common import control_verdict
    from largebatch.experiments.reproduce import context

    ctx = context(ARTIFACTS["tvlars-table1"], "mini", 1, str(tmp_path), {})
    assert control_verdict(ctx) == "not run"
    ctl = V.evaluate([V.Claim("control", "warm-up matters", "w", "n", "greater", 2.0, control=True)],
                     {"w": [80.0, 80.5, 79.5], "n": [10.0, 10.2, 9.9]})
    assert ctl[0].verdict == V.REPRODUCED
    folder = str(tmp_path / "warmup-control" / "mini")
    V.save(folder, "warmup-control", ctl, regime="nobn6", model=dict(model="mlp", mlp_depth=6, mlp_width=256,
                                                                      mlp_batchnorm=False))
    assert control_verdict(ctx).startswith("absent in this artifact's network")
    assert control_verdict(ctx, dict(model="mlp", mlp_depth=6, mlp_width=256, mlp_batchnorm=False)) == V.REPRODUCED
    claims = [V.Claim("c", "TVLARS replaces warm-up", "a", "b", "noninferior", 1.0)]
    out = V.evaluate(claims, {"a": [80.0, 80.1, 80.2], "b": [80.0, 80.1, 80.2]}, control=control_verdict(ctx))
    assert out[0].verdict == V.NOT_TESTABLE


def test_the_control_is_a_gate_outside_the_holm_family():
    """Gatekeeping: the control is tested alone at 0.05; only the claims it gates share the Holm correction."""
    ctl = V.Claim("ctl", "warm-up matters", "w", "n", "greater", 2.0, control=True)
    claims = [ctl] + [V.Claim(f"c{i}", "a beats b", "a", "b", "greater", 1.0) for i in range(3)]
    w, n = [86.4, 86.9, 87.1, 86.0, 86.9], [10.0, 10.0, 10.0, 10.0, 80.3]  # 4 of 5 diverge without warm-up
    out = V.evaluate(claims, {"w": w, "n": n, "a": [90.0, 90.1, 89.9], "b": [80.0, 80.1, 79.9]})
    alone = V.compare(ctl, w, n)
    assert out[0].p_holm == alone.p and 0.01 < alone.p < 0.05 and out[0].verdict == V.REPRODUCED
    assert all(math.isclose(v.p_holm, min(1.0, 3 * v.p)) for v in out[1:])


def test_a_diverged_run_counts_at_chance_in_a_claim(tmp_path):
    """Divergence is an outcome: a run stopped by a non-finite loss enters a claim at chance, not as missing."""
    import os

    from largebatch.experiments.artifacts import ARTIFACTS
    from largebatch.experiments.artifacts.common import CHANCE, outcomes
    from largebatch.experiments.reproduce import context

    ctx = context(ARTIFACTS["tvlars-fig1"], "smoke", 1, str(tmp_path), {})
    runs = ctx.grid()
    diverged, missing = runs[0], runs[1]
    os.makedirs(ctx.path(diverged))
    open(os.path.join(ctx.path(diverged), "config.yaml"), "w").close()
    with open(os.path.join(ctx.path(diverged), "failure.json"), "w") as f:
        f.write('{"message": "non-finite training loss"}')
    assert outcomes([ctx.result(diverged), ctx.result(missing)]) == [CHANCE]
