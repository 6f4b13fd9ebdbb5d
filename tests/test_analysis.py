"""Tests for largebatch.analysis (LALC paper: Prop. 1, Thm. 1-2, Cor. 2, Fig. 1, Fig. 3)."""

import json
import math

import numpy as np
import pytest
import torch

from largebatch.analysis import architectures as A
from largebatch.analysis import explosion as E
from largebatch.analysis import theory as T

# Deep-MLP setting of the issue: width >= 512, >= 20 blocks, large batch.
DEEP = dict(depth=20, width=512, batch=1024)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- Proposition 1
@pytest.mark.parametrize("mu,sigma", [(-1.0, 1.0), (-0.5, 2.0), (0.0, 1.0), (0.0, 0.3), (0.7, 1.0), (2.0, 0.5)])
def test_prop1_matches_monte_carlo(mu, sigma):
    m_mc, v_mc = T.relu_gaussian_monte_carlo(mu, sigma, n=4_000_000, seed=7)
    assert abs(m_mc - T.relu_gaussian_mean(mu, sigma)) / T.relu_gaussian_mean(mu, sigma) < 1e-2
    assert abs(v_mc - T.relu_gaussian_var(mu, sigma)) / T.relu_gaussian_var(mu, sigma) < 1e-2


def test_prop1_known_values_and_errors():
    assert T.relu_gaussian_mean(0.0, 1.0) == pytest.approx(1 / math.sqrt(2 * math.pi), rel=1e-12)
    assert T.relu_gaussian_var(0.0, 1.0) == pytest.approx((math.pi - 1) / (2 * math.pi), rel=1e-12)
    # pseudo-linear limit: ReLU(N(mu, s^2)) ~ N(mu, s^2) for mu >> s; fully blocked for mu << -s
    assert T.relu_gaussian_var(30.0, 1.0) == pytest.approx(1.0, rel=1e-9)
    assert T.relu_gaussian_mean(-30.0, 1.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="sigma"):
        T.relu_gaussian_var(0.0, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        T.relu_gaussian_mean(0.0, -1.0)


def test_theoretical_factors():
    assert T.THM1_FACTOR == pytest.approx(1.4669, abs=1e-4)
    assert T.THM2_PAPER_FACTOR == pytest.approx(0.6110, abs=1e-4)
    assert T.relu_block_factor(0.0, 1.0) == pytest.approx(T.THM1_FACTOR, rel=1e-12)
    assert T.relu_block_factor(20.0, 1.0) == pytest.approx(1.0, rel=1e-9)  # Cor. 2
    assert T.activation_factor(torch.relu) == pytest.approx(T.THM1_FACTOR, rel=1e-4)
    assert T.activation_factor(lambda z: z) == pytest.approx(1.0, rel=1e-9)
    # smoother ReLU variants explode less (Fig. 1b ordering)
    assert 1.0 < T.activation_factor(torch.nn.functional.elu) < T.activation_factor(torch.nn.functional.gelu) < T.THM1_FACTOR


# ---------------------------------------------------------------- estimator
def test_per_block_factor_and_rates_on_exact_geometric_curve():
    v = 3.0 * 1.3 ** np.arange(30)[::-1]  # Var(g^n) grows by 1.3 per block towards the input
    assert E.per_block_factor(v) == pytest.approx(1.3, rel=1e-10)
    r = E.rates(v)
    assert r[-1] == 1.0 and r[0] == pytest.approx(1.3 ** 14.5, rel=1e-10)
    with pytest.raises(ValueError, match="trim"):
        E.per_block_factor(v, trim=0.6)


def test_recorder_captures_every_norm_layer_and_removes_hooks():
    torch.manual_seed(0)
    model, shape = A.build("vgg-bn", depth=5, width=4, act="relu", image_size=8)
    st = E.measure_gradients(model, torch.randn(16, *shape))
    assert [s["name"] for s in st] == [n for n, _ in A.norm_modules(model)]
    # last block receives the random projection R ~ N(0,1): per-coordinate Var(g^N) ~ 1
    assert st[-1]["var_g_mean"] == pytest.approx(1.0, rel=0.15)
    assert all(not m._forward_hooks for _, m in A.norm_modules(model))
    mlp, shape = A.build("mlp-bn", depth=3, width=16)
    st = E.measure_gradients(mlp, torch.randn(64, *shape))
    assert all(s["var_x_mean"] == pytest.approx(64 / 63, rel=1e-3) for s in st)  # BN output, gamma = 1


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="activation"):
        A.make_activation("relu6")
    with pytest.raises(ValueError, match="arch"):
        A.build("mlp-gn", 3, 8)
    with pytest.raises(ValueError, match="batch"):
        E.measure_architecture("mlp-bn", depth=3, width=8, batch=1)


# ---------------------------------------------------------------- Theorem 1 / Cor. 2 / LayerNorm, deep nets
def test_deep_bn_relu_mlp_matches_theorem1():
    r = E.measure_architecture("mlp-bn", "relu", seeds=(0,), **DEEP)
    assert len(r["blocks"]) == DEEP["depth"] + 1
    assert r["factor_mean"] == pytest.approx(T.THM1_FACTOR, rel=0.05)


def test_deep_bn_identity_mlp_matches_corollary2():
    r = E.measure_architecture("mlp-bn", "identity", seeds=(0,), **DEEP)
    assert r["factor_mean"] == pytest.approx(1.0, rel=0.05)


def test_layernorm_mlp_does_not_explode():
    r = E.measure_architecture("mlp-ln", "relu", seeds=(0,), **DEEP)
    assert r["factor_mean"] <= 1.05
    assert max(r["rate_mean"]) < 2.0  # vs ~ 1.21^20 ~ 45 for BN


def test_single_block_theorem1_and_corollary2():
    assert E.single_block_independent(0.0, 1.0, batch=4096)["measured"] == pytest.approx(T.THM1_FACTOR, rel=0.02)
    assert E.single_block_independent(8.0, 1.0, batch=4096)["measured"] == pytest.approx(1.0, rel=0.02)


# ---------------------------------------------------------------- Theorem 2
def test_theorem2_correlated_single_block():
    for seed in (0, 1):
        r = E.single_block_correlated(d_in=256, d_out=512, batch=8192, seed=seed)
        # the measured ratio respects the printed bound and the corrected one (it is far above both) ...
        assert r["measured"] >= r["paper_bound"]
        assert r["measured"] >= 0.95 * r["corrected_bound"]
        # ... and matches the Jensen-free value for this draw of W (eq. 16 + eq. 23, with BN's eps)
        assert r["measured"] == pytest.approx(r["conditional"], rel=0.03)
        # E[Var before BN] follows the corrected eq. 24, (pi-1)/(2 pi) sigma_w^2 sum t^2, not the printed one
        assert r["prenorm_var_mean"] == pytest.approx(r["prenorm_var_expected"], rel=0.1)
        printed = r["prenorm_var_expected"] * (math.pi + 1) / (math.pi - 1)
        assert abs(r["prenorm_var_mean"] - printed) / printed > 0.3


def test_theorem2_expected_prenorm_variance_formula():
    rng = np.random.default_rng(0)
    t = rng.normal(size=64)
    w = rng.normal(size=(200_000, 64)) * 0.1
    v = T.thm2_prenorm_var(w, t)
    assert v.mean() == pytest.approx(T.thm2_expected_prenorm_var(0.01, t), rel=0.01)
    assert np.all(v >= 0)


# ---------------------------------------------------------------- dynamics, plots, CLI
def test_dynamics_records_fig3_metrics(tmp_path):
    from largebatch.analysis.dynamics import METRICS, summarize, track_dynamics
    from largebatch.analysis.plots import plot_dynamics

    res = track_dynamics(depth=4, width=32, steps=6, log_every=3, batch=128, seed=0, data="synthetic", lr=0.05)
    assert res["steps"] == [0, 3, 6]
    for m in METRICS:
        arr = np.asarray(res["metrics"][m])
        assert arr.shape == (3, 5) and np.all(np.isfinite(arr))
    x = np.asarray(res["metrics"]["var_x"])
    assert np.allclose(x[0], 1.0, atol=0.02) and np.allclose(x, 1.0, atol=0.1)  # BN output ~ 1 (Fig. 3)
    assert np.allclose(res["metrics"]["var_w"][0][1:], 0.01 ** 2, rtol=0.25)  # init N(0, 0.01^2)
    assert np.allclose(res["metrics"]["mean_std"][0], 0.0, atol=1e-6)  # beta = 0 at init
    assert res["loss"][-1] < res["loss"][0]
    assert len(summarize(res)) == 3
    assert plot_dynamics(res, str(tmp_path / "d.png")) and (tmp_path / "d.png").stat().st_size > 0
    with pytest.raises(ValueError, match="init_std"):
        track_dynamics(init_std=0.0)


def test_cli_rates_and_plot(tmp_path, capsys):
    from largebatch.cli import main

    out = str(tmp_path)
    assert main(["explosion", "rates", "--arch", "mlp-bn", "mlp-ln", "--depth", "4", "--width", "32",
                 "--batch", "64", "--seeds", "2", "--out", out, "--tag", "t"]) == 0
    text = capsys.readouterr().out
    assert "mlp-bn" in text and "mlp-ln" in text and "factor" in text
    data = json.load(open(tmp_path / "explosion_t.json"))
    assert [r["arch"] for r in data["results"]] == ["mlp-bn", "mlp-ln"]
    assert len(data["results"][0]["var_g"]) == 2
    assert (tmp_path / "explosion_t.png").stat().st_size > 0
    (tmp_path / "explosion_t.png").unlink()
    assert main(["explosion", "plot", "--out", out]) == 0
    assert (tmp_path / "explosion_t.png").exists()
    with pytest.raises(SystemExit):
        main(["explosion", "rates", "--depth", "0"])
