"""`largebatch pretrain` and `largebatch linear-eval`: the harness around the Barlow Twins library:
end to end, exact resume, global-batch views, N processes = 1, clear errors."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from forked import free_port, torchrun_env
from largebatch.cli import main
from largebatch.ssl import barlow_twins_views
from largebatch.train import data
from largebatch.train import linear_eval as le
from largebatch.train.pretrain import PretrainConfig, global_batch_views, pretrain
from largebatch.train.rundir import read_table

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["pretrain", "--dataset", "digits", "--mlp-width", "64", "--mlp-depth", "1", "--projector", "64-64",
        "--batch-size", "512", "--lr", "0.2", "--knn-k", "20", "--no-progress"]


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _cfg(out, **kw):
    base = dict(dataset="digits", model="mlp", mlp_depth=1, mlp_width=64, projector="64-64", batch_size=512,
                epochs=2, optimizer="lars", lr=0.2, out_dir=str(out), progress=False, stats_every=1, knn_k=20)
    base.update(kw)
    return PretrainConfig(**base)


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_cli_end_to_end_plot_and_linear_eval(tmp_path, capsys, monkeypatch):
    out = tmp_path / "pt"
    assert main(ARGS + ["--epochs", "3", "--knn-every", "2", "--out-dir", str(out)]) == 0
    assert "kNN acc" in capsys.readouterr().out
    rows = read_table(str(out / "metrics.csv"))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    knn = [r["knn_acc"] for r in rows]
    assert knn[0] != knn[0] and 0.1 < knn[1] <= 1 and 0.1 < knn[2] <= 1  # NaN between monitor epochs
    assert all(r["train_loss"] > 0 for r in rows)
    stats = read_table(str(out / "layer_stats.csv"))
    assert {r["layer"] for r in stats} >= {"backbone.1.weight", "projector.0.weight"}  # backbone.0: Flatten
    assert main(["plot", str(out)]) == 0 and (out / "curves.png").exists()
    for flag in ([], ["--random-init"], ["--raw-pixels"]):
        assert main(["linear-eval", str(out), "--epochs", "5"] + flag) == 0
    res = {k: json.loads((out / "linear-eval" / f"{k}.json").read_text()) for k in le.FEATURES}
    assert res["pretrained"]["epoch"] == 3 and res["random-init"]["epoch"] == 0
    assert res["raw-pixels"]["feature_dim"] == 64 and res["pretrained"]["feature_dim"] == 64
    assert all(0.5 < r["top1"] <= 1 for r in res.values())

    def no_recompute(*a, **k):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(le, "features_of", no_recompute)  # cached features are reused
    again = le.linear_eval(str(out), "pretrained", epochs=5)
    assert again["top1"] == res["pretrained"]["top1"]  # and the classifier is deterministic


def test_random_init_backbone_is_the_pretraining_start(tmp_path, digits):
    cfg = _cfg(tmp_path / "pt", epochs=1)
    res = pretrain(cfg, digits, log=lambda s: None)
    start = le.build_backbone(cfg, digits.shape, None)
    trained = le.build_backbone(cfg, digits.shape, torch.load(tmp_path / "pt" / "checkpoint.pt", weights_only=False))
    t = res.model.backbone.state_dict()
    assert all(torch.equal(t[k], v) for k, v in trained.state_dict().items())
    assert not all(torch.equal(t[k], v) for k, v in start.state_dict().items())
    torch.manual_seed(cfg.seed)  # the same initialization pre-training drew
    again = le.build_backbone(cfg, digits.shape, None)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in start.state_dict().items())


def test_resume_is_bitwise_exact(tmp_path, digits):
    kw = dict(epochs=3, schedule="cosine", warmup_epochs=1, micro_batch_size=128, weight_decay=1e-4)
    full = pretrain(_cfg(tmp_path / "full", **kw), digits, log=lambda s: None)
    part = pretrain(_cfg(tmp_path / "split", stop_after_epochs=1, **kw), digits, log=lambda s: None)
    assert part.status == "stopped"
    rest = pretrain(_cfg(tmp_path / "split", resume=True, **kw), digits, log=lambda s: None)
    a, b = _weights(full.model), _weights(rest.model)
    assert rest.status == "finished" and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("steps.csv", "layer_stats.csv"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "split" / name).read_bytes()


def test_global_batch_views_split_over_ranks_equal_one_process(digits):
    x = digits.train_x[:12]
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    one = global_batch_views(x, digits.mean, digits.std, gen())
    ref = barlow_twins_views(x, digits.mean, digits.std, gen())
    assert all(torch.equal(a, b) for a, b in zip(one, ref))  # world 1 is the library's function
    for world in (2, 3):
        parts = [global_batch_views(x[r::world], digits.mean, digits.std, gen(), r, world) for r in range(world)]
        for v in range(2):
            merged = torch.empty_like(one[v])
            for r in range(world):
                merged[r::world] = parts[r][v]
            assert torch.equal(merged, one[v])
    assert not torch.equal(one[0], one[1])


@pytest.mark.parametrize("overrides,field", [
    ({"projector": "64-x"}, "projector"), ({"projector": "64-0"}, "projector"), ({"lambd": -1.0}, "lambd"),
    ({"knn_k": 0}, "knn_k"), ({"knn_every": -1}, "knn_every"), ({"knn_temperature": 0.0}, "knn_temperature"),
])
def test_bad_pretrain_config_names_the_field(tmp_path, capsys, overrides, field):
    flags = sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in overrides.items()), [])
    assert main(ARGS + ["--out-dir", str(tmp_path / "r")] + flags) == 2
    err = capsys.readouterr().err
    assert f"{field}:" in err and "Traceback" not in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags,msg", [(["--optimizer", "clars"], "optimizer: clars"),
                                       (["--augment"], "augment:")])
def test_what_pretraining_cannot_do_is_refused(tmp_path, capsys, flags, msg):
    assert main(ARGS + ["--out-dir", str(tmp_path / "r")] + flags) == 2
    assert msg in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_linear_eval_on_something_that_is_not_a_run(tmp_path, capsys):
    assert main(["linear-eval", str(tmp_path)]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
    out = tmp_path / "nock"
    assert main(ARGS + ["--epochs", "1", "--no-checkpoint", "--out-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["linear-eval", str(out)]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert main(["linear-eval", str(out), "--random-init", "--epochs", "2"]) == 0


def test_linear_eval_of_a_classification_run(tmp_path, capsys):
    out = tmp_path / "sup"
    assert main(["train", "--dataset", "digits", "--mlp-width", "64", "--mlp-depth", "1", "--epochs", "2",
                 "--batch-size", "256", "--no-progress", "--out-dir", str(out)]) == 0
    r = le.linear_eval(str(out), "pretrained", epochs=5, log=lambda s: None)
    assert r["feature_dim"] == 64 and r["top1"] > 0.5


# ----------------------------------------------------------------------------- two processes
def _worker(rank, world, port, out, result_dir):
    torchrun_env(rank, world, port)
    res = pretrain(_cfg(out, device="cpu", mlp_batchnorm=True, projector="32-32"), log=lambda s: None)
    torch.save({"weights": res.model.state_dict(), "history": res.history},
               os.path.join(result_dir, f"rank{rank}.pt"))


def test_two_processes_equal_one_on_the_global_batch(tmp_path):
    data.load("digits")
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path / "ddp"), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    single = pretrain(_cfg(tmp_path / "one", device="cpu", mlp_batchnorm=True, projector="32-32"),
                      log=lambda s: None)
    w = single.model.state_dict()
    for k, v in w.items():  # BatchNorm over the global batch, views of the global batch, one loss
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
        if v.is_floating_point():
            assert torch.allclose(v, r0["weights"][k], rtol=1e-4, atol=1e-5), k
    assert [h["train_loss"] for h in single.history] == pytest.approx([h["train_loss"] for h in r0["history"]],
                                                                       rel=1e-5)


def test_barlow_twins_mini_smoke(tmp_path, capsys):
    out = tmp_path / "mini"
    args = ["barlow-twins-mini", "--dataset", "digits", "--epochs", "2", "--batch-size", "512", "--width", "32",
            "--projector", "32-32", "--linear-epochs", "3", "--knn-every", "1", "--out-dir", str(out)]
    assert main(args) == 0
    table = (out / "results.md").read_text()
    for name in ("lars pre-trained", "lamb pre-trained", "tvlars pre-trained", "random-init", "raw-pixels"):
        assert f"| {name} | " in table
    capsys.readouterr()
    assert main(args) == 0  # finished runs are not trained again
    assert "epoch 1/2" not in capsys.readouterr().out
    assert main(args[:-2] + ["--optimizers", "sgd", "--out-dir", str(out)]) == 2
