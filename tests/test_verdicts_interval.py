"""The verdict rule on a precomputed interval (a fitted quantity's bootstrap interval instead of per-seed values):
the same decision, Holm correction and positive-control gate as per-seed comparisons."""

import math

import pytest

from largebatch.experiments import verdicts as V

C = V.Claim("c", "x beats y", "x", "y", "greater", 1.0, needs_control=True)


def test_bootstrap_p_value_and_percentile_interval():
    assert V.bootstrap_p([1.0] * 99) == pytest.approx(2 / 100)  # none at or below 0: the +1 keeps p above 0
    assert V.bootstrap_p([-1.0, 1.0] * 50) == 1.0
    assert V.bootstrap_p([-1.0] * 10 + [1.0] * 89) == pytest.approx(2 * 11 / 100)
    assert V.bootstrap_p([2.0, math.nan, 3.0], null=2.5) == pytest.approx(1.0)
    assert math.isnan(V.bootstrap_p([math.nan]))
    v = V.from_bootstrap(C, 2.0, [float(x) for x in range(101)] + [math.nan], n_arm=3, n_base=3)
    assert (v.lo, v.hi) == (pytest.approx(2.5), pytest.approx(97.5)) and v.method == "bootstrap"


@pytest.mark.parametrize("direction,diff,lo,hi,p,want", [
    ("greater", 1.5, 0.5, 2.5, 0.01, V.REPRODUCED),
    ("greater", 0.5, 0.2, 0.8, 0.01, V.CONTRADICTED),  # significant, but an effect that matters is excluded
    ("greater", 1.5, -0.5, 3.5, 0.2, V.INCONCLUSIVE),
    ("less", -1.5, -2.5, -0.5, 0.01, V.REPRODUCED),
    ("noninferior", -0.2, -0.8, 0.4, 0.5, V.REPRODUCED),
    ("equivalent", 0.0, -0.5, 2.0, 0.9, V.INCONCLUSIVE),
])
def test_interval_verdict_is_the_per_seed_rule(direction, diff, lo, hi, p, want):
    c = V.Claim("c", "t", "x", "y", direction, 1.0)
    v = V.from_interval(c, diff, lo, hi, p, n_arm=3, n_base=3)
    assert v.verdict == want == V.decide(c, diff, lo, hi, p) and v.p_holm == p


def test_missing_arms_one_seed_and_no_interval():
    assert V.from_interval(C, math.nan, math.nan, math.nan, math.nan, n_arm=0, n_base=3).verdict == V.NOT_RUN
    v = V.from_interval(C, 2.0, 1.5, 2.5, 0.01, n_arm=1, n_base=3)
    assert v.verdict == V.INCONCLUSIVE and v.note == "fewer than 2 seeds in an arm" and math.isnan(v.p)
    v = V.from_bootstrap(C, 2.0, [], n_arm=3, n_base=3)
    assert v.verdict == V.INCONCLUSIVE and v.note == "no interval"


def test_conclude_holm_corrects_and_gates_like_evaluate():
    vs = [V.from_interval(V.Claim(f"c{i}", "t", "x", "y"), 2.0, 1.5, 2.5, 0.03, n_arm=3, n_base=3) for i in range(2)]
    assert [v.verdict for v in vs] == [V.REPRODUCED] * 2  # each alone
    out = V.conclude(vs)
    assert [v.p_holm for v in out] == [pytest.approx(0.06)] * 2 and [v.verdict for v in out] == [V.INCONCLUSIVE] * 2
    # the same Holm family whether the claims come as intervals or as per-seed arrays
    per_seed = V.evaluate([V.Claim(f"c{i}", "t", "x", "y") for i in range(2)], {"x": [3.0, 3.1, 2.9], "y": [1.0, 1.1, 0.9]})
    mixed = V.conclude([V.compare(per_seed[0].claim, [3.0, 3.1, 2.9], [1.0, 1.1, 0.9]),
                        V.from_interval(per_seed[1].claim, per_seed[1].diff, per_seed[1].lo, per_seed[1].hi,
                                        per_seed[1].p, n_arm=3, n_base=3, method="welch")])
    assert [v.p_holm for v in mixed] == [pytest.approx(v.p_holm) for v in per_seed]
    gated = V.conclude([V.from_interval(C, 2.0, 1.5, 2.5, 0.001, n_arm=3, n_base=3)], control="inconclusive")
    assert gated[0].verdict == V.NOT_TESTABLE


def test_report_and_save_of_interval_verdicts(tmp_path):
    v = V.conclude([V.from_interval(C, 2.0, 1.5, math.inf, 0.01, n_arm=3, n_base=3, mean_arm=5.0, mean_base=3.0,
                                    extra={"ratio_ci": [math.nan, 4.0]})])
    r = V.report(v)
    assert "5.00 (n=3)" in r and "nan" not in r and "bootstrap" in r and "**reproduced**" in r
    V.save(str(tmp_path / "art" / "mini"), "art", v, "s")
    got = V.load(str(tmp_path / "art" / "mini"))["verdicts"][0]
    assert got["extra"]["ratio_ci"] == [None, 4.0] and got["sd_arm"] is None and got["method"] == "bootstrap"
    assert "| `art` | x beats y | +2.00 | [+1.50, +inf] | reproduced | s |" in V.glance(str(tmp_path), "mini")
