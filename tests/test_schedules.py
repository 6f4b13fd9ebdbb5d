import math

import pytest
import torch

from largebatch.schedules import polynomial, scale_lr, tvlars_lambda, tvlars_phi, warmup_cosine


def test_warmup_cosine_matches_spec():
    T, Tw, lr, lr_min = 100, 20, 2.0, 0.1
    f = warmup_cosine(T, Tw, min_ratio=lr_min / lr)
    for t in range(0, 130, 7):
        if t < Tw:
            want = lr * t / Tw
        else:
            q = (1 + math.cos(math.pi * min(t - Tw, T - Tw) / (T - Tw))) / 2
            want = lr * q + lr_min * (1 - q)
        assert lr * f(t) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert f(0) == 0 and f(Tw) == pytest.approx(1) and lr * f(T) == pytest.approx(lr_min)


def test_polynomial_matches_spec():
    T, Tw, lr, lr_end = 50, 10, 1.0, 0.01
    f = polynomial(T, Tw, power=2, end_ratio=lr_end / lr)
    for t in range(0, 60, 3):
        want = lr * t / Tw if t < Tw else (lr - lr_end) * (1 - min(t - Tw, T - Tw) / (T - Tw)) ** 2 + lr_end
        assert lr * f(t) == pytest.approx(want, rel=1e-12, abs=1e-12)
    g = polynomial(10, power=1.0)
    assert [g(t) for t in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


@pytest.mark.parametrize("lam,alpha,delay,gmin", [(1e-4, 1.0, 0, 0.0), (1e-3, 0.1, 500, 0.004), (0.05, -0.5, 5, 0.0),
                                                  (0.0, 1.0, 0, 0.1)])
def test_tvlars_phi_non_increasing_and_within_eq9_bounds(lam, alpha, delay, gmin):
    ts = list(range(0, 20000, 37))
    phis = [tvlars_phi(t, lam, alpha, delay, gmin) for t in ts]
    upper = 1 / (alpha + math.exp(-lam * delay)) + gmin
    assert all(a >= b for a, b in zip(phis, phis[1:]))
    assert all(gmin <= p <= upper + 1e-15 for p in phis)
    assert phis[0] == pytest.approx(upper)
    if lam > 0:
        assert tvlars_phi(10**9, lam, alpha, delay, gmin) == pytest.approx(gmin)  # no overflow


def test_tvlars_lambda_drives_any_optimizer():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=3.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, tvlars_lambda(lam=0.1, delay=5))
    for t in range(8):
        assert opt.param_groups[0]["lr"] == pytest.approx(3.0 * tvlars_phi(t, lam=0.1, delay=5))
        opt.step()
        sched.step()


def test_scale_lr():
    assert scale_lr(0.1, 4096, 256) == pytest.approx(1.6)
    assert scale_lr(0.1, 4096, 256, "sqrt") == pytest.approx(0.4)
    assert scale_lr(0.1, 4096, 256, "none") == 0.1


@pytest.mark.parametrize("call,field", [
    (lambda: warmup_cosine(0), "total_steps"),
    (lambda: warmup_cosine(10, 11), "warmup_steps"),
    (lambda: warmup_cosine(10, 2, min_ratio=2.0), "min_ratio"),
    (lambda: polynomial(10, power=0), "power"),
    (lambda: tvlars_phi(0, lam=-1.0), "lam"),
    (lambda: tvlars_lambda(alpha=-1.0), "alpha"),
    (lambda: tvlars_phi(0, lam=0.05, alpha=-0.5, delay=20), "alpha"),
    (lambda: scale_lr(0.1, 64, 0), "base_batch_size"),
    (lambda: scale_lr(0.1, 64, 32, rule="cubic"), "rule"),
])
def test_bad_schedule_arguments(call, field):
    with pytest.raises(ValueError, match=field):
        call()
