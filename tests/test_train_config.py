"""Config: file + flags precedence, validation errors that name the field, CLI exit codes."""

import argparse

import pytest

from largebatch.cli import main
from largebatch.train import cli as train_cli
from largebatch.train.config import TrainConfig, resolve


def _parse(argv):
    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    return train_cli.config_from_args(p.parse_args(argv))


def test_yaml_file_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optimizer: lamb\nlr: 1\nbatch-size: 64\nbetas: [0.8, 0.99]\nwarmup_epochs: 2\n")
    cfg = _parse(["--config", str(f), "--lr", "0.5", "--no-mlp-batchnorm"])
    assert cfg.optimizer == "lamb" and cfg.batch_size == 64 and cfg.betas == (0.8, 0.99)
    assert cfg.lr == 0.5 and isinstance(cfg.lr, float)  # flag overrides the file
    assert cfg.mlp_batchnorm is False and cfg.warmup_epochs == 2.0
    assert cfg.epochs == TrainConfig().epochs  # default kept


def test_toml_file_with_train_table(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\noptimizer = "tvlars"\ntvlars_delay_epochs = 1\nmicro_batch_size = 128\n')
    cfg = _parse(["--config", str(f), "--micro-batch-size", "none"])
    assert cfg.optimizer == "tvlars" and cfg.tvlars_delay_epochs == 1.0 and cfg.micro_batch_size is None
    assert resolve(str(f)).micro_batch_size == 128


@pytest.mark.parametrize("overrides,field", [
    ({"optimizer": "adam"}, "optimizer"),
    ({"lr": -0.1}, "lr"),  # lr = 0 is valid, as for the optimizer classes
    ({"lr": float("nan")}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"batch_size": 0}, "batch_size"),
    ({"micro_batch_size": 1024, "batch_size": 512}, "micro_batch_size"),
    ({"warmup_epochs": 10, "epochs": 10}, "warmup_epochs"),
    ({"warmup_epochs": 1, "schedule": "none"}, "warmup_epochs"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"precision": "fp16", "device": "cpu"}, "precision"),
    ({"dataset": "imagenet21k"}, "dataset"),
    ({"stats_every": -1}, "stats_every"),
    ({"init": "orthogonal"}, "init"),
    ({"learning_rate": 0.1}, "learning_rate"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        resolve(None, overrides)


def test_world_size_divisibility():
    cfg = resolve(None, {"batch_size": 96, "micro_batch_size": 32})
    assert cfg.check_world_size(1) == (32, 3)
    assert cfg.check_world_size(3) == (32, 1)
    with pytest.raises(ValueError, match="^micro_batch_size:"):
        cfg.check_world_size(2)  # 48 per process is not a multiple of 32
    with pytest.raises(ValueError, match="^batch_size:"):
        cfg.check_world_size(5)


def test_cli_rejects_bad_config_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--optimizer", "lars", "--momentum", "1.5", "--out-dir", str(out)])
    assert rc == 2 and "momentum" in capsys.readouterr().err
    assert not out.exists()  # nothing was started
    rc = main(["train", "--batch-size", "4096", "--out-dir", str(out), "--progress"])
    assert rc == 2 and "batch_size" in capsys.readouterr().err  # digits has 1438 training samples
    assert not out.exists()


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optimiser: lars\n")
    with pytest.raises(ValueError, match="^optimiser: unknown config field"):
        resolve(str(f))


def test_auto_schedule_is_none_for_tvlars_and_cosine_otherwise():
    assert TrainConfig(optimizer="tvlars").validate().schedule == "none"
    assert TrainConfig(optimizer="lars").validate().schedule == "cosine"
    assert TrainConfig(optimizer="tvlars", schedule="poly").validate().schedule == "poly"


@pytest.mark.parametrize("text", ['mlp_batchnorm: "no"\n', 'resume: "false"\n', 'checkpoint: "false"\n',
                                  'augment: "yes"\n'])
def test_quoted_booleans_in_a_file_are_refused(tmp_path, text, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    field = text.split(":")[0]
    with pytest.raises(ValueError, match=rf"^{field}: must be true or false"):
        resolve(str(f))
    assert main(["train", "--config", str(f), "--out-dir", str(tmp_path / "run")]) == 2
    assert field in capsys.readouterr().err and not (tmp_path / "run").exists()
    f.write_text(text.replace('"', ""))  # unquoted YAML booleans are fine
    assert isinstance(getattr(resolve(str(f)), field), bool)
