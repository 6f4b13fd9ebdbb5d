"""Run directories from someone else: nothing in them runs, nothing outside them is touched, and
nothing that is not ours is deleted (issue: an attacker's and a careless user's holes).

A "malicious" file here is a pickle whose ``__reduce__`` calls ``open(MARK, "w")``: loading it the
unsafe way creates ``MARK``. Every test asserts that ``MARK`` does not exist afterwards.
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from largebatch.cli import main
from largebatch.optim import registry
from largebatch.train import config as config_mod
from largebatch.train import data, fsdp, loop, rundir
from largebatch.train.loop import train
from largebatch.train.rundir import read_table
from test_run_safety import ARGS
from test_run_safety import _cfg as safety_cfg
from test_run_safety import _quiet, _same, _snapshot, _weights, digits  # noqa: F401 (digits: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

PT_ARGS = ["pretrain", "--dataset", "digits", "--mlp-width", "16", "--mlp-depth", "1", "--projector", "16-16",
           "--batch-size", "512", "--knn-k", "20", "--no-progress"]


class Evil:
    """Unpickled the unsafe way, creates the file ``target``."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _cfg(out, **kw):
    return safety_cfg(out, **{"epochs": 3, **kw})


def _evil_checkpoint(path, mark):
    """A file with every key of a checkpoint of ours, one of whose values runs code when unpickled."""
    torch.save({k: {} for k in rundir.CHECKPOINT_KEYS} | {"epoch": 1, "global_step": 1, "history": [],
                                                           "rng": {"x": Evil(str(mark))}}, path)


# ----------------------------------------------------------------------------- 1. no code runs
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, digits):
    """3 epochs uninterrupted: what every resumed run below must equal bitwise."""
    return _weights(train(_cfg(tmp_path_factory.mktemp("full") / "r"), dataset=digits, log=_quiet).model)


def test_malicious_checkpoint_is_refused_and_resume_falls_back(tmp_path, digits, full_run):
    out, mark = tmp_path / "r", tmp_path / "PWNED"
    train(_cfg(out, stop_after_epochs=2), dataset=digits, log=_quiet)
    _evil_checkpoint(out / "checkpoint.pt", mark)
    logs = []
    res = train(_cfg(out, resume=True), dataset=digits, log=logs.append)
    assert not mark.exists()
    msg = next(s for s in logs if "falling back" in s)
    assert str(out / "checkpoint.pt") in msg and "refused, nothing in it was run" in msg and "epoch 1" in msg
    assert res.status == "finished" and _same(_weights(res.model), full_run)


def test_malicious_checkpoints_only_are_a_one_line_refusal(tmp_path, capsys):
    out, mark = tmp_path / "r", tmp_path / "PWNED"
    assert main(ARGS + ["--epochs", "3", "--stop-after-epochs", "2", "--out-dir", str(out)]) == 0
    for name in ("checkpoint.pt", "checkpoint-prev.pt"):
        _evil_checkpoint(out / name, mark)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(ARGS + ["--epochs", "3", "--resume", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert not mark.exists() and "no readable checkpoint" in err and "nothing in it was run" in err
    assert len(err.strip().splitlines()) == 1 and _snapshot(out) == before


def test_malicious_checkpoint_runs_nothing_in_linear_eval(tmp_path, capsys):
    out, mark = tmp_path / "r", tmp_path / "PWNED"
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out)]) == 0
    _evil_checkpoint(out / "checkpoint.pt", mark)
    capsys.readouterr()
    assert main(["linear-eval", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert not mark.exists() and "checkpoint.pt cannot be read" in err and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(registry.OPTIMIZERS))
def test_every_optimizers_checkpoint_is_tensors_and_plain_values(tmp_path, digits, name):
    train(_cfg(tmp_path / "r", epochs=1, optimizer=name, lr=0.01), dataset=digits, log=_quiet)
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)  # no extra safe globals
    assert state["epoch"] == 1 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


def test_checkpoint_of_an_earlier_version_resumes_bitwise(tmp_path, digits, full_run):
    """Checkpoints written before the RNG states were tensors hold NumPy's state tuple: still read."""
    out = tmp_path / "r"
    train(_cfg(out, stop_after_epochs=1), dataset=digits, log=_quiet)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    n = ck["rng"]["numpy"]
    ck["rng"]["numpy"] = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                          n["cached_gaussian"])
    torch.save(ck, out / "checkpoint.pt")
    (out / rundir.MARKER).unlink()  # and no marker: a run of an earlier version
    res = train(_cfg(out, resume=True), dataset=digits, log=_quiet)
    assert res.status == "finished" and _same(_weights(res.model), full_run)
    assert json.loads((out / rundir.MARKER).read_text())["command"] == "train"


# ----------------------------------------------------------------------------- 3. --overwrite
def _foreign(d):
    """A folder of another tool with the names a run uses."""
    (d / "checkpoint").mkdir(parents=True)
    (d / "checkpoint" / "model.safetensors").write_bytes(b"weights of another tool")
    (d / "tensorboard").mkdir()
    (d / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"events of another tool")
    (d / "config.yaml").write_text("learning_rate: 3\n")


@pytest.mark.parametrize("flag", ["--overwrite", "--resume", None])
def test_a_foreign_folder_is_never_touched(tmp_path, capsys, flag):
    out = tmp_path / "theirs"
    _foreign(out)
    before = _snapshot(out)
    rc = main(ARGS + ["--epochs", "1", "--out-dir", str(out)] + ([flag] if flag else []))
    err = capsys.readouterr().err
    assert rc == 2 and "is not a largebatch run" in err and "nothing was changed" in err and "Traceback" not in err
    assert _snapshot(out) == before and sorted(os.listdir(out)) == ["checkpoint", "config.yaml", "tensorboard"]


def test_overwrite_removes_only_what_the_run_wrote(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "2", "--out-dir", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "linear-eval").mkdir()
    (out / "linear-eval" / "pretrained.json").write_text("{}")  # results of the run being replaced
    (out / "checkpoint-prev.pt.tmp").write_bytes(b"left by a crash")
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "linear-eval").exists() and not (out / "checkpoint-prev.pt").exists()
    assert [r["epoch"] for r in read_table(str(out / "metrics.csv"))] == [1]
    # a file of the user's inside a folder the run writes: refused, nothing removed
    (out / "tensorboard").mkdir(exist_ok=True)
    (out / "tensorboard" / "my-notes.txt").write_text("mine")
    before = _snapshot(out)
    capsys.readouterr()
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "my-notes.txt" in err and "nothing was changed" in err and _snapshot(out) == before


def test_runs_of_earlier_versions_without_the_marker(tmp_path, capsys):
    """Recognised by a config.yaml and a table with our exact header; a config.yaml alone is not enough."""
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out)]) == 0
    (out / rundir.MARKER).unlink()
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out), "--overwrite"]) == 0
    assert (out / rundir.MARKER).exists()
    (out / rundir.MARKER).unlink()
    for name in ("metrics.csv", "steps.csv", "layer_stats.csv", "checkpoint.pt"):
        (out / name).unlink()
    before = _snapshot(out)  # config.yaml only: an earlier run killed in its first epoch, or not ours
    capsys.readouterr()
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out), "--overwrite"]) == 2
    assert "is not a largebatch run" in capsys.readouterr().err and _snapshot(out) == before
    (out / "metrics.csv").write_text("epoch,step,lr,loss\n1,2,0.1,0.5\n")  # a table, not with our header
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out), "--overwrite"]) == 2


# ----------------------------------------------------------------------------- 7. another command's run
@pytest.mark.parametrize("made_by,resumed_by", [("pretrain", "train"), ("train", "pretrain")])
@pytest.mark.parametrize("marker", [True, False])
def test_resume_of_another_commands_run_is_refused_before_writing(tmp_path, capsys, made_by, resumed_by, marker):
    out = tmp_path / "r"
    args = {"train": ARGS, "pretrain": PT_ARGS}
    assert main(args[made_by] + ["--epochs", "2", "--stop-after-epochs", "1", "--out-dir", str(out)]) == 0
    if not marker:
        (out / rundir.MARKER).unlink()
    before = _snapshot(out)
    capsys.readouterr()
    assert main(args[resumed_by] + ["--epochs", "2", "--resume", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"made by `largebatch {made_by}`" in err and f"largebatch {made_by} --resume" in err
    assert "Traceback" not in err and _snapshot(out) == before  # config.yaml byte-identical


# ----------------------------------------------------------------------------- 8. damaged --fsdp shards
@pytest.fixture(scope="module")
def fsdp_full(tmp_path_factory):
    return fsdp.full_state_dict(train(_cfg(tmp_path_factory.mktemp("ff") / "r", fsdp=True, device="cpu"),
                                      log=_quiet).model)


@pytest.mark.parametrize("damage", ["truncated", "deleted", "corrupt", "evil-meta", "evil-metadata"])
def test_damaged_fsdp_checkpoint_falls_back_to_the_previous(tmp_path, fsdp_full, damage):
    out, mark = tmp_path / "r", tmp_path / "PWNED"
    train(_cfg(out, fsdp=True, device="cpu", stop_after_epochs=2), log=_quiet)
    shard = out / "checkpoint" / "__0_0.distcp"
    raw = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(raw[: len(raw) // 2])
    elif damage == "deleted":
        shard.unlink()
    elif damage == "corrupt":  # same size, a few bytes of the data changed
        shard.write_bytes(raw[:-200] + bytes(b ^ 0xFF for b in raw[-200:-100]) + raw[-100:])
    elif damage == "evil-meta":
        _evil_checkpoint(out / "checkpoint" / "meta.pt", mark)
    else:  # DCP's own index, which torch.distributed.checkpoint itself reads with pickle.load
        with open(out / "checkpoint" / ".metadata", "wb") as f:
            pickle.dump(Evil(str(mark)), f)
    logs = []
    res = train(_cfg(out, fsdp=True, device="cpu", resume=True), log=logs.append)
    assert not mark.exists()
    msg = next(s for s in logs if "falling back" in s)
    assert "checkpoint-prev" in msg and "(epoch 1)" in msg, msg
    want = {"truncated": "is truncated", "deleted": "is missing", "corrupt": "is damaged",
            "evil-meta": "nothing in it was run", "evil-metadata": "nothing in it was run"}[damage]
    assert want in msg, msg
    assert res.status == "finished" and _same(fsdp.full_state_dict(res.model), fsdp_full)


def _edit_metadata(path, fn):
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)  # the test's own file
    fn(md)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


@pytest.mark.parametrize("edit,want", [("huge", "which its shards do not hold"), ("outside", "outside the folder"),
                                       ("bytes", "nothing in it was run")])
def test_fsdp_metadata_that_lies_is_refused_before_anything_is_allocated_or_read(tmp_path, edit, want):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    out = tmp_path / "r"
    train(_cfg(out, fsdp=True, device="cpu", stop_after_epochs=2), log=_quiet)
    (tmp_path / "outside.distcp").write_bytes(b"x" * 10)

    def lie(md):
        key = next(k for k in md.state_dict_metadata if k.startswith("optim.state.") and md.state_dict_metadata[k].size)
        if edit == "huge":  # 10^12 elements: a 4 TB allocation before any data is read
            md.state_dict_metadata[key].size = torch.Size([10**6, 10**6])
        elif edit == "outside":
            info = next(iter(md.storage_data.values()))
            info.relative_path = "../../outside.distcp"
        else:  # an entry DCP would load with torch.load(weights_only=False)
            md.state_dict_metadata[key] = BytesStorageMetadata()

    _edit_metadata(out / "checkpoint", lie)
    logs = []
    res = train(_cfg(out, fsdp=True, device="cpu", resume=True), log=logs.append)
    assert res.status == "finished" and any("falling back" in s and want in s for s in logs), logs


# ----------------------------------------------------------------------------- 9. a full disk
def _limited(code, limit):
    """Run ``code`` in a child whose files may not grow beyond ``limit`` bytes (SIGXFSZ ignored:
    a write past it fails with EFBIG, as a full disk fails with ENOSPC)."""
    prog = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        import argparse
        from largebatch.train import cli

        def main(argv):  # `largebatch train` without importing the other sub-commands
            p = argparse.ArgumentParser()
            cli.add_arguments(p)
            return cli.run(p.parse_args(argv[1:]))
        """) + textwrap.dedent(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, timeout=300)


def test_full_disk_while_tables_are_rewritten_on_resume(tmp_path):
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "3", "--stop-after-epochs", "2", "--batch-size", "64", "--out-dir",
                        str(out)]) == 0
    stats = os.path.getsize(out / "layer_stats.csv")
    assert stats > 8000 > os.path.getsize(out / "config.yaml")  # the limit stops the layer-statistics rewrite only
    before = _snapshot(out)
    args = ARGS + ["--epochs", "3", "--batch-size", "64", "--resume", "--out-dir", str(out)]
    p = _limited(f"sys.exit(main({args!r}))", 8000)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and "layer_stats.csv" in p.stderr and "disk full?" in p.stderr
    assert "--resume" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert {k: v for k, v in _snapshot(out).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}
    assert main(args) == 0 and [r["epoch"] for r in read_table(str(out / "metrics.csv"))] == [1, 2, 3]


def test_failed_config_write_leaves_no_tmp(tmp_path, monkeypatch, capsys):
    import yaml

    def full(data, f, **k):
        f.write("dataset: dig")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(yaml, "safe_dump", full)
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "config.yaml" in err and "No space left" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(out)) == [".largebatch-run", ".lock"]  # no config.yaml.tmp, no 0-byte file


def test_full_disk_while_writing_a_table_at_the_end_of_an_epoch(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    real = rundir.Table._rows

    def full(self, f, rows, header):
        if self.path.endswith("metrics.csv") and rows and rows[-1]["epoch"] == 2:
            f.write("epoch,st")
            raise OSError(28, "No space left on device")
        return real(self, f, rows, header)

    monkeypatch.setattr(rundir.Table, "_rows", full)
    assert main(ARGS + ["--epochs", "3", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "metrics.csv" in err and "No space left" in err and "Traceback" not in err
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert [r["epoch"] for r in read_table(str(out / "metrics.csv"))] == [1]
    monkeypatch.setattr(rundir.Table, "_rows", real)
    assert main(ARGS + ["--epochs", "3", "--out-dir", str(out), "--resume"]) == 0
    assert [r["epoch"] for r in read_table(str(out / "metrics.csv"))] == [1, 2, 3]


# ----------------------------------------------------------------------------- low: user mistakes
@pytest.mark.parametrize("value", ["5", "[a, b]", "{x: 1}"])
def test_out_dir_of_another_type_in_a_config_file(tmp_path, capsys, value):
    p = tmp_path / "c.yaml"
    p.write_text(f"out_dir: {value}\n")
    assert main(["train", "--config", str(p), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "out_dir: must be a string" in err and len(err.strip().splitlines()) == 1


def test_linear_eval_on_a_read_only_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out)]) == 0
    os.chmod(out, 0o555)
    if os.geteuid() == 0:  # root writes anyway: what a read-only folder answers
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p).startswith(str(out)) else real(p, m, **k))
        os.makedirs(out / "linear-eval")
    try:
        capsys.readouterr()
        assert main(["linear-eval", str(out), "--epochs", "1"]) == 2
    finally:
        os.chmod(out, 0o755)
    err = capsys.readouterr().err
    assert "cannot write" in err and "linear-eval" in err and "writable folder" in err and "Traceback" not in err


def test_linear_eval_after_config_yaml_was_edited(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out)]) == 0
    cfg = out / "config.yaml"
    cfg.write_text(cfg.read_text().replace("mlp_width: 16", "mlp_width: 32"))
    capsys.readouterr()
    assert main(["linear-eval", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml was edited" in err and "mlp_width 16 in the checkpoint, 32 now" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sigterm_is_one_line_and_the_resumed_run_is_exact(tmp_path, capsys, monkeypatch, full_run):
    out = tmp_path / "r"
    real = loop._train_epoch

    def killed_in_epoch_2(setup, run, epoch, *a, **k):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(setup, run, epoch, *a, **k)

    monkeypatch.setattr(loop, "_train_epoch", killed_in_epoch_2)
    assert main(ARGS + ["--epochs", "3", "--out-dir", str(out)]) == 143
    err = capsys.readouterr().err
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the command's only
    monkeypatch.setattr(loop, "_train_epoch", real)
    assert main(ARGS + ["--epochs", "3", "--out-dir", str(out), "--resume"]) == 0
    assert _same(torch.load(out / "checkpoint.pt", weights_only=True)["model"], full_run)


def test_resume_of_a_finished_run_says_it_is_complete(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "2", "--out-dir", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(ARGS + ["--epochs", "2", "--out-dir", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "already complete (2 of 2 epochs" in printed and "continuing" not in printed and "epoch 1/" not in printed
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------- new attacks
def test_a_lock_file_linked_elsewhere_is_not_written_through(tmp_path, capsys):
    out, victim = tmp_path / "r", tmp_path / "victim.txt"
    assert main(ARGS + ["--epochs", "2", "--stop-after-epochs", "1", "--out-dir", str(out)]) == 0
    victim.write_text("precious")
    (out / ".lock").unlink()
    (out / ".lock").symlink_to(victim)  # the old code truncated the target and wrote its pid there
    capsys.readouterr()
    assert main(ARGS + ["--epochs", "2", "--out-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert victim.read_text() == "precious" and "symbolic link" in err and ".lock" in err


@pytest.mark.parametrize("name", ["metrics.csv", "steps.csv", "failure.json", "tensorboard"])
def test_a_run_file_linked_elsewhere_is_refused(tmp_path, capsys, name):
    out, victim = tmp_path / "r", tmp_path / "victim"
    assert main(ARGS + ["--epochs", "2", "--stop-after-epochs", "1", "--out-dir", str(out)]) == 0
    victim.mkdir() if name == "tensorboard" else victim.write_text("precious")
    if os.path.lexists(out / name):
        os.rename(out / name, tmp_path / "moved")
    (out / name).symlink_to(victim)
    before = _snapshot(victim) if victim.is_dir() else victim.read_text()
    for flag in ("--resume", "--overwrite"):
        capsys.readouterr()
        assert main(ARGS + ["--epochs", "2", "--out-dir", str(out), flag]) == 2
        err = capsys.readouterr().err
        assert f"{name} is a symbolic link" in err and "nothing was changed" in err
    assert (_snapshot(victim) if victim.is_dir() else victim.read_text()) == before and victim.exists()


def test_tmp_files_linked_elsewhere_are_replaced_not_written_through(tmp_path, digits, monkeypatch):
    """A ``.tmp`` left in the folder (by a crash, or planted) is removed, never written through."""
    out, victim = tmp_path / "r", tmp_path / "victim.txt"
    victim.write_text("precious")
    out.mkdir()
    names = ["config.yaml.tmp", "metrics.csv.tmp", "checkpoint.pt.tmp", rundir.MARKER + ".tmp", "failure.json.tmp"]
    for n in names:
        (out / n).symlink_to(victim)
    calls = {"n": 0}
    real = loop.evaluate

    def nan_at_epoch_2(*a, **k):  # the run ends writing failure.json
        calls["n"] += 1
        loss, acc = real(*a, **k)
        return (float("nan") if calls["n"] == 2 else loss), acc

    monkeypatch.setattr(loop, "evaluate", nan_at_epoch_2)
    res = train(_cfg(out, epochs=2), dataset=digits, log=_quiet)
    assert res.status == "nonfinite" and (out / "failure.json").is_file() and (out / "checkpoint.pt").is_file()
    assert victim.read_text() == "precious" and not any(os.path.lexists(out / n) for n in names)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_checkpoint_that_is_not_a_regular_file_is_refused(tmp_path, capsys, kind):
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "2", "--stop-after-epochs", "1", "--out-dir", str(out)]) == 0
    (out / "checkpoint.pt").unlink()
    if kind == "symlink":
        (out / "checkpoint.pt").symlink_to("/dev/zero")
    else:  # reading a FIFO blocks until someone writes it: the old code waited forever
        os.mkfifo(out / "checkpoint.pt")
    capsys.readouterr()
    assert main(ARGS + ["--epochs", "2", "--out-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is " in err and ("symbolic link" if kind == "symlink" else "not a regular file") in err


def test_a_cifar_batch_that_runs_code_is_refused(tmp_path):
    """A shared run's config.yaml may name any data_dir: its pickle batches must not run code."""
    folder, mark = tmp_path / "cifar-10-batches-py", tmp_path / "PWNED"
    folder.mkdir()
    for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / n, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": Evil(str(mark))}, f)
    with pytest.raises(data.DataError, match="data_batch_1: not a readable pickle batch.*nothing in it was run"):
        data.load("cifar10", str(tmp_path))
    assert not mark.exists()


def test_resume_on_a_folder_holding_only_a_foreign_config_does_not_replace_it(tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "config.yaml").write_text("lr: 1\n")  # old code: "starting it from scratch", then rewrote this file
    capsys.readouterr()
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out), "--resume"]) == 2
    assert (out / "config.yaml").read_text() == "lr: 1\n" and sorted(os.listdir(out)) == ["config.yaml"]


class HugeTensor:
    """Unpickles to a 10^12-element tensor over a 4-element storage (if torch allowed it)."""

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (torch.zeros(4).untyped_storage(), 0, (10**6, 10**6), (10**6, 1), False, {}))


@pytest.mark.parametrize("lie", ["epoch-str", "history-int", "huge-tensor"])
def test_a_checkpoint_with_values_of_the_wrong_kind_falls_back(tmp_path, digits, full_run, lie):
    out = tmp_path / "r"
    train(_cfg(out, stop_after_epochs=2), dataset=digits, log=_quiet)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    if lie == "epoch-str":  # old code: a TypeError traceback comparing it with --epochs
        ck["epoch"] = "2"
    elif lie == "history-int":
        ck["history"] = 7
    else:
        ck["model"]["1.weight"] = HugeTensor()
    torch.save(ck, out / "checkpoint.pt")
    logs = []
    res = train(_cfg(out, resume=True), dataset=digits, log=logs.append)
    assert any("falling back" in s for s in logs) and _same(_weights(res.model), full_run)


# ----------------------------------------------------------------------------- 8. on two processes
def _damaged_shard_worker(rank, world, port, root):
    import torch.distributed as dist

    from forked import torchrun_env

    torchrun_env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logs = []
    try:
        kw = dict(fsdp=True, device="cpu", mlp_width=45, batch_size=256)
        full = fsdp.full_state_dict(train(_cfg(f"{root}/full", **kw), log=_quiet).model)
        train(_cfg(f"{root}/r", stop_after_epochs=2, **kw), log=_quiet)
        dist.barrier()
        if rank == 0:  # rank 1's shard of the latest checkpoint is lost
            os.remove(os.path.join(root, "r", "checkpoint", "__1_0.distcp"))
        dist.barrier()
        res = train(_cfg(f"{root}/r", resume=True, **kw), log=logs.append)
        out = {"logs": logs, "status": res.status, "same": _same(fsdp.full_state_dict(res.model), full)}
    finally:
        dist.destroy_process_group()
    torch.save(out, os.path.join(root, f"rank{rank}.pt"))


def test_a_lost_shard_falls_back_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    from forked import free_port

    data.load("digits")
    mp.start_processes(_damaged_shard_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert any("__1_0.distcp is missing" in s and "checkpoint-prev (epoch 1)" in s for s in r["logs"]), r["logs"]
        assert r["status"] == "finished" and r["same"]


@pytest.mark.parametrize("lie", ["shape", "lr"])
def test_a_checkpoint_that_does_not_fit_the_run_is_refused_before_writing(tmp_path, capsys, lie):
    out = tmp_path / "r"
    assert main(ARGS + ["--epochs", "2", "--stop-after-epochs", "1", "--out-dir", str(out)]) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    if lie == "shape":  # old code: a traceback after config.yaml was rewritten
        ck["model"]["1.weight"] = torch.zeros(3, 3)
    else:  # old code: a TypeError traceback at the first step
        ck["optimizer"]["param_groups"][0]["lr"] = "0.1"
    torch.save(ck, out / "checkpoint.pt")
    before = _snapshot(out)
    capsys.readouterr()
    assert main(ARGS + ["--epochs", "2", "--resume", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt does not fit this run" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and _snapshot(out) == before


# ----------------------------------------------------------------------------- "billion laughs"
def _laughs(levels=9):
    """A list of 10^levels strings built from ``levels`` lists of 10 references each."""
    a = ["ha"] * 10
    for _ in range(levels - 1):
        a = [a] * 10
    return a


def test_a_config_file_of_nested_anchors_is_refused_at_once(tmp_path):
    """500 bytes of YAML anchors stand for 10^9 values: the old code hung expanding them."""
    lines = ["momentum: [&a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f", &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    p = tmp_path / "c.yaml"
    p.write_text("".join(lines) + "]\n")
    with pytest.raises(ValueError, match=r"c\.yaml holds more than 10000 values"):
        config_mod.resolve(str(p))


def test_a_checkpoint_of_nested_references_falls_back(tmp_path, digits, full_run):
    out = tmp_path / "r"
    train(_cfg(out, stop_after_epochs=2), dataset=digits, log=_quiet)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    ck["config"]["lr"] = _laughs()  # old code: printing it in "lr: differs" never ended
    torch.save(ck, out / "checkpoint.pt")
    assert os.path.getsize(out / "checkpoint.pt") < 10**6
    logs = []
    res = train(_cfg(out, resume=True), dataset=digits, log=logs.append)
    assert any("falling back" in s and "more than" in s for s in logs) and _same(_weights(res.model), full_run)


def test_a_malicious_linear_eval_cache_runs_nothing(tmp_path, capsys):
    out, mark = tmp_path / "r", tmp_path / "PWNED"
    assert main(ARGS + ["--epochs", "1", "--out-dir", str(out)]) == 0
    (out / "linear-eval").mkdir()
    torch.save({"key": Evil(str(mark))}, out / "linear-eval" / "features-pretrained.pt")
    assert main(["linear-eval", str(out), "--epochs", "1"]) == 0  # the cache is recomputed
    assert not mark.exists() and torch.load(out / "linear-eval" / "features-pretrained.pt", weights_only=True)["key"]
