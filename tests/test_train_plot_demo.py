"""`largebatch plot` on run directories and the `largebatch demo` main job (tiny settings)."""

import os

import pytest

from largebatch.cli import main
from largebatch.train import data
from largebatch.train.config import TrainConfig
from largebatch.train.loop import train


pytestmark = pytest.mark.usefixtures("one_thread")



def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ds = data.load("digits")
    dirs = []
    for opt, fmt in (("lars", "csv"), ("tvlars", "jsonl")):
        cfg = TrainConfig(dataset="digits", mlp_width=32, batch_size=256, epochs=2, optimizer=opt, lr=2.0,
                          schedule="none", out_dir=str(root / opt), progress=False, stats_every=2,
                          metrics_format=fmt, checkpoint=False, tvlars_lam=0.1)
        train(cfg, dataset=ds, log=lambda s: None)
        dirs.append(cfg.out_dir)
    return root, dirs


def test_plot_cli(runs, capsys):
    root, dirs = runs
    out = root / "plots"
    assert main(["plot", *dirs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    expected = {"curves.png", "lr.png", "layers-lars.png", "layers-tvlars.png"}
    assert {os.path.basename(p) for p in printed} == expected
    assert all(_png(out / name) for name in expected)


def test_plot_errors(runs, tmp_path, capsys):
    _, dirs = runs
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics" in capsys.readouterr().err
    assert main(["plot", *dirs, "--labels", "only-one"]) == 2


def test_demo_runs_every_optimizer_and_writes_table(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--dataset", "digits", "--epochs", "2", "--batch-size", "512", "--out-dir", str(out),
               "--no-plots"])
    assert rc == 0
    text = capsys.readouterr().out
    from largebatch.experiments.demo import recipes

    names = list(recipes())
    assert {"sgd+warmup", "lars+warmup", "lars", "lamb+warmup", "tvlars", "lalc"} <= set(names)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(names) and all(any(f"| {n} |" in l for l in table) for n in names)
    assert (out / "results.md").read_text().count("\n| ") == 1 + len(names)
    assert not (out / "curves.png").exists()
    rc = main(["demo", "--epochs", "2", "--optimizers", "lars,tvlars", "--out-dir", str(out)])
    assert rc == 0 and _png(out / "curves.png") and _png(out / "lr.png") and _png(out / "layers-tvlars.png")
    assert main(["demo", "--optimizers", "lars,adamw", "--out-dir", str(out)]) == 2
