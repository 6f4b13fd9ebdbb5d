"""The artifacts' paper-scale grids hold the papers' settings and numbers; the tasks some artifacts add
(FC freezing, the M_k probe) do what they say; the datasets they need (mnist, fashion-mnist-val, imagenet)
read their real on-disk formats."""

import gzip
import json
import math
import os
import struct

import numpy as np
import pytest
import torch

from largebatch.experiments import engine
from largebatch.experiments.artifacts import ARTIFACTS, clars, fair, lalc, tvlars
from largebatch.experiments.artifacts.common import make_tiny_imagenet
from largebatch.experiments.reproduce import context
from largebatch.train import data
from largebatch.train.config import resolve
from largebatch.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _grid(art, scale="paper", seeds=None, out="out"):
    ctx = context(ARTIFACTS[art], scale, seeds, out, {})
    return ctx, ctx.grid()


# ----------------------------------------------------------------------------- paper settings
def test_tvlars_table1_is_the_papers_grid():
    ctx, runs = _grid("tvlars-table1")
    clf = [r for r in runs if r.tags["problem"] == "clf"]
    ssl = [r for r in runs if r.tags["problem"] == "ssl"]
    assert len(ssl) == 2 * 6 * 3 * 3 == 108
    assert len(clf) == 2 * 6 * 3 * 5  # ours and the papers' LAMB (pytorch-optimizer) and LARS (Lightning Flash)
    assert {r.tags["optimizer"] for r in clf} == {"lars", "lamb", "tvlars", "lamb-pto", "lars-flash"}
    for r in clf:
        cfg = ctx.resolved(r)
        assert cfg.lr in tvlars.LRS[cfg.batch_size] and cfg.weight_decay == 5e-4 and cfg.momentum == 0.9
        assert cfg.model == {"cifar10": "resnet18", "tinyimagenet": "resnet34"}[cfg.dataset]
        assert cfg.init == "kaiming_uniform" and cfg.stem == "imagenet" and cfg.epochs == 100
        assert cfg.lr_scaling == "none" and cfg.seed == 0
        if cfg.optimizer == "tvlars":
            assert cfg.schedule == "none" and cfg.tvlars_lam == 1e-4 and cfg.tvlars_delay_epochs == 10
        else:
            assert cfg.schedule == "cosine" and cfg.warmup_epochs == 20
    for r in ssl:
        cfg = ctx.resolved(r)
        assert r.kind == "pretrain" and r.linear_epochs == 100 and cfg.epochs == 1000
        assert cfg.projector == "2048-2048-4096" and cfg.lambd == 0.0051
        assert cfg.optimizer != "tvlars" or cfg.tvlars_lam == 1e-5
    paper = tvlars.PAPER
    assert paper["clf"]["cifar10"]["lars"][16384][tvlars.LRS[16384].index(19)] == 38.57
    assert paper["ssl"]["tinyimagenet"]["tvlars"][512][2] == 31.44


def test_paper_commands_carry_the_papers_settings():
    """Every paper-scale run of the TVLARS and LALC artifacts carries the settings the papers state (the sentences
    are in PAPER_SETTINGS), in its configuration and on its command line."""
    tv = {k: v for k, (v, _) in tvlars.PAPER_SETTINGS.items()}
    for art in ("tvlars-table1", "tvlars-fig1", "tvlars-fig2", "tvlars-ablation-lambda", "tvlars-ablation-init"):
        ctx, runs = _grid(art)
        for r in runs:
            if r.kind == "call":
                continue
            cfg, line = ctx.resolved(r), engine.command_line(ctx, r)
            ssl = r.kind == "pretrain"
            gmin = cfg.batch_size / 512 * 0.001
            assert cfg.sync_bn is tv["sync_bn"] and "--sync-bn" in line
            assert cfg.weight_decay == tv["weight_decay"] and cfg.momentum == tv["momentum"]
            if cfg.optimizer == "tvlars":
                assert cfg.tvlars_delay_epochs == tv["tvlars_delay_epochs"]  # Barlow Twins too: 10 of 1000 epochs
                assert cfg.tvlars_gamma_min == pytest.approx(gmin)
                lam = r.tags.get("tvlars_lam", tv["tvlars_lam"]["ssl" if ssl else "clf"])
                assert cfg.tvlars_lam == lam
            elif r.tags.get("optimizer") == "lars-nowarmup" or cfg.schedule == "poly":
                assert cfg.schedule == tv["lars-nowarmup"] and cfg.min_lr_ratio * cfg.lr == pytest.approx(gmin)
            else:
                assert cfg.warmup_epochs == tv["warmup_epochs"]  # Barlow Twins too: 20 of 1000 epochs
                assert cfg.schedule == "cosine" and cfg.min_lr_ratio * cfg.lr == pytest.approx(gmin)
                assert f"--warmup-epochs {tv['warmup_epochs']}" in line
    lalc_ = {k: v for k, (v, _) in lalc.PAPER_SETTINGS.items()}
    ctx, runs = _grid("lalc-table2")
    for r in runs:
        cfg, line = ctx.resolved(r), engine.command_line(ctx, r)
        assert cfg.stem == lalc_["stem"] and "--stem imagenet-nopool" in line
        assert cfg.normalize == lalc_["normalize"] and "--normalize cifar10" in line
        assert cfg.micro_batch_size == (lalc_["micro_batch_size"] if cfg.batch_size > lalc_["micro_batch_size"] else None)
        assert cfg.lr == lalc_["lr"] and cfg.momentum == lalc_["momentum"] and cfg.weight_decay == lalc_["weight_decay"]
        assert cfg.warmup_epochs in (0.0, lalc_["warmup_epochs"])
    # the papers' LAMB and LARS sit beside ours in Table 1
    opts = {ctx.resolved(r).optimizer for r in _grid("tvlars-table1")[1] if r.kind == "train"}
    assert {"lamb-pto", "lars-flash"} <= opts


def test_lalc_stem_and_normalization():
    from largebatch.models import build_model

    m = build_model("resnet50", 10, (3, 32, 32), stem="imagenet-nopool")
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, torch.nn.Identity)
    ds = data.load_digits()
    with pytest.raises(ValueError, match="normalize: cifar10 is for 3-channel"):
        data.with_normalization(ds, "cifar10")
    assert data.with_normalization(ds, "data") is ds


def test_mini_time_knobs_are_mapped_from_the_paper():
    """At mini scale phi covers the share of the run it covers in the paper: lam x steps, delay and warm-up fractions."""
    from largebatch.experiments import scaling

    ctx, runs = _grid("tvlars-table1", "mini", seeds=1)
    for r in runs:
        if r.kind != "train" or r.tags["optimizer"] != "tvlars":
            continue
        cfg, b = ctx.resolved(r), r.tags["batch"]
        assert cfg.tvlars_lam * scaling.steps(60_000, b, cfg.epochs) == pytest.approx(1e-4 * scaling.paper_steps(b), rel=1e-4)
        assert cfg.tvlars_delay_epochs == pytest.approx(0.1 * cfg.epochs)
        assert r.name.startswith("fashion-mnist-")  # named by the data it trains on
    bt = [r for r in runs if r.kind == "pretrain"]
    for r in bt:
        cfg = ctx.resolved(r)
        if cfg.optimizer == "tvlars":
            assert cfg.tvlars_delay_epochs == pytest.approx(10 / 1000 * cfg.epochs)
        else:
            assert cfg.warmup_epochs == pytest.approx(20 / 1000 * cfg.epochs)
    # fair-baselines: TVLARS's lam range is mapped the same way (lam x steps of the paper's run at B = 4096)
    ctx, runs = _grid("fair-baselines", "mini", seeds=1)
    lams = sorted({ctx.resolved(r).tvlars_lam for r in runs if r.tags.get("optimizer") == "tvlars"})
    t = scaling.steps(50_000, 4096, 12)
    assert [x * t for x in lams] == pytest.approx([1e-4 * 1200, 1e-3 * 1200], rel=1e-4)


def test_tvlars_figures_share_table1_cells():
    ctx, runs = _grid("tvlars-fig1", "mini")
    homes = {r.tags["optimizer"]: r.home for r in runs}
    assert homes == {"lars": "tvlars-table1", "lars-nowarmup": None}
    t1 = {ctx.path(r) for r in _grid("tvlars-table1", "mini")[1]}
    shared = [r for r in runs if r.home]
    assert shared and {ctx.path(r) for r in shared} <= t1
    # the lam ablation: lam 1e-4 is Table 1's TVLARS cell, the others its own, delay 10 % of the run
    ctx, runs = _grid("tvlars-ablation-lambda")
    assert {r.tags.get("tvlars_lam", 1e-4) for r in runs} == set(tvlars.LAMBDAS)
    for r in runs:
        cfg = ctx.resolved(r)
        assert cfg.tvlars_delay_epochs == 10 and cfg.tvlars_alpha == 1 and cfg.batch_size in (1024, 16384)
        assert (r.home == "tvlars-table1") == (cfg.tvlars_lam == 1e-4)
    ctx, runs = _grid("tvlars-fig2")
    assert {ctx.resolved(r).schedule for r in runs} == {"cosine", "poly"}
    assert all(ctx.resolved(r).stats_every == 1 and ctx.resolved(r).batch_size == 16384 for r in runs)
    ctx, runs = _grid("tvlars-ablation-init")
    assert {ctx.resolved(r).init for r in runs} == set(tvlars.INITS)


def test_lalc_table2_is_the_papers_grid():
    ctx, runs = _grid("lalc-table2")
    assert len(runs) == 9 * 4
    for r in runs:
        cfg, m, b = ctx.resolved(r), r.tags["method"], r.tags["batch"]
        assert cfg.dataset == "cifar10" and cfg.model == "resnet50" and cfg.stem == "imagenet-nopool"
        assert cfg.lr * cfg.batch_size / cfg.base_batch_size == pytest.approx(0.1 * b / 128)  # linear rule
        assert cfg.lr_scaling == "linear" and cfg.weight_decay == 5e-4 and cfg.momentum == 0.9
        assert cfg.warmup_epochs == (10 if "WarmUp" in m else 0) and cfg.schedule == "cosine"
        assert cfg.nesterov == ("Nesterov" in m)
        if cfg.optimizer != "sgd":
            assert cfg.eta == lalc.ETA[cfg.optimizer][b]
    assert lalc.ETA["clars"][8192] == 1e-4 and lalc.ETA["lars"][128] == 0.01 and lalc.PAPER["LALC"][3] == 93.68


def test_clars_paper_settings():
    ctx, runs = _grid("clars-table1")
    by = {r.tags["method"]: ctx.resolved(r) for r in runs}
    lars, cl, small = by["LARS"], by["CLARS"], by["small batch"]
    assert lars.dataset == "imagenet" and lars.model == "resnet50" and lars.epochs == 90
    assert lars.batch_size == cl.batch_size == 16384 and lars.micro_batch_size == 512
    assert (lars.eta, lars.warmup_epochs, lars.schedule, lars.lr) == (1e-3, 5, "poly", 25)
    assert (cl.eta, cl.warmup_epochs, cl.optimizer) == (1e-2, 0, "clars") and small.batch_size == 256
    ctx, runs = _grid("clars-fig2")
    assert {(r.tags["data"], r.tags["arch"]) for r in runs} == {("mnist", "fcn5"), ("mnist", "cnn5"), ("cifar10", "resnet8")}
    for r in runs:
        cfg = ctx.resolved(r)
        assert (cfg.optimizer, cfg.nesterov, cfg.lr, cfg.schedule, cfg.batch_size) == ("sgd", True, 0.001, "none", 128)
        assert cfg.epochs == (6 if r.tags["arch"] == "resnet8" else 10) and r.task().probe == 60000
    ctx, runs = _grid("clars-fig3")
    for r in runs:
        cfg = ctx.resolved(r)
        assert (cfg.dataset, cfg.model, cfg.batch_size, cfg.epochs, cfg.lr) == ("cifar100", "resnet56", 8192, 200, 1.0)
        assert cfg.warmup_epochs == (20 if r.tags["method"] == "warm-up" else 0)
        assert isinstance(r.task() if r.task else None, clars.FreezeHead) == (r.tags["method"] == "FC freeze")


def test_fair_baselines_give_every_optimizer_the_same_budget(tmp_path):
    ctx, runs = _grid("fair-baselines", "mini", out=str(tmp_path))
    per = {}
    for r in runs:
        assert r.tags["stage"] == "search" and ctx.resolved(r).dataset == "fashion-mnist-val"
        per.setdefault(r.tags["optimizer"], []).append(r)
    expected = {o for o in fair.OPTIMIZERS if fair.available(o)}
    assert set(per) == expected and {len(v) for v in per.values()} == {10}
    assert {ctx.resolved(r).batch_size for r in runs} == {4096}


def test_fair_baselines_pick_the_best_search_trial_when_the_search_is_complete():
    def res(status, acc=None, name="r"):
        return engine.Result(engine.Run(name), status, "p", [{"epoch": 1, "test_acc": acc}] if acc is not None else [])

    assert fair.best_trial([res("finished", 0.5, "a"), res("finished", 0.7, "b"), res("failed")]).run.name == "b"
    assert fair.best_trial([res("finished", 0.5), res("partial")]) is None
    assert fair.best_trial([res("failed"), res("failed")]) is None
    assert fair.best_trial([res("finished", 0.9, "a"), res("finished", math.nan, "b")]).run.name == "a"


def test_fair_baselines_final_runs_are_the_best_trial_on_the_test_set_with_fresh_seeds(tmp_path, capsys):
    from largebatch.cli import main

    assert main(["reproduce", "fair-baselines", "--scale", "smoke", "--out", str(tmp_path), "--seeds", "2", "--run"]) == 0
    ctx = context(ARTIFACTS["fair-baselines"], "smoke", 2, str(tmp_path), {})
    runs = ctx.grid()
    for opt in ("sgd", "lars", "tvlars"):
        search = [ctx.result(r) for r in runs if r.tags == {**r.tags, "stage": "search", "optimizer": opt}]
        best = max(search, key=lambda r: r.final["test_acc"])
        final = [r for r in runs if r.tags["stage"] == "final" and r.tags["optimizer"] == opt]
        assert [r.cfg["seed"] for r in final] == [1, 2]
        assert all({**r.cfg, "seed": 0} == best.run.cfg for r in final)  # digits: the same data at smoke scale


def test_tvlars_fig3_bounds_hold(tmp_path, capsys):
    from largebatch.cli import main

    assert main(["reproduce", "tvlars-fig3", "--out", str(tmp_path), "--collect"]) == 0
    out = capsys.readouterr().out
    assert out.count("| yes |") == sum(len(v) for _, v, _ in tvlars.PHI_PANELS) and "| NO |" not in out


# ----------------------------------------------------------------------------- tasks
def _digits(tmp_path, **kw):
    return resolve(overrides={**dict(dataset="digits", model="mlp", mlp_width=16, mlp_depth=1, batch_size=256,
                                     out_dir=str(tmp_path / "run"), progress=False), **kw})


def test_fc_freeze_leaves_the_head_alone_for_its_epochs_then_trains_it(tmp_path):
    cfg = _digits(tmp_path, optimizer="sgd", lr=0.5, epochs=2, schedule="cosine", min_lr_ratio=1.0,
                  stop_after_epochs=1)
    torch.manual_seed(cfg.seed)
    from largebatch.models import build_model

    head0 = build_model("mlp", 10, (1, 8, 8), mlp_depth=1, mlp_width=16)[-1].weight.detach().clone()
    r = train(cfg, task=clars.FreezeHead(1.0), log=lambda s: None)
    body = r.model[1].weight.detach().clone()
    assert torch.equal(r.model[-1].weight, head0) and r.status == "stopped"
    cfg.resume, cfg.stop_after_epochs = True, None
    r = train(cfg, task=clars.FreezeHead(1.0), log=lambda s: None)
    assert not torch.equal(r.model[-1].weight, head0) and r.status == "finished"
    assert not torch.equal(r.model[1].weight, body)
    with pytest.raises(ValueError, match="schedule: FC freezing"):
        train(_digits(tmp_path, optimizer="sgd", schedule="none", overwrite=True), task=clars.FreezeHead(1.0))


@pytest.mark.parametrize("arch", ["fcn5", "cnn5"])
def test_variance_probe_writes_m_k_per_weight_layer_each_epoch(tmp_path, arch):
    cfg = _digits(tmp_path, optimizer="sgd", nesterov=True, lr=0.001, schedule="none", weight_decay=0.0, epochs=2,
                  batch_size=128)
    train(cfg, task=clars.VarianceProbe(arch, 300), log=lambda s: None)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "variance.jsonl")]
    assert [x["epoch"] for x in lines] == [1, 2] and all(x["probe"] == 300 for x in lines)
    for x in lines:
        assert len(x["M"]) == 5 and all(v >= 1.0 for v in x["M"].values())  # mean of squares >= square of mean
    res = engine.Result(engine.Run("r"), "finished", str(tmp_path / "run"))
    assert clars.variance_of(res) == {1: lines[0]["M"], 2: lines[1]["M"]}


def test_variance_probe_matches_per_sample_gradients():
    torch.manual_seed(0)
    model = clars.build_arch("fcn5", (1, 4, 4), 3, width=8)
    x, y = torch.randn(20, 1, 4, 4), torch.randint(0, 3, (20,))
    from largebatch.persample import gradient_variance

    m = gradient_variance(model, [(x, y)], torch.nn.CrossEntropyLoss(reduction="sum"))
    w = model[1].weight
    g = torch.stack([torch.autograd.grad(torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), w)[0]
                     for i in range(20)])
    expect = (g.flatten(1).pow(2).sum(1).mean() / g.mean(0).pow(2).sum()).item()
    assert m["1.weight"] == pytest.approx(expect, rel=1e-4)


# ----------------------------------------------------------------------------- datasets
def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _idx_files(folder, n_train=12, n_test=5, seed=0):
    rng = np.random.RandomState(seed)
    arrays = {"train-images-idx3-ubyte.gz": rng.randint(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte.gz": rng.randint(0, 10, n_train),
              "t10k-images-idx3-ubyte.gz": rng.randint(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": rng.randint(0, 10, n_test)}
    os.makedirs(folder, exist_ok=True)
    for name, arr in arrays.items():
        _write_idx(os.path.join(folder, name), arr)
    return arrays


def test_mnist_reads_torchvisions_idx_layout(tmp_path):
    arrays = _idx_files(tmp_path / "MNIST" / "raw")
    ds = data.load("mnist", str(tmp_path))
    assert ds.name == "mnist" and ds.train_x.shape == (12, 1, 28, 28) and ds.test_x.shape == (5, 1, 28, 28)
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert np.array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte.gz"])
    with pytest.raises(data.DatasetNotFound, match="mnist: not found.*" + str(tmp_path / "none")):
        data.load("mnist", str(tmp_path / "none"))


def test_fashion_mnist_val_holds_out_training_images(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", str(tmp_path / "nowhere"))
    monkeypatch.setattr(data, "VALIDATION_SIZE", 4)
    arrays = _idx_files(tmp_path)
    ds = data.load("fashion-mnist-val", str(tmp_path))
    xtr = arrays["train-images-idx3-ubyte.gz"].astype(np.uint8)
    assert ds.train_x.shape[0] == 8 and ds.test_x.shape[0] == 4
    rows = {x.tobytes() for x in xtr}
    seen = [x.tobytes() for x in ds.train_x[:, 0].numpy()] + [x.tobytes() for x in ds.test_x[:, 0].numpy()]
    assert set(seen) == rows and len(seen) == len(rows)  # a split of the training set, nothing of t10k
    assert resolve(overrides={"dataset": "fashion-mnist-val"}).dataset == "fashion-mnist-val"


def test_imagenet_folder_uses_the_papers_transforms(tmp_path):
    import torchvision.transforms as T
    from PIL import Image

    root = make_tiny_imagenet(str(tmp_path / "inet"), classes=2, train=3, val=2)
    ds = data.load("imagenet", str(tmp_path / "inet"))
    assert ds.train_x.shape == (6, 3, 224, 224) and ds.test_x.shape == (4, 3, 224, 224) and ds.num_classes == 2
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_y.tolist() == [0, 0, 1, 1]
    assert torch.allclose(ds.mean, torch.tensor([0.485, 0.456, 0.406]))
    torch.manual_seed(5)
    got = ds.train_x[torch.tensor([4, 0, 2])]
    torch.manual_seed(5)
    tv = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.PILToTensor()])
    want = torch.stack([tv(Image.open(ds.train_x.paths[i]).convert("RGB")) for i in (4, 0, 2)])
    assert torch.equal(got, want)
    ev = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    assert torch.equal(ds.test_x[1:3], torch.stack([ev(Image.open(p).convert("RGB")) for p in ds.test_x.paths[1:3]]))
    assert [c.shape[0] for c in ds.test_x.split(3)] == [3, 1]
    assert root.endswith("inet")


def test_imagenet_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(data.DatasetNotFound, match="imagenet: not found.*ImageFolder"):
        data.load("imagenet", str(tmp_path / "none"))
    root = make_tiny_imagenet(str(tmp_path / "inet"), classes=2, train=2, val=1)
    os.makedirs(os.path.join(root, "val", "n99999999"))
    with pytest.raises(data.DataError, match="n99999999 is a class absent"):
        data.load("imagenet", root)
    os.rmdir(os.path.join(root, "val", "n99999999"))
    bad = os.path.join(root, "train", "n00000001", "train_1_0.JPEG")
    open(bad, "wb").write(b"<html>not an image</html>")
    ds = data.load("imagenet", root)
    with pytest.raises(data.DataError, match="cannot read .*train_1_0.JPEG"):
        ds.train_x[torch.arange(4)]
    with pytest.raises(ValueError, match="augment: imagenet"):
        resolve(overrides={"dataset": "imagenet", "augment": True})


def test_imagenet_training_resumes_exactly(tmp_path):
    root = make_tiny_imagenet(str(tmp_path / "inet"), classes=2, train=4, val=2)

    def cfg(out, **kw):
        return resolve(overrides=dict(dataset="imagenet", data_dir=root, model="mlp", mlp_width=4, mlp_depth=1,
                                      batch_size=4, epochs=2, out_dir=str(tmp_path / out), progress=False, **kw))

    whole = train(cfg("a"), log=lambda s: None)
    assert train(cfg("b", stop_after_epochs=1), log=lambda s: None).status == "stopped"
    resumed = train(cfg("b", resume=True), log=lambda s: None)
    strip = [{k: v for k, v in h.items() if k not in ("epoch_seconds", "images_per_s")} for h in whole.history]
    assert strip == [{k: v for k, v in h.items() if k not in ("epoch_seconds", "images_per_s")} for h in resumed.history]
