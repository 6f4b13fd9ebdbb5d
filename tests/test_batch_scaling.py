"""The batch-scaling study's arithmetic: the fit of (S/S_min - 1)(E/E_min - 1) = 1 recovers the S_min, E_min
that generated synthetic steps-to-target data; the LR choice per batch size; bootstrap verdicts. (The smoke
edition runs with every artifact in test_reproduce.py.)"""

import math
import random

import pytest

from largebatch.experiments import verdicts as V
from largebatch.experiments.artifacts import batch_scaling as bs

BATCHES = [2 ** k for k in range(4, 14)]


def _steps(s_min, e_min, b):
    return s_min + e_min / b


def test_fit_recovers_exact_curve():
    s_min, e_min = 40.0, 40.0 * 300
    got = bs.fit_scaling(BATCHES, [_steps(s_min, e_min, b) for b in BATCHES])
    assert got == pytest.approx((s_min, e_min), rel=1e-9)
    assert bs.critical_batch(*got) == pytest.approx(300)
    # the curve is the paper's hyperbola: (S/S_min - 1)(E/E_min - 1) = 1 at every batch size
    for b in BATCHES:
        s = _steps(s_min, e_min, b)
        assert (s / s_min - 1) * (b * s / e_min - 1) == pytest.approx(1.0)


@pytest.mark.parametrize("s_min,b_crit", [(25.0, 64.0), (100.0, 1000.0), (10.0, 5000.0)])
def test_fit_recovers_noisy_synthetic_data(s_min, b_crit):
    rng = random.Random(int(s_min))
    e_min = s_min * b_crit
    fits = []
    for _ in range(50):  # 5% multiplicative noise, as a steps-to-target measurement has
        steps = [_steps(s_min, e_min, b) * math.exp(rng.gauss(0, 0.05)) for b in BATCHES]
        fits.append(bs.fit_scaling(BATCHES, steps))
    sm = sorted(f[0] for f in fits)[25]
    em = sorted(f[1] for f in fits)[25]
    assert sm == pytest.approx(s_min, rel=0.1) and em == pytest.approx(e_min, rel=0.1)


def test_fit_edge_cases():
    # perfect scaling only (S proportional to 1/B): S_min 0
    assert bs.fit_scaling([32, 64, 128], [100, 50, 25]) == pytest.approx((0.0, 3200.0))
    assert bs.critical_batch(0.0, 3200.0) == math.inf
    # no scaling at all: E_min 0
    assert bs.fit_scaling([32, 64, 128], [10, 10, 10]) == pytest.approx((10.0, 0.0))
    # batch sizes that never reached the target are left out; one point is not a fit
    with pytest.raises(ValueError, match="2 batch sizes"):
        bs.fit_scaling([32, 64], [10, math.inf])


def test_best_lr_per_batch_size():
    trials = {(32, 0.5): [100, 120], (32, 1): [80, 90], (32, 2): [math.inf, 50],  # diverged once: not chosen
              (64, 1): [math.inf, math.inf]}
    assert bs.best_steps(trials) == {32: 85}
    assert bs.best_steps(trials, [1, 1]) == {32: 50}


def _study(b_crit, seeds, rng, noise=0.05, s_min=30.0):
    """trials[(batch, mult)] = steps per seed: the best LR (mult 1) follows the curve, the others are slower."""
    trials = {}
    for b in BATCHES[:8]:
        for m, slow in ((0.5, 1.5), (1, 1.0), (2, 1.3)):
            trials[(b, m)] = [slow * _steps(s_min, s_min * b_crit, b) * math.exp(rng.gauss(0, noise))
                              for _ in range(seeds)]
    return trials


def _summary(trials):
    best = bs.best_steps(trials)
    s_min, e_min = bs.fit_scaling(list(best), list(best.values()))
    return {"b_crit": bs.critical_batch(s_min, e_min), "boot": bs.bootstrap_bcrit(trials, reps=300),
            "seeds": len(next(iter(trials.values())))}


def test_bootstrap_interval_covers_and_verdicts_follow_the_shared_rule():
    rng = random.Random(7)
    per = {"sgd": _summary(_study(100, 5, rng)), "wide": _summary(_study(400, 5, rng)),
           "same": _summary(_study(100, 5, rng)), "narrow": _summary(_study(25, 5, rng))}
    lo, hi = bs.percentile(per["sgd"]["boot"], 0.025), bs.percentile(per["sgd"]["boot"], 0.975)
    assert lo < 100 < hi and hi / lo < 2
    v = {x.claim.arm: x for x in bs.verdicts(per)}
    assert "sgd" not in v and all(x.method == "bootstrap" and x.claim.direction == "greater"
                                  and x.claim.min_effect == bs.MIN_EFFECT for x in v.values())
    # 4x SGD's B_crit: an extension by more than the doubling that matters, Holm p < 0.05
    w = v["wide"]
    assert w.verdict == V.REPRODUCED and w.extra["ratio"] == pytest.approx(4, rel=0.3)
    assert w.diff == pytest.approx(math.log2(w.extra["ratio"])) and w.lo > bs.MIN_EFFECT and w.p_holm < 0.05
    assert w.extra["ratio_ci"][0] == pytest.approx(2 ** w.lo)
    # as large as SGD's, or a quarter of it: an extension by a doubling is excluded
    assert v["same"].verdict == V.CONTRADICTED and v["same"].hi < bs.MIN_EFFECT
    assert v["narrow"].verdict == V.CONTRADICTED and v["narrow"].extra["ratio_ci"][1] < 1


def _per(arm_boot, base_boot=(100.0,) * 4, b_crit=None, seeds=3):
    return {"sgd": {"b_crit": 100.0, "boot": list(base_boot), "seeds": seeds},
            "lars": {"b_crit": b_crit if b_crit is not None else sorted(arm_boot)[len(arm_boot) // 2],
                     "boot": list(arm_boot), "seeds": seeds}}


def test_an_interval_across_the_effect_that_matters_is_inconclusive():
    # ratio 2 at the estimate, but the replicates run from 0.8x to 5x: neither shown nor excluded
    (v,) = bs.verdicts(_per([80.0, 150.0, 200.0, 260.0, 500.0] * 8, [100.0] * 40, b_crit=200.0))
    assert v.verdict == V.INCONCLUSIVE and v.lo < 0 < bs.MIN_EFFECT < v.hi and v.p_holm >= 0.05
    # a significant extension smaller than a doubling: not reproduced, not excluded either
    (v,) = bs.verdicts(_per([130.0, 150.0, 170.0, 210.0] * 10, [100.0] * 40, b_crit=150.0))
    assert v.p_holm < 0.05 and v.diff < bs.MIN_EFFECT <= v.hi and v.verdict == V.INCONCLUSIVE


def test_claims_are_holm_corrected_together():
    # 79 paired replicates, none at or below "no difference": bootstrap p = 2 * 1 / 80 = 0.025, ratio 3
    sgd = {"b_crit": 100.0, "boot": [100.0] * 79, "seeds": 3}
    lars = {"b_crit": 300.0, "boot": [300.0] * 79, "seeds": 3}
    (alone,) = bs.verdicts({"sgd": sgd, "lars": lars})
    assert alone.p_holm == pytest.approx(0.025) and alone.verdict == V.REPRODUCED
    # the same evidence twice in one artifact: Holm p 0.05 each, no longer enough
    both = bs.verdicts({"sgd": sgd, "lars": lars, "tvlars": dict(lars)})
    assert [v.p_holm for v in both] == [pytest.approx(0.05)] * 2
    assert [v.verdict for v in both] == [V.INCONCLUSIVE] * 2


def test_one_seed_is_inconclusive_and_missing_results_not_run():
    rng = random.Random(1)
    per = {"sgd": _summary(_study(100, 1, rng)), "lars": _summary(_study(300, 1, rng))}
    assert per["sgd"]["boot"] == []
    (v, lamb) = bs.verdicts(per, optimizers=["sgd", "lars", "lamb"])
    assert v.verdict == V.INCONCLUSIVE and v.note == "fewer than 2 seeds in an arm"
    assert v.extra["ratio"] == pytest.approx(3, rel=0.3)
    assert lamb.verdict == V.NOT_RUN and lamb.claim.id == "lamb-extends"


def test_eval_steps_resolution():
    s = bs.eval_steps(1000)
    assert s[:10] == list(range(1, 11)) and s[-1] == 1000
    assert all(b / a <= bs.EVAL_GROWTH + 1 / a for a, b in zip(s, s[1:]))
    assert len(s) < 90


def test_every_trial_is_a_valid_training_configuration(tmp_path):
    from largebatch.experiments.artifacts import ARTIFACTS
    from largebatch.experiments.reproduce import context
    from largebatch.train.config import resolve

    art = ARTIFACTS["batch-scaling"]
    for scale in art.scales:
        ctx = context(art, scale, None, str(tmp_path), {})
        runs = ctx.grid()
        s = bs.SCALE[scale]
        trials = [r for r in runs if r.tags["stage"] == "trial"]
        assert len(trials) == len(s["optimizers"]) * len(s["batches"]) * len(s["multipliers"]) * len(ctx.seeds)
        for r in runs:
            fields = {k: v for k, v in r.cfg.items() if k not in ("target", "max_epochs", "batches", "noise")}
            resolve(overrides={**fields, "out_dir": str(tmp_path)})


def test_degenerate_fits_are_inconclusive_instead_of_failing():
    # SGD's steps do not fall with the batch: E_min 0, B_crit 0 -> no ratio to it
    per = {"sgd": {"b_crit": 0.0, "boot": [0.0, 0.0], "seeds": 2},
           "lars": {"b_crit": 300.0, "boot": [280.0, 320.0], "seeds": 2}}
    (v,) = bs.verdicts(per)
    assert v.verdict == V.INCONCLUSIVE and v.note == "momentum SGD's B_crit is 0: no ratio"
    # no fit (the target met at too few batch sizes)
    per["sgd"]["b_crit"] = math.nan
    assert bs.verdicts(per)[0].note.startswith("no fit for momentum SGD")
    # replicates without a fit are NaN, kept in place so that optimizers' replicates stay paired
    per = {"sgd": {"b_crit": 100.0, "boot": [100.0, math.nan, 110.0], "seeds": 3},
           "lars": {"b_crit": 300.0, "boot": [300.0, 310.0, math.nan], "seeds": 3}}
    (v,) = bs.verdicts(per)
    assert v.extra["ratio_ci"] == [pytest.approx(3.0), pytest.approx(3.0)] and v.extra["replicates"] == 1
    assert bs.percentile([1.0, math.inf, math.nan], 0.975) == math.inf


def test_verdicts_are_saved_for_the_at_a_glance_table(tmp_path):
    rng = random.Random(3)
    per = {"sgd": _summary(_study(100, 4, rng)), "lars": _summary(_study(400, 4, rng))}
    V.save(str(tmp_path / "batch-scaling" / "mini"), "batch-scaling", bs.verdicts(per), "stamp")
    got = V.load(str(tmp_path / "batch-scaling" / "mini"))
    assert got["verdicts"][0]["method"] == "bootstrap" and got["verdicts"][0]["extra"]["b_crit"] == per["lars"]["b_crit"]
    g = V.glance(str(tmp_path), "mini")
    assert "`batch-scaling`" in g and "LARS extends perfect scaling beyond momentum SGD's" in g and "| reproduced |" in g


def test_best_mults_names_the_chosen_lr():
    trials = {(32, 0.5): [100, 120], (32, 1): [80, 90], (64, 1): [50, 50], (64, 2): [40, 30]}
    assert bs.best_mults(trials) == {32: 1, 64: 2}
