"""Every code block of docs/integrations.md runs as written: each block marked
``<!-- test: NAME -->`` is executed after the set-up block, in a fresh namespace and a
temporary working directory (the DDP / FSDP2 and ZeRO blocks in 2 forked Gloo processes, with
the variables ``torchrun`` sets), then what it promises is checked."""

from __future__ import annotations

import os
import pathlib
import re

import pytest
import torch
import torch.multiprocessing as mp

from forked import free_port, torchrun_env

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
BLOCKS = dict(re.findall(r"<!-- test: ([\w-]+) -->\n```python\n(.*?)```", DOC.read_text(), flags=re.S))
DISTRIBUTED = ("fsdp-dcp", "zero")
NEEDS = {"lightning-clip": ["lightning"], "lightning-clars": ["lightning", "lightning-clip"]}  # blocks that continue an earlier one


def test_every_python_block_is_tested():
    n_python = DOC.read_text().count("```python")
    assert n_python == len(BLOCKS) and "setup" in BLOCKS
    assert set(BLOCKS) == {"setup", "plain", "clars-amp", "lightning", "lightning-clip", "lightning-clars", "accelerate", "timm",
                           *DISTRIBUTED}


def _run(name) -> dict:
    ns: dict = {"__name__": f"integrations_doc_{name.replace('-', '_')}"}
    for block in ["setup", *NEEDS.get(name, []), name]:
        exec(compile(BLOCKS[block], f"{DOC}:{block}", "exec"), ns)
    return ns


def _trained(model):
    fresh = {k: v for k, v in _run_setup_model().state_dict().items()}
    return all(torch.isfinite(v).all() for v in model.state_dict().values()) and any(
        not torch.equal(v, fresh[k]) for k, v in model.state_dict().items())


def _run_setup_model():
    ns: dict = {}
    exec(compile(BLOCKS["setup"], f"{DOC}:setup", "exec"), ns)
    return ns["make_model"]()


def test_plain_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run("plain")
    assert _trained(ns["model"]) and ns["scaler"].get_scale() > 1


def test_clars_under_amp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run("clars-amp")
    assert _trained(ns["model"]) and ns["opt"].last_persample is not None


def test_lightning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run("lightning")
    assert (tmp_path / "classifier.ckpt").exists()
    assert ns["resumed"].trainer.current_epoch == 4 and _trained(ns["resumed"].net)


def test_lightning_16_mixed_with_clipping(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run("lightning-clip")
    assert ns["amp"].scaler.get_scale() > 1


def test_lightning_clars_16_mixed_with_clipping(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run("lightning-clars")
    assert ns["amp"].scaler.get_scale() > 1


def test_accelerate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run("accelerate")
    assert any(f.startswith("optimizer") for f in os.listdir(tmp_path / "accelerate-state"))
    assert _trained(ns["accelerator"].unwrap_model(ns["model"]))


def test_timm(tmp_path, monkeypatch):
    from largebatch.optim import LAMB

    monkeypatch.chdir(tmp_path)
    ns = _run("timm")
    opt = ns["opt"]
    assert type(opt) is LAMB and all("lr_scale" in g and "adapt" in g for g in opt.param_groups)


def _distributed_worker(rank, world, port, name, root):
    torchrun_env(rank, world, port)
    os.chdir(root)
    _run(name)


@pytest.mark.parametrize("name", DISTRIBUTED)
def test_distributed_blocks_on_two_processes(name, tmp_path):
    mp.start_processes(_distributed_worker, args=(2, free_port(), name, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    if name == "fsdp-dcp":
        assert (tmp_path / "dcp-checkpoint" / ".metadata").exists()
    else:
        state = torch.load(tmp_path / "zero-optimizer.pt", weights_only=False)
        assert len(state["state"]) == 6  # every parameter's state, consolidated on rank 0
