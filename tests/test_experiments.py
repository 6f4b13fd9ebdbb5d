"""`largebatch reproduce-tvlars-table1`: the grid matches the paper's settings, runs, resumes, tabulates."""

import pytest

from largebatch.cli import main
from largebatch.experiments import tvlars_table1 as t1
from largebatch.train.config import resolve

pytestmark = pytest.mark.usefixtures("one_thread")


def test_grid_is_table1():
    cells = t1.grid(t1.DATASETS, t1.OPTIMIZERS, t1.LRS, "out", {})
    assert len(cells) == 2 * 3 * 6 * 3 == 108
    assert len({c.cfg["out_dir"] for c in cells}) == 108
    for c in cells:
        cfg = resolve(overrides=c.cfg)  # every cell is a valid config
        assert cfg.lr in t1.LRS[cfg.batch_size] and cfg.weight_decay == 5e-4 and cfg.momentum == 0.9
        assert cfg.model == {"cifar10": "resnet18", "tinyimagenet": "resnet34"}[cfg.dataset]
        if cfg.optimizer == "tvlars":
            assert cfg.schedule == "none" and cfg.tvlars_lam == 1e-4
        else:
            assert cfg.schedule == "cosine" and cfg.warmup_epochs == 20
        assert len(t1.PAPER[cfg.dataset][cfg.optimizer][cfg.batch_size]) == 3 and 0 < c.paper < 100
    assert t1.grid(["cifar10"], ["lars"], [16384], "o", {})[2].paper == 38.57  # Table 1's LARS at 16K, lr 19


def test_list_and_bad_input(capsys):
    assert main(["reproduce-tvlars-table1", "--datasets", "cifar10", "--batch-sizes", "512",
                 "--set", "epochs=30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9 and all("--epochs 30" in line and line.startswith("largebatch train") for line in lines)
    with pytest.raises(SystemExit, match="cifar10-lars-b512-lr1: invalid configuration: warmup_epochs"):
        main(["reproduce-tvlars-table1", "--set", "epochs=7"])
    with pytest.raises(SystemExit, match="--batch-sizes: invalid choice 500"):
        main(["reproduce-tvlars-table1", "--batch-sizes", "500"])
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        main(["reproduce-tvlars-table1", "--set", "epoch=3"])


def test_run_skips_finished_runs_and_collects(tmp_path, capsys):
    # one real cell per LR, on offline data: digits + an MLP stand in for CIFAR-10 + ResNet-18
    args = ["reproduce-tvlars-table1", "--datasets", "cifar10", "--batch-sizes", "512", "--optimizers", "tvlars",
            "--out", str(tmp_path), "--set", "dataset=digits", "--set", "model=mlp", "--set", "epochs=1",
            "--set", "progress=false"]
    assert main(args + ["--run"]) == 0
    out = capsys.readouterr().out
    assert "[1/3]" in out and "[3/3]" in out
    assert "| 512 | tvlars | 1: " in out and "(78.92)" in out and "*" not in out.split("`*`")[0]
    assert main(args + ["--run"]) == 0  # everything finished: nothing retrained
    assert "[1/3]" not in capsys.readouterr().out
    assert main(args + ["--collect"]) == 0
    table = capsys.readouterr().out
    assert "3: " in table and "(81.56)" in table and " - " not in table


def test_ssl_cells_are_table1_barlow_twins():
    from largebatch.train.pretrain import PretrainConfig

    cells = t1.grid(t1.DATASETS, t1.OPTIMIZERS, t1.LRS, "out", {}, problems=("ssl",))
    assert len(cells) == 108 and all(c.problem == "ssl" for c in cells)
    for c in cells:
        cfg = resolve(overrides=c.cfg, cls=PretrainConfig)
        assert cfg.epochs == 1000 and cfg.projector == "2048-2048-4096" and cfg.lr_scaling == "none"
        assert cfg.optimizer != "tvlars" or (cfg.tvlars_lam == 1e-5 and cfg.schedule == "none")
        assert "/bt-" in cfg.out_dir and 0 < c.paper < 100
    assert t1.grid(["tinyimagenet"], ["tvlars"], [512], "o", {}, problems=("ssl",))[2].paper == 31.44
    line = t1.command_line(cells[0])
    assert line.startswith("largebatch pretrain ") and " && largebatch linear-eval " in line


def test_ssl_cells_run_pretrain_then_linear_eval(tmp_path, capsys):
    args = ["reproduce-tvlars-table1", "--problems", "ssl", "--datasets", "cifar10", "--batch-sizes", "512",
            "--optimizers", "lars", "--out", str(tmp_path), "--set", "dataset=digits", "--set", "model=mlp",
            "--set", "mlp_width=32", "--set", "projector=32-32", "--set", "epochs=2", "--set", "warmup_epochs=1",
            "--set", "progress=false"]
    assert main(args + ["--run"]) == 0
    out = capsys.readouterr().out
    assert "[3/3]" in out and "Barlow Twins, linear-eval top-1" in out and "(60.76)" in out
    for lr in (1, 2, 3):
        assert (tmp_path / f"bt-cifar10-lars-b512-lr{lr}" / "linear-eval" / "pretrained.json").exists()
    assert main(args + ["--run"]) == 0
    assert "[1/3]" not in capsys.readouterr().out
