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


def _one_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


def test_plot_missing_run_dir_creates_nothing(tmp_path, capsys):
    nope = tmp_path / "runs" / "nope"
    assert main(["plot", str(nope)]) == 2
    _one_line(capsys, str(nope), "not a directory")
    assert not nope.exists() and not (tmp_path / "runs").exists()


def test_plot_out_onto_a_file_is_one_line(runs, tmp_path, capsys):
    _, dirs = runs
    f = tmp_path / "figures.png"
    f.write_bytes(b"mine")
    assert main(["plot", dirs[0], "--out", str(f)]) == 2
    _one_line(capsys, "--out", str(f))
    assert f.read_bytes() == b"mine"


@pytest.mark.parametrize("garbage", [b"\x89\xff\x00\xfe garbage \x01\x02\n\xff\xfe\n",
                                     b"hello world\nthis is not a table\n",
                                     b'epoch,step\n1,2,3,4\n"unterminated\n5\n'])
def test_plot_garbage_metrics_names_the_file(tmp_path, capsys, garbage):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.csv").write_bytes(garbage)
    assert main(["plot", str(d)]) == 2
    err = _one_line(capsys, str(d / "metrics.csv"))
    assert "no metrics" not in err


def _figure_of(monkeypatch, fn, *args):
    """Run a plot function, keeping its figure instead of writing it."""
    from largebatch.train import plot

    kept = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, path, **kw: kept.append(fig) or path)
    fn(*args)
    return kept[0]


def test_curves_loss_panel_has_its_own_legend_and_integer_epochs(runs, monkeypatch):
    from largebatch.train.plot import plot_curves

    _, dirs = runs
    fig = _figure_of(monkeypatch, plot_curves, dirs, "unused.png")
    ax_acc, ax_loss = fig.axes
    legend = [t.get_text() for t in ax_loss.get_legend().get_texts()]
    assert legend == ["lars", "tvlars", "test loss", "train loss"]
    assert "pre-training" not in ax_loss.get_title() and "test" in ax_loss.get_title()
    for ax in (ax_acc, ax_loss):
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_lr_plot_names_lr_and_applied_lr_of_tvlars(runs, monkeypatch):
    from largebatch.train.plot import plot_lr

    _, dirs = runs
    fig = _figure_of(monkeypatch, plot_lr, dirs, "unused.png")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["lars: lr", "tvlars: lr", "tvlars: lr x phi(t), applied"]


def test_console_names_tvlars_applied_lr():
    from largebatch.train.loop import _lr_text

    assert _lr_text(0.5, [(0.5, 0.5)]) == "lr 0.5"
    assert _lr_text(0.0, [(0.1, 0.1), (0.05, 0.05)]) == "lr 0"  # a schedule's end: no time factor
    assert _lr_text(2.0, [(2.0, 1.5), (2.0, 0.25)]) == "lr 2, applied lr x phi(t) 0.25"


def test_layer_panels_name_modules_in_a_readable_legend(runs, monkeypatch):
    from largebatch.train.plot import layer_labels, plot_layers

    _, dirs = runs
    assert list(layer_labels(dirs[0], ["1.weight", "4.weight", "7.weight", "10.weight"]).values()) == \
        ["L1 Linear", "L2 Linear", "L3 Linear", "L4 Linear (output)"]
    assert layer_labels(str(dirs[0]) + "-absent", ["layer1.0.conv1.weight"]) == \
        {"layer1.0.conv1.weight": "L1 layer1.0.conv1"}
    fig = _figure_of(monkeypatch, plot_layers, dirs[0], "unused.png")
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["L1 Linear", "L2 Linear", "L3 Linear", "L4 Linear (output)"]
    assert all(ax.get_legend() is None for ax in fig.axes)


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
    # a second demo into the same folder refuses, naming what it would replace, and keeps it
    before = (out / "lars" / "metrics.csv").read_bytes()
    assert main(["demo", "--epochs", "2", "--optimizers", "lars,tvlars", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out / "lars") in err and "--overwrite" in err
    assert (out / "lars" / "metrics.csv").read_bytes() == before
    rc = main(["demo", "--epochs", "2", "--optimizers", "lars,tvlars", "--out-dir", str(out), "--overwrite"])
    assert rc == 0 and _png(out / "curves.png") and _png(out / "lr.png") and _png(out / "layers-tvlars.png")
    assert main(["demo", "--optimizers", "lars,adamw", "--out-dir", str(out)]) == 2


def test_many_layers_get_a_colour_bar_named_by_module(tmp_path, monkeypatch):
    """A ResNet-20 (22 adapted layers): no 22-line legend, a colour bar from the first module to
    the last, with integer ticks."""
    import csv

    from largebatch.models import build_model
    from largebatch.train.plot import plot_layers

    (tmp_path / "config.yaml").write_text("model: resnet20\n")
    names = [n for n, p in build_model("resnet20", 10, (3, 32, 32)).named_parameters() if p.ndim > 1]
    with open(tmp_path / "layer_stats.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "layer", "adapt", "w_norm", "g_norm", "lnr", "trust", "layer_lr"])
        for s in range(3):
            for i, n in enumerate(names):
                w.writerow([s, n, 1, 1 + i, 0.1 * (i + 1), 10, 1, 0.01])
    fig = _figure_of(monkeypatch, plot_layers, str(tmp_path), "unused.png")
    assert not fig.legends and len(fig.axes) == 5
    bar = fig.axes[-1]
    assert "L1 Conv2d conv1" in bar.get_ylabel() and "L22 Linear fc" in bar.get_ylabel()
    assert all(float(t).is_integer() for t in bar.get_yticks())
