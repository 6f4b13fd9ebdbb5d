"""The gradient noise scale B_simple = tr(Sigma) / |G|^2: both estimators against a problem whose
gradient covariance is known exactly, DDP (2 Gloo processes) against micro-batches, per-layer sums,
and the ``largebatch train --noise-scale`` columns."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from forked import free_port, init_gloo
from largebatch import noise_scale as ns
from largebatch.train import data
from largebatch.train.config import TrainConfig
from largebatch.train.loop import train
from largebatch.train.rundir import read_table

pytestmark = pytest.mark.usefixtures("one_thread")

D1, D2, SIGMA = 3, 5, 0.7


class Split(nn.Module):
    """Linear regression ``y = w1 . x[:D1] + w2 . x[D1:]`` as two layers (two parameter tensors)."""

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.a = nn.Linear(D1, 1, bias=False)
        self.b = nn.Linear(D2, 1, bias=False)
        with torch.no_grad():  # the true weights are 0, so w = delta = w - w*
            self.a.weight.copy_(delta[:, :D1])
            self.b.weight.copy_(delta[:, D1:])

    def forward(self, x):
        return (self.a(x[:, :D1]) + self.b(x[:, D1:])).squeeze(1)


def _truth(delta: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per layer (tr Sigma_k, |G_k|^2) of f_i = (x_i . w - eps_i)^2 / 2 with x ~ N(0, I), eps ~ N(0, SIGMA^2),
    true weights 0: g_i = x_i r_i, r_i = x_i . delta - eps_i, G = delta, and by Isserlis' theorem
    E[x_j^2 (x . delta)^2] = |delta|^2 + 2 delta_j^2, so tr Sigma_k = d_k |delta|^2 + |delta_k|^2 + SIGMA^2 d_k."""
    d2 = float(delta.pow(2).sum())
    parts = (delta[0, :D1], delta[0, D1:])
    trace = [len(p) * d2 + float(p.pow(2).sum()) + SIGMA ** 2 * len(p) for p in parts]
    return trace, [float(p.pow(2).sum()) for p in parts]


def _batch(gen, b):
    x = torch.randn(b, D1 + D2, generator=gen, dtype=torch.float64)
    return x, SIGMA * torch.randn(b, generator=gen, dtype=torch.float64)


def _loss_sum(model, x, y):
    return 0.5 * (model(x) - y).pow(2).sum()


def _check_converges(per_step: list[tuple[torch.Tensor, torch.Tensor]], delta):
    """The mean over T steps of the unbiased per-step estimates is within 5 standard errors
    (std / sqrt(T), from the steps themselves) of the truth, per layer; the whole-model ratio of the
    EMAs (decay 1 - 1/T: about T steps of memory) within the error that propagates to the ratio."""
    trace = torch.stack([t for t, _ in per_step])
    gsq = torch.stack([g for _, g in per_step])
    T = trace.shape[0]
    true_tr, true_g = _truth(delta)
    for est, truth in ((trace, true_tr), (gsq, true_g)):
        se = est.std(0) / math.sqrt(T)
        assert (est.mean(0) - torch.tensor(truth, dtype=est.dtype)).abs().le(5 * se).all(), (est.mean(0), truth, se)
    beta = 1 - 1 / T
    ema = ns.NoiseScaleEMA(decay=beta)
    for t, g in per_step:
        ema.update(t, g)
    w = beta ** torch.arange(T - 1, -1, -1, dtype=torch.float64)  # the EMA's weights of the steps
    shrink = float(w.pow(2).sum().sqrt() / w.sum())  # its standard error per unit of a step's std
    b_true = sum(true_tr) / sum(true_g)
    se_tr, se_g = trace.sum(1).std() * shrink, gsq.sum(1).std() * shrink
    tol = 5 * b_true * math.sqrt((se_tr / sum(true_tr)) ** 2 + (se_g / sum(true_g)) ** 2)  # delta method
    assert abs(float(ema.value()) - b_true) < tol, (float(ema.value()), b_true, tol)
    assert tol < 0.25 * b_true  # the test has the power to tell a wrong estimator


DELTA = torch.tensor([[0.6, -0.3, 0.2, 0.5, -0.4, 0.1, 0.3, -0.2]], dtype=torch.float64)


def test_truth_by_monte_carlo():
    """The closed form of the test problem (its covariance) against per-sample gradients drawn directly."""
    gen = torch.Generator().manual_seed(1)
    x, eps = _batch(gen, 200_000)
    r = x @ DELTA[0] - eps
    g = x * r[:, None]
    tr, gsq = _truth(DELTA)
    for k, sl in enumerate((slice(0, D1), slice(D1, None))):
        assert g[:, sl].var(0).sum().item() == pytest.approx(tr[k], rel=0.02)
        assert g[:, sl].mean(0).pow(2).sum().item() == pytest.approx(gsq[k], abs=0.01)


def test_two_batch_estimator_micro_batches_converges():
    gen = torch.Generator().manual_seed(2)
    model = Split(DELTA).double()
    params = list(model.parameters())
    meter = ns.MicroBatchNorms(params, ["a", "b"], b_small=8, b_big=32)
    out = []
    for _ in range(600):
        x, y = _batch(gen, 32)
        for j in range(4):
            (_loss_sum(model, x[8 * j:8 * (j + 1)], y[8 * j:8 * (j + 1)]) / 32).backward()
            meter.micro_batch_done(weight=4.0, last=j == 3)
        small, big = meter.measure()
        out.append(ns.unbiased_estimates(small, big, meter.b_small, meter.b_big))
        model.zero_grad(set_to_none=True)
    _check_converges(out, DELTA)


def _per_sample_estimates(sizes=None):
    """600 batches of 16 through ``PerSampleNorms``; the estimates with the meter's batch sizes,
    or with ``sizes`` ``(b_small, b_big)`` in their place."""
    gen = torch.Generator().manual_seed(3)
    model = Split(DELTA).double()
    meter = ns.PerSampleNorms(model, b_big=16)
    out = []
    for _ in range(600):
        x, y = _batch(gen, 16)
        meter.loss_scale = 1 / 16
        (_loss_sum(model, x, y) / 16).backward()
        small, big = meter.measure()
        out.append(ns.unbiased_estimates(small, big, *(sizes or (meter.b_small, meter.b_big))))
        model.zero_grad(set_to_none=True)
    meter.remove()
    return out


def test_per_sample_estimator_converges():
    _check_converges(_per_sample_estimates(), DELTA)


def test_a_wrong_batch_size_is_detected():
    """The tolerance is tight enough to fail an estimator fed the wrong batch size."""
    out = _per_sample_estimates(sizes=(1, 12))  # wrong: the batch had 16 samples
    with pytest.raises(AssertionError):
        _check_converges(out, DELTA)


def test_measure_per_sample_on_batches_and_layer_sums():
    gen = torch.Generator().manual_seed(4)
    model = Split(DELTA).double()
    batches = [(_batch(gen, 64)) for _ in range(300)]
    res = ns.measure_per_sample(model, batches, lambda out, y: 0.5 * (out - y).pow(2).sum())
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    tr, gsq = _truth(DELTA)
    assert res.value == pytest.approx(sum(tr) / sum(gsq), rel=0.1)
    # per layer: the whole-model value is the ratio of the sums of the layers' terms
    assert res.value == pytest.approx(math.fsum(res.trace) / math.fsum(res.gsq), rel=1e-12)
    assert set(res.layers) == {"a.weight", "b.weight"}
    assert res.layers["a.weight"] == pytest.approx(res.trace[0] / res.gsq[0])
    assert res.layers["a.weight"] == pytest.approx(tr[0] / gsq[0], rel=0.15)


def test_unbiased_estimates_formula_and_errors():
    # E|G_B|^2 = |G|^2 + tr/B exactly recovers (tr, |G|^2)
    tr, g = torch.tensor([3.0, 10.0]), torch.tensor([0.5, 2.0])
    t, gg = ns.unbiased_estimates(g + tr / 4, g + tr / 64, 4, 64)
    assert torch.allclose(t, tr) and torch.allclose(gg, g)
    with pytest.raises(ValueError, match="b_small < b_big"):
        ns.unbiased_estimates(g, g, 8, 8)
    with pytest.raises(ValueError, match="decay"):
        ns.NoiseScaleEMA(1.0)
    with pytest.raises(ValueError, match="micro-batch"):
        ns.MicroBatchNorms([nn.Parameter(torch.ones(1))], b_small=4, b_big=4)


def test_ema_bias_correction_and_state():
    ema = ns.NoiseScaleEMA(0.9)
    ema.update(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0]))
    assert ema.trace.tolist() == pytest.approx([2.0, 4.0])  # bias-corrected: the first value itself
    assert float(ema.value()) == pytest.approx(3.0)
    ema.update(torch.tensor([4.0, 8.0]), torch.tensor([1.0, 3.0]))
    other = ns.NoiseScaleEMA()
    other.load_state_dict(ema.state_dict())
    assert torch.allclose(other.trace, ema.trace.double()) and other.t == 2


# ----------------------------------------------------------------------------- DDP vs micro-batches
M, STEPS = 8, 3


def _fixed_data():
    gen = torch.Generator().manual_seed(5)
    return [_batch(gen, 2 * M) for _ in range(STEPS)]


def _single_process_micro_batches():
    torch.manual_seed(0)
    model = Split(DELTA).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meter = ns.MicroBatchNorms(list(model.parameters()), b_small=M, b_big=2 * M)
    out = []
    for x, y in _fixed_data():
        for j in range(2):  # rows of "rank" j = micro-batch j
            (_loss_sum(model, x[j * M:(j + 1) * M], y[j * M:(j + 1) * M]) / (2 * M)).backward()
            meter.micro_batch_done(weight=2.0, last=j == 1)
        out.append(meter.measure())
        opt.step()
        opt.zero_grad()
    return torch.stack(out)


def _ddp_worker(rank, world, port, result_dir, run_dir):
    init_gloo(rank, world, port)
    model = Split(DELTA).double()
    ddp = nn.parallel.DistributedDataParallel(model)
    meter = ns.DDPLocalNorms(ddp, list(model.parameters()), b_small=M, b_big=2 * M)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for x, y in _fixed_data():
        (_loss_sum(ddp, x[rank * M:(rank + 1) * M], y[rank * M:(rank + 1) * M]) / M).backward()
        out.append(meter.measure())
        opt.step()
        opt.zero_grad()
    rec = torch.stack(out)
    rec[:, 0] = ns.average_over_ranks(rec[:, 0].contiguous())
    torch.save(rec, os.path.join(result_dir, f"rank{rank}.pt"))
    # the harness under DDP: each rank's rows against the global batch (one process per rank)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    res = train(_cfg(run_dir), log=lambda s: None)
    torch.save(res.history, os.path.join(result_dir, f"hist{rank}.pt"))


def _cfg(out, **kw):
    base = dict(dataset="digits", model="mlp", mlp_depth=1, mlp_width=16, mlp_batchnorm=False, batch_size=128,
                epochs=2, optimizer="sgd", lr=0.05, out_dir=out, progress=False, stats_every=0, device="cpu",
                noise_scale=True, checkpoint=True)
    base.update(kw)
    return TrainConfig(**base)


def test_ddp_two_processes_equal_one_process_with_two_micro_batches(tmp_path):
    data.load("digits")  # warm the imports: forked workers inherit them
    run_dir = str(tmp_path / "ddp-run")
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(tmp_path), run_dir), nprocs=2, join=True,
                       start_method="fork")
    single = _single_process_micro_batches()
    for r in (0, 1):
        ddp = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.allclose(ddp, single, rtol=1e-10, atol=0), (ddp, single)
    assert (single[:, 0] > single[:, 1]).all()  # the small batch's norm is the larger: noise is measured
    # the harness under DDP: same values on both ranks, written once by rank 0
    h0, h1 = (torch.load(tmp_path / f"hist{r}.pt", weights_only=False) for r in (0, 1))
    assert [h["noise_scale"] for h in h0] == [h["noise_scale"] for h in h1]
    assert all(math.isfinite(h["noise_scale"]) and h["noise_scale"] > 0 for h in h0)
    steps = read_table(os.path.join(run_dir, "steps.csv"))
    assert len(steps) == 2 * 11 and all(math.isfinite(r["noise_scale"]) for r in steps)


# ----------------------------------------------------------------------------- the harness
def test_train_noise_scale_columns_layer_sums_and_resume(tmp_path):
    out = str(tmp_path / "run")
    res = train(_cfg(out, micro_batch_size=32, epochs=3, stop_after_epochs=2), log=lambda s: None)
    assert res.status == "stopped"
    res = train(_cfg(out, micro_batch_size=32, epochs=3, resume=True), log=lambda s: None)
    full = train(_cfg(str(tmp_path / "full"), micro_batch_size=32, epochs=3), log=lambda s: None)
    # a resumed run continues the EMA exactly
    assert [h["noise_scale"] for h in res.history] == pytest.approx([h["noise_scale"] for h in full.history],
                                                                    rel=1e-9)
    metrics = read_table(os.path.join(out, "metrics.csv"))
    steps = read_table(os.path.join(out, "steps.csv"))
    layers = read_table(os.path.join(out, "noise_scale.csv"))
    assert [r["epoch"] for r in metrics] == [1, 2, 3] and len(steps) == 3 * 11
    assert len(layers) == 3 * 4  # 4 parameter tensors, once per epoch (no duplicate after the resume)
    for m in metrics:  # per-layer sums give the whole-model value of the epoch's last step
        rows = [r for r in layers if r["step"] == m["step"]]
        tr, g = math.fsum(r["trace"] for r in rows), math.fsum(r["gsq"] for r in rows)
        assert tr / g == pytest.approx(m["noise_scale"], rel=1e-9)
        last = next(s for s in steps if s["step"] == m["step"] - 1)
        assert last["noise_scale"] == pytest.approx(m["noise_scale"], rel=1e-9)
        assert last["noise_trace"] == pytest.approx(tr, rel=1e-9) and last["noise_gsq"] == pytest.approx(g, rel=1e-9)
        for r in rows:
            assert r["noise_scale"] == pytest.approx(r["trace"] / r["gsq"], rel=1e-9)


def test_train_noise_scale_per_sample_and_refusals(tmp_path):
    res = train(_cfg(str(tmp_path / "ps"), epochs=1), log=lambda s: None)  # one process, no accumulation: per_sample
    assert res.history[0]["noise_scale"] > 0
    from largebatch.train.plot import plot_noise_scale, plot_runs

    made = plot_runs([str(tmp_path / "ps")], str(tmp_path / "plots"))
    assert str(tmp_path / "plots" / "noise-scale.png") in made
    assert (tmp_path / "plots" / "noise-scale.png").read_bytes()[:4] == b"\x89PNG"
    plain = train(_cfg(str(tmp_path / "plain"), epochs=1, noise_scale=False), log=lambda s: None)
    assert "noise_scale" not in plain.history[0] and "noise_scale" not in read_table(str(tmp_path / "plain" / "steps.csv"))[0]
    assert plot_noise_scale([str(tmp_path / "plain")], str(tmp_path / "none.png")) is None
    with pytest.raises(ValueError, match="noise_scale_method: two_batch needs two batch sizes"):
        train(_cfg(str(tmp_path / "x"), noise_scale_method="two_batch"), log=lambda s: None)
    with pytest.raises(ValueError, match="noise_scale_ema"):
        _cfg(str(tmp_path / "y"), noise_scale_ema=1.0).validate()
    with pytest.raises(ValueError, match="noise_scale_method"):
        _cfg(str(tmp_path / "y"), noise_scale_method="exact").validate()
    assert not os.path.exists(tmp_path / "x")
    from largebatch.train.pretrain import BarlowTwinsTask, PretrainConfig

    with pytest.raises(ValueError, match="noise_scale: not supported by pretrain"):
        train(PretrainConfig(dataset="digits", out_dir=str(tmp_path / "bt"), noise_scale=True, device="cpu"),
              log=lambda s: None, task=BarlowTwinsTask())
    assert not os.path.exists(tmp_path / "bt")


def test_noise_scale_command(capsys):
    from largebatch.cli import main

    args = ["noise-scale", "--dataset", "digits", "--model", "mlp", "--mlp-width", "16", "--mlp-depth", "1",
            "--batch-size", "64", "--optimizer", "sgd", "--lr", "0.05", "--device", "cpu"]
    assert main(args + ["--steps", "4", "--init-batches", "2", "--every", "2", "--micro-batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "two_batch estimator (B_small 16, B_big 64)" in out and out.count("B_simple (EMA)") == 2
    line = next(s for s in out.splitlines() if s.startswith("estimated critical batch size"))
    assert "at initialisation" in line and "after 4 steps" in line
    assert main(args + ["--steps", "0", "--noise-scale-method", "two_batch"]) == 2
    assert "two_batch needs two batch sizes" in capsys.readouterr().err


def test_per_sample_on_an_unsupported_layer_is_a_user_error():
    from largebatch.train.noise import per_sample_meter

    with pytest.raises(ValueError, match="per_sample cannot measure this model .*ConvTranspose1d.*use two_batch"):
        per_sample_meter(nn.Sequential(nn.Linear(3, 4), nn.ConvTranspose1d(4, 4, 1)), 8, None)
