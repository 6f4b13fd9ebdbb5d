"""The training loop: outputs, step arithmetic, diagnostics, exact resume, accumulation, non-finite stop."""

import json
import math
import os

import pytest
import torch

from largebatch.cli import main
from largebatch.train import data
from largebatch.train import factory
from largebatch.train.config import TrainConfig
from largebatch.train.loop import train
from largebatch.train.rundir import read_table


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _cfg(tmp_path, name="run", **kw):
    base = dict(dataset="digits", model="mlp", mlp_depth=2, mlp_width=32, batch_size=256, epochs=2,
                optimizer="lars", lr=2.0, schedule="none", out_dir=str(tmp_path / name), progress=False,
                stats_every=2)
    base.update(kw)
    return TrainConfig(**base)


def test_cli_end_to_end_writes_run_dir(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", "--dataset", "digits", "--mlp-width", "32", "--batch-size", "256", "--epochs", "4",
               "--optimizer", "lars", "--lr", "4", "--schedule", "cosine", "--warmup-epochs", "1",
               "--stats-every", "3", "--out-dir", str(out)])
    assert rc == 0
    assert "epoch 4/4" in capsys.readouterr().out
    assert {"config.yaml", "metrics.csv", "steps.csv", "layer_stats.csv", "checkpoint.pt"} <= set(os.listdir(out))
    m = read_table(str(out / "metrics.csv"))
    assert [r["epoch"] for r in m] == [1, 2, 3, 4] and [r["step"] for r in m] == [5, 10, 15, 20]
    assert m[-1]["test_acc"] > 0.5  # it learns
    steps = read_table(str(out / "steps.csv"))
    assert [r["step"] for r in steps] == list(range(20))
    # warm-up of 1 epoch = 5 steps: lr_t = lr * t / 5, then cosine over the other 15 (docs/algorithms.md section 9)
    assert [round(r["lr"], 6) for r in steps[:5]] == [0.0, 0.8, 1.6, 2.4, 3.2]
    q = (1 + math.cos(math.pi * 3 / 15)) / 2
    assert steps[8]["lr"] == pytest.approx(4.0 * q)
    stats = read_table(str(out / "layer_stats.csv"))
    assert sorted({r["step"] for r in stats}) == [0, 3, 6, 9, 12, 15, 18]


def test_layer_stats_are_the_lars_quantities(tmp_path, digits):
    cfg = _cfg(tmp_path, epochs=1, weight_decay=1e-3, stats_every=1)
    train(cfg, dataset=digits, log=lambda s: None)
    stats = read_table(os.path.join(cfg.out_dir, "layer_stats.csv"))
    lrs = {r["step"]: r["lr"] for r in read_table(os.path.join(cfg.out_dir, "steps.csv"))}
    adapted = [r for r in stats if r["adapt"] == 1]
    assert {r["layer"] for r in adapted} == {"1.weight", "4.weight", "7.weight"}
    for r in adapted:  # docs/algorithms.md section 2: trust = eta ||w|| / (||g|| + wd ||w||), layer LR = lr * trust
        assert r["lnr"] == pytest.approx(r["w_norm"] / r["g_norm"], rel=1e-6)
        assert r["trust"] == pytest.approx(1e-3 * r["w_norm"] / (r["g_norm"] + 1e-3 * r["w_norm"]), rel=1e-4)
        assert r["layer_lr"] == pytest.approx(lrs[r["step"]] * r["trust"], rel=1e-5)
    excluded = [r for r in stats if r["adapt"] == 0]
    assert excluded and all(r["trust"] == 1.0 for r in excluded)


def test_sgd_records_norms_too(tmp_path, digits):
    cfg = _cfg(tmp_path, optimizer="sgd", lr=0.1, epochs=1, stats_every=1)
    train(cfg, dataset=digits, log=lambda s: None)
    stats = read_table(os.path.join(cfg.out_dir, "layer_stats.csv"))
    assert stats and all(r["trust"] == 1.0 and r["layer_lr"] == pytest.approx(0.1) for r in stats)
    assert all(r["w_norm"] > 0 and r["g_norm"] > 0 for r in stats if r["layer"].endswith("weight"))


def test_step_conversions(digits):
    assert factory.steps_per_epoch(1438, 256, 1) == 5
    assert factory.steps_per_epoch(1438, 256, 1, drop_last=False) == 6
    assert factory.steps_per_epoch(1438, 256, 2) == 5  # 719 per rank / 128
    with pytest.raises(ValueError, match="^batch_size:"):
        factory.steps_per_epoch(100, 128, 1)
    cfg = TrainConfig(optimizer="tvlars", tvlars_delay_epochs=2.5, schedule="none")
    model = torch.nn.Linear(3, 2)
    opt = factory.build_optimizer(cfg, model, spe=7)
    assert opt.param_groups[0]["delay"] == round(2.5 * 7)
    cfg2 = TrainConfig(optimizer="sgd", lr=0.1, lr_scaling="sqrt", batch_size=1024, base_batch_size=256)
    assert factory.effective_lr(cfg2) == pytest.approx(0.2)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_bitwise_exact(tmp_path, digits):
    common = dict(epochs=3, schedule="cosine", warmup_epochs=1, augment=True, micro_batch_size=128,
                  weight_decay=5e-4, stats_every=3)
    full = train(_cfg(tmp_path, "full", **common), dataset=digits, log=lambda s: None)
    part = train(_cfg(tmp_path, "split", stop_after_epochs=1, **common), dataset=digits, log=lambda s: None)
    assert part.status == "stopped" and part.epochs_completed == 1
    with pytest.raises(ValueError, match="^out_dir: .*--resume"):
        train(_cfg(tmp_path, "split", **common), dataset=digits, log=lambda s: None)
    with pytest.raises(ValueError, match="^lr: differs"):
        train(_cfg(tmp_path, "split", resume=True, **{**common, "lr": 1.0}), dataset=digits, log=lambda s: None)
    rest = train(_cfg(tmp_path, "split", resume=True, **common), dataset=digits, log=lambda s: None)
    assert rest.status == "finished" and rest.global_step == full.global_step == 15
    a, b = _weights(full.model), _weights(rest.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ka = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    kb = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    for pa, pb in zip(ka["optimizer"]["state"].values(), kb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa if torch.is_tensor(pa[k]))
    drop = ("epoch_seconds", "images_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert strip(full.history) == strip(rest.history)
    assert strip(read_table(str(tmp_path / "full" / "metrics.csv"))) == strip(read_table(str(tmp_path / "split" / "metrics.csv")))
    for name in ("steps.csv", "layer_stats.csv"):  # byte-identical (NaN w_norm of excluded tensors included)
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "split" / name).read_bytes()


@pytest.mark.parametrize("optimizer,lr", [("lars", 2.0), ("sgd", 0.2), ("clars", 0.2)])
def test_accumulation_equals_one_big_batch(tmp_path, digits, optimizer, lr):
    kw = dict(optimizer=optimizer, lr=lr, mlp_batchnorm=False, epochs=1, stats_every=0, checkpoint=False)
    big = train(_cfg(tmp_path, "big", **kw), dataset=digits, log=lambda s: None)
    acc = train(_cfg(tmp_path, "acc", micro_batch_size=64, **kw), dataset=digits, log=lambda s: None)
    other = train(_cfg(tmp_path, "other", **{**kw, "batch_size": 128}), dataset=digits, log=lambda s: None)
    a, b, c = _weights(big.model), _weights(acc.model), _weights(other.model)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    assert not all(torch.allclose(a[k], c[k], rtol=1e-5, atol=1e-6) for k in a)  # the check can fail
    la = [r["loss"] for r in read_table(str(tmp_path / "big" / "steps.csv"))]
    lb = [r["loss"] for r in read_table(str(tmp_path / "acc" / "steps.csv"))]
    assert la == pytest.approx(lb, rel=1e-5)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, digits, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, y, **kw):  # per epoch: 2 training micro-batches, then 1 evaluation batch
        calls["n"] += 1
        out = real(logits, y, **kw)
        return out * float("nan") if calls["n"] >= 8 else out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    cfg = _cfg(tmp_path, batch_size=512, epochs=4)
    res = train(cfg, dataset=digits, log=lambda s: None)
    assert res.status == "nonfinite"
    assert res.failure["epoch"] == 3 and res.failure["step_in_epoch"] == 2 and res.failure["global_step"] == 5
    assert "non-finite training loss" in res.failure["message"] and "epoch 2" in res.failure["message"]
    ck = torch.load(os.path.join(cfg.out_dir, "checkpoint.pt"), weights_only=False)
    assert ck["epoch"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    with open(os.path.join(cfg.out_dir, "failure.json")) as f:
        assert json.load(f)["global_step"] == 5
    assert len(read_table(os.path.join(cfg.out_dir, "metrics.csv"))) == 2


def test_exploding_lr_exit_code(tmp_path, capsys):
    rc = main(["train", "--optimizer", "sgd", "--lr", "1e12", "--no-mlp-batchnorm", "--mlp-width", "16",
               "--batch-size", "256", "--epochs", "2", "--schedule", "none", "--out-dir", str(tmp_path / "x")])
    assert rc == 3
    assert "non-finite training loss" in capsys.readouterr().out


def test_jsonl_metrics(tmp_path, digits):
    cfg = _cfg(tmp_path, epochs=1, metrics_format="jsonl", checkpoint=False)
    train(cfg, dataset=digits, log=lambda s: None)
    rows = read_table(os.path.join(cfg.out_dir, "metrics.jsonl"))
    assert len(rows) == 1 and 0 <= rows[0]["test_acc"] <= 1
    assert os.path.exists(os.path.join(cfg.out_dir, "layer_stats.jsonl"))


def test_bf16_autocast_on_cpu(tmp_path, digits):
    cfg = _cfg(tmp_path, epochs=3, precision="bf16", lr=4.0, checkpoint=False)
    res = train(cfg, dataset=digits, log=lambda s: None)
    assert res.status == "finished" and res.final["train_acc"] > 0.5
    assert all(p.dtype == torch.float32 for p in res.model.parameters())  # autocast keeps fp32 master weights


def test_cifar_format_resnet20_with_augmentation_and_accumulation(tmp_path):
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name, n in [(f"data_batch_{i}", 16) for i in range(1, 6)] + [("test_batch", 16)]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": rng.randint(0, 10, n).tolist()}, f)
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--model", "resnet20", "--init",
               "kaiming_normal", "--optimizer", "lamb", "--lr", "0.01", "--batch-size", "32", "--micro-batch-size", "16",
               "--epochs", "1", "--schedule", "poly", "--stats-every", "1", "--out-dir", str(out)])
    assert rc == 0
    m = read_table(str(out / "metrics.csv"))
    assert len(m) == 1 and m[0]["step"] == 2  # 80 images / 32 = 2 steps (drop_last)
    layers = {r["layer"] for r in read_table(str(out / "layer_stats.csv"))}
    assert "conv1.weight" in layers and "layer3.2.conv2.weight" in layers and "fc.bias" in layers


def test_partial_last_step_without_drop_last(tmp_path, digits):
    """1438 samples at batch 1024: a full step then one of 414; accumulation still equals one big step."""
    kw = dict(mlp_batchnorm=False, epochs=1, batch_size=1024, drop_last=False, stats_every=0, checkpoint=False)
    one = train(_cfg(tmp_path, "one", **kw), dataset=digits, log=lambda s: None)
    acc = train(_cfg(tmp_path, "acc", micro_batch_size=256, **kw), dataset=digits, log=lambda s: None)
    assert one.global_step == acc.global_step == 2
    a, b = _weights(one.model), _weights(acc.model)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_row_cut_by_a_crash_is_dropped_on_resume(tmp_path, digits, fmt):
    """A crash mid-append leaves a cut last line; --resume must neither keep it nor fail."""
    common = dict(epochs=2, metrics_format=fmt, stats_every=3)
    train(_cfg(tmp_path, "full", **common), dataset=digits, log=lambda s: None)
    train(_cfg(tmp_path, "split", stop_after_epochs=1, **common), dataset=digits, log=lambda s: None)
    cut = "1,,,,,,," if fmt == "csv" else '{"step": 1, "ep'
    for name in ("steps", "layer_stats"):
        with open(tmp_path / "split" / f"{name}.{fmt}", "a") as f:
            f.write(cut)
    rest = train(_cfg(tmp_path, "split", resume=True, **common), dataset=digits, log=lambda s: None)
    assert rest.status == "finished"
    for name in ("steps", "layer_stats"):
        assert (tmp_path / "full" / f"{name}.{fmt}").read_bytes() == (tmp_path / "split" / f"{name}.{fmt}").read_bytes()


def test_damaged_table_names_the_file(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON row"):
        read_table(str(p))
    p = tmp_path / "steps.csv"
    p.write_text("step,loss\n0,1.5\n1,\n2,1.2\n")
    with pytest.raises(ValueError, match=r"steps.csv: row 2 has missing fields"):
        read_table(str(p))
    p.write_text("step,loss\n0,1.5\n1,")  # only the last line cut: dropped
    assert read_table(str(p)) == [{"step": 0, "loss": 1.5}]
