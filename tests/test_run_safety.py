"""Runs never lose data and never fail with a traceback for a user's mistake.

Each test drives `largebatch train` (or `train()`) into one situation a tester found: a run
directory that already holds a run, two processes on one directory, unreadable checkpoints,
a full disk, a bad ``--out-dir``, a malformed config file, a non-finite test loss, Ctrl-C.
"""

import fcntl
import hashlib
import os

import pytest
import torch

from largebatch.cli import main
from largebatch.train import config as config_mod
from largebatch.train import data, loop, rundir
from largebatch.train.config import TrainConfig
from largebatch.train.loop import train
from largebatch.train.rundir import read_table

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["train", "--dataset", "digits", "--mlp-width", "16", "--mlp-depth", "1", "--batch-size", "512",
        "--optimizer", "lars", "--lr", "1", "--schedule", "none", "--stats-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _cfg(out, **kw):
    base = dict(dataset="digits", model="mlp", mlp_depth=1, mlp_width=16, batch_size=512, epochs=2,
                optimizer="lars", lr=1.0, schedule="none", out_dir=str(out), progress=False, stats_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(s):
    pass


def _snapshot(d):
    """name -> sha256 of every file under ``d``, and the target of every link (what a refused
    invocation must leave as it was)."""
    out = {}
    for root, dirs, files in os.walk(d):
        for f in files + [x for x in dirs if os.path.islink(os.path.join(root, x))]:
            p = os.path.join(root, f)
            if os.path.islink(p):
                out[os.path.relpath(p, d)] = "link: " + os.readlink(p)
            else:
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, d)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- an existing run
@pytest.mark.parametrize("extra", [["--no-checkpoint"], []])
def test_a_run_directory_is_never_rewritten_without_resume_or_overwrite(tmp_path, capsys, extra):
    out = str(tmp_path / "r")
    assert main(ARGS + ["--epochs", "1", "--out-dir", out] + extra) == 0
    before = _snapshot(out)
    capsys.readouterr()
    rc = main(ARGS + ["--epochs", "1", "--out-dir", out, "--lr", "2", "--no-checkpoint"])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a run" in err and "--overwrite" in err and "Traceback" not in err
    assert _snapshot(out) == before


def test_resume_without_checkpointing_is_refused(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(ARGS + ["--epochs", "1", "--out-dir", out]) == 0
    before = _snapshot(out)
    assert main(ARGS + ["--epochs", "1", "--out-dir", out, "--resume", "--no-checkpoint"]) == 2
    assert "resume: needs checkpoint" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_resume_of_a_run_that_never_checkpointed_is_refused(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(ARGS + ["--epochs", "1", "--out-dir", out, "--no-checkpoint"]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(ARGS + ["--epochs", "1", "--out-dir", out, "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_overwrite_replaces_the_run(tmp_path, digits):
    out = tmp_path / "r"
    train(_cfg(out, epochs=2, metrics_format="jsonl"), dataset=digits, log=_quiet)
    res = train(_cfg(out, epochs=1, overwrite=True), dataset=digits, log=_quiet)
    fresh = train(_cfg(tmp_path / "fresh", epochs=1), dataset=digits, log=_quiet)
    assert res.status == "finished" and _same(_weights(res.model), _weights(fresh.model))
    names = set(os.listdir(out))
    assert "metrics.jsonl" not in names and "checkpoint-prev.pt" not in names  # the old run's files are gone
    assert len(read_table(str(out / "metrics.csv"))) == 1
    with pytest.raises(ValueError, match="overwrite: cannot be combined with resume"):
        _cfg(out, overwrite=True, resume=True).validate()


# ----------------------------------------------------------------------------- two processes
def test_a_directory_in_use_by_another_process_is_refused(tmp_path, digits):
    out = tmp_path / "r"
    train(_cfg(out, epochs=2, stop_after_epochs=1), dataset=digits, log=_quiet)
    before = _snapshot(out)
    with open(out / ".lock", "a+") as held:  # what a still-running job holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="in use by another largebatch run"):
            train(_cfg(out, epochs=2, resume=True), dataset=digits, log=_quiet)
        with pytest.raises(ValueError, match="in use by another largebatch run"):
            train(_cfg(out, epochs=2, overwrite=True), dataset=digits, log=_quiet)
    assert _snapshot(out) == before
    res = train(_cfg(out, epochs=2, resume=True), dataset=digits, log=_quiet)  # released: resume works
    assert res.status == "finished" and [r["epoch"] for r in read_table(str(out / "metrics.csv"))] == [1, 2]


def test_a_run_that_appeared_while_starting_is_not_overwritten(tmp_path, digits, monkeypatch):
    out = tmp_path / "r"
    real = loop._build

    def other_run_starts_meanwhile(*a, **k):
        os.makedirs(out, exist_ok=True)
        (out / "config.yaml").write_text("lr: 3.0\n")
        return real(*a, **k)

    monkeypatch.setattr(loop, "_build", other_run_starts_meanwhile)
    with pytest.raises(ValueError, match="changed while this run was starting"):
        train(_cfg(out), dataset=digits, log=_quiet)
    assert (out / "config.yaml").read_text() == "lr: 3.0\n"


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "foreign"])
def test_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path, digits, damage):
    full = train(_cfg(tmp_path / "full", epochs=3), dataset=digits, log=_quiet)
    out = tmp_path / "r"
    train(_cfg(out, epochs=3, stop_after_epochs=2), dataset=digits, log=_quiet)
    ck = out / "checkpoint.pt"
    assert torch.load(out / "checkpoint-prev.pt", weights_only=False)["epoch"] == 1
    raw = ck.read_bytes()
    ck.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"", "random": os.urandom(4096)}.get(damage, b""))
    if damage == "foreign":
        torch.save({"state_dict": {}}, ck)
    logs = []
    res = train(_cfg(out, epochs=3, resume=True), dataset=digits, log=logs.append)
    assert any("falling back to the previous checkpoint" in s and "epoch 1" in s for s in logs)
    assert res.status == "finished" and _same(_weights(res.model), _weights(full.model))
    assert [r["epoch"] for r in read_table(str(out / "metrics.csv"))] == [1, 2, 3]
    assert [r["step"] for r in read_table(str(out / "steps.csv"))] == list(range(6))


def test_no_readable_checkpoint_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "3", "--stop-after-epochs", "2", "--out-dir", str(out)]) == 0
    (out / "checkpoint.pt").write_bytes(b"\x00" * 100)
    (out / "checkpoint-prev.pt").write_bytes(b"")
    capsys.readouterr()
    assert main(ARGS + ["--epochs", "3", "--resume", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no readable checkpoint" in err and "checkpoint-prev.pt" in err and "Traceback" not in err


def test_full_disk_keeps_the_previous_checkpoint_and_no_tmp(tmp_path, digits, monkeypatch, capsys):
    out = tmp_path / "r"
    real = torch.save
    calls = {"n": 0}

    def disk_full(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's checkpoint: half written, then the disk is full
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full)
    rc = main(ARGS + ["--epochs", "3", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "disk full?" in err and "checkpoint.pt is kept" in err and "Traceback" not in err
    assert not (out / "checkpoint.pt.tmp").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    monkeypatch.setattr(torch, "save", real)
    assert main(ARGS + ["--epochs", "3", "--out-dir", str(out), "--resume"]) == 0


# ----------------------------------------------------------------------------- the out-dir itself
@pytest.mark.parametrize("where", ["file", "under_file"])
def test_an_out_dir_that_cannot_be_a_directory(tmp_path, capsys, where):
    f = tmp_path / "f"
    f.write_text("mine")
    out = f if where == "file" else f / "run"
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "out_dir:" in err and "not a directory" in err and "Traceback" not in err
    assert f.read_text() == "mine"


def test_a_model_too_big_for_memory_is_refused_before_the_directory_exists(tmp_path, capsys):
    out = tmp_path / "r"
    # a 10^6 x 10^6 hidden layer (4 TB): the allocation itself fails, nothing is touched
    assert main(ARGS + ["--epochs", "1", "--mlp-depth", "2", "--mlp-width", str(10**6), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model: mlp" in err and "does not fit in memory" in err
    assert not out.exists()


# ----------------------------------------------------------------------------- how runs end
def test_nonfinite_message_says_what_to_do(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "2", "--lr", "1e30", "--optimizer", "sgd", "--out-dir", str(out)]) == 3
    msg = capsys.readouterr().out
    assert "another --out-dir" in msg and "--overwrite" in msg and "Try a lower --lr" not in msg
    assert main(ARGS + ["--epochs", "2", "--lr", "0.1", "--optimizer", "sgd", "--out-dir", str(out),
                        "--overwrite"]) == 0


def test_nonfinite_test_loss_stops_the_run(tmp_path, digits, monkeypatch):
    calls = {"n": 0}
    real = loop.evaluate

    def second_eval_nan(*a, **k):
        calls["n"] += 1
        loss, acc = real(*a, **k)
        return (float("nan") if calls["n"] == 2 else loss), acc

    monkeypatch.setattr(loop, "evaluate", second_eval_nan)
    cfg = _cfg(tmp_path / "r", epochs=3)
    res = train(cfg, dataset=digits, log=_quiet)
    assert res.status == "nonfinite" and "non-finite test loss" in res.failure["message"]
    assert res.failure["epoch"] == 2
    assert torch.load(os.path.join(cfg.out_dir, "checkpoint.pt"), weights_only=False)["epoch"] == 1
    assert os.path.exists(os.path.join(cfg.out_dir, "failure.json"))


def test_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(cfg, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    assert main(ARGS + ["--out-dir", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- continuing runs
def test_epochs_can_be_extended_when_the_schedule_does_not_depend_on_them(tmp_path, digits):
    kw = dict(optimizer="tvlars", lr=1.0)
    long = train(_cfg(tmp_path / "long", epochs=3, **kw), dataset=digits, log=_quiet)
    out = tmp_path / "r"
    train(_cfg(out, epochs=2, **kw), dataset=digits, log=_quiet)
    res = train(_cfg(out, epochs=3, resume=True, **kw), dataset=digits, log=_quiet)
    assert res.status == "finished" and _same(_weights(res.model), _weights(long.model))
    assert config_mod.load_file(str(out / "config.yaml"))["epochs"] == 3
    with pytest.raises(ValueError, match="^epochs: the run .* already completed 3 epochs"):
        train(_cfg(out, epochs=2, resume=True, **kw), dataset=digits, log=_quiet)


def test_epochs_of_a_cosine_run_cannot_be_extended(tmp_path, digits):
    out = tmp_path / "r"
    train(_cfg(out, epochs=2, schedule="cosine"), dataset=digits, log=_quiet)
    with pytest.raises(ValueError, match="^epochs: .*'cosine' schedule .*cannot be extended"):
        train(_cfg(out, epochs=3, schedule="cosine", resume=True), dataset=digits, log=_quiet)


def test_saved_config_does_not_carry_stop_after_epochs(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "3", "--stop-after-epochs", "1", "--out-dir", str(out)]) == 0
    saved = config_mod.load_file(str(out / "config.yaml"))
    assert not {"stop_after_epochs", "resume", "overwrite"} & set(saved)
    assert main(["train", "--config", str(out / "config.yaml"), "--resume"]) == 0
    assert [r["epoch"] for r in read_table(str(out / "metrics.csv"))] == [1, 2, 3]


# ----------------------------------------------------------------------------- config files
@pytest.mark.parametrize("name,text,where", [
    ("c.yaml", "lr: [1, 2\nepochs: 3\n", "line"),
    ("c.yaml", "lr: 1\n  epochs: 3\n", "line 2"),
    ("c.toml", "lr = \n", "line 1"),
    ("c.json", '{"lr": 1,}', "line 1"),
    ("c.json", b"\xff\xfe", "not UTF-8"),
])
def test_malformed_config_files_are_named(tmp_path, capsys, name, text, where):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["train", "--config", str(p), "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and where in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-3\nweight_decay: 5e-4\n")  # strings to YAML 1.1
    cfg = config_mod.resolve(str(p))
    assert cfg.lr == 0.001 and cfg.weight_decay == 0.0005


@pytest.mark.parametrize("value,msg", [('"a,b"', "betas: must be two numbers"), ("[0.9]", "betas: must be two"),
                                       ("[0.9, true]", "betas: must be two")])
def test_bad_betas_in_a_file_name_the_field(tmp_path, value, msg):
    p = tmp_path / "c.yaml"
    p.write_text(f"optimizer: lamb\nbetas: {value}\n")
    with pytest.raises(ValueError, match=msg):
        config_mod.resolve(str(p))


def test_range_message_does_not_promise_inf(tmp_path):
    with pytest.raises(ValueError) as e:
        config_mod.resolve(None, {"lr": float("inf")})
    assert "inf]" not in str(e.value) and "finite number >= 0" in str(e.value)
    with pytest.raises(ValueError, match=r"poly_power: must be a finite number > 0"):
        config_mod.resolve(None, {"poly_power": 0.0})


# ----------------------------------------------------------------------------- plot
@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_plot_of_a_truncated_metrics_file(tmp_path, capsys, cut):
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "3", "--out-dir", str(out)]) == 0
    m = out / "metrics.csv"
    raw = m.read_bytes()
    m.write_bytes(raw[: int(len(raw) * cut)])
    capsys.readouterr()
    rc = main(["plot", str(out), "--out", str(tmp_path / "fig")])
    err = capsys.readouterr().err
    assert "Traceback" not in err and rc in (0, 2)
    assert rc == 0 or "metrics" in err
