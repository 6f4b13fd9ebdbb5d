"""The batch-scaling study's arithmetic: the fit of (S/S_min - 1)(E/E_min - 1) = 1 recovers the S_min, E_min
that generated synthetic steps-to-target data; the LR choice per batch size; bootstrap verdicts. (The smoke
edition runs with every artifact in test_reproduce.py.)"""

import math
import random

import pytest

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
    return {"b_crit": bs.critical_batch(s_min, e_min), "boot": bs.bootstrap_bcrit(trials, reps=300)}


def test_bootstrap_interval_covers_and_verdicts():
    rng = random.Random(7)
    per = {"sgd": _summary(_study(100, 5, rng)), "wide": _summary(_study(400, 5, rng)),
           "same": _summary(_study(100, 5, rng)), "narrow": _summary(_study(25, 5, rng))}
    lo, hi = bs.percentile(per["sgd"]["boot"], 0.025), bs.percentile(per["sgd"]["boot"], 0.975)
    assert lo < 100 < hi and hi / lo < 2
    v = {x["optimizer"]: x for x in bs.verdicts(per)}
    assert v["wide"]["verdict"] == "extends" and v["wide"]["ci"][0] > 1 and v["wide"]["ratio"] == pytest.approx(4, rel=0.3)
    assert v["narrow"]["verdict"] == "shrinks"
    assert v["same"]["verdict"] == "inconclusive"
    assert "sgd" not in v


def test_one_seed_has_no_interval():
    rng = random.Random(1)
    per = {"sgd": _summary(_study(100, 1, rng)), "lars": _summary(_study(300, 1, rng))}
    assert per["sgd"]["boot"] == []
    (v,) = bs.verdicts(per)
    assert v["verdict"] == "no interval (one seed)" and v["ratio"] == pytest.approx(3, rel=0.3)


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


def test_degenerate_fits_give_no_verdict_instead_of_failing():
    # SGD's steps do not fall with the batch: E_min 0, B_crit 0 -> no ratio to it
    per = {"sgd": {"b_crit": 0.0, "boot": [0.0, 0.0]}, "lars": {"b_crit": 300.0, "boot": [280.0, 320.0]}}
    assert bs.verdicts(per) == []
    # replicates without a fit are NaN, kept in place so that optimizers' replicates stay paired
    per = {"sgd": {"b_crit": 100.0, "boot": [100.0, math.nan, 110.0]},
           "lars": {"b_crit": 300.0, "boot": [300.0, 310.0, math.nan]}}
    (v,) = bs.verdicts(per)
    assert v["ci"] == (3.0, 3.0) and v["verdict"] == "extends"
    assert bs.percentile([1.0, math.inf, math.nan], 0.975) == math.inf


def test_best_mults_names_the_chosen_lr():
    trials = {(32, 0.5): [100, 120], (32, 1): [80, 90], (64, 1): [50, 50], (64, 2): [40, 30]}
    assert bs.best_mults(trials) == {32: 1, 64: 2}
