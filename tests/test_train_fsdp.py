"""``--fsdp``: the harness on FSDP2 (two forked Gloo processes on CPU) and its sharded checkpoints.

One spawn of two ranks runs, per optimizer, the same configuration under DDP and under FSDP2
(3 epochs), and FSDP2 stopped after one epoch. Then: FSDP2 equals DDP; the stopped run resumed on
2 ranks equals the uninterrupted one bitwise; a checkpoint of 2 ranks resumed on 1 process equals
the 2-rank run to float32 rounding of a different reduction order.
"""

import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from forked import free_port, torchrun_env
from largebatch.train import data, fsdp
from largebatch.train.config import TrainConfig
from largebatch.train.loop import train
from largebatch.train.rundir import read_table

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZERS = ("lamb", "clars", "sgd")


def _cfg(out, optimizer, **kw):
    # uneven shards: widths 30 and 10 classes over 2 ranks are even, 45 is not; BatchNorm on
    base = dict(dataset="digits", model="mlp", mlp_depth=2, mlp_width=45, mlp_batchnorm=True, batch_size=256,
                micro_batch_size=64, epochs=3, optimizer=optimizer, lr=0.5 if optimizer != "lamb" else 0.01,
                schedule="cosine", warmup_epochs=1, out_dir=out, progress=False, stats_every=2, device="cpu",
                optimizer_path="auto" if optimizer == "sgd" else "foreach")
    base.update(kw)
    return TrainConfig(**base)


def _result(res, info=None):
    return {"status": res.status, "history": res.history, "weights": fsdp.full_state_dict(res.model)}


def _worker(rank, world, port, root, phase):
    torchrun_env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)  # one group for all runs of this worker
    out = {}
    try:
        for name in OPTIMIZERS:
            d = os.path.join(root, name)
            if phase == 1:
                out[name, "ddp"] = _result(train(_cfg(f"{d}/ddp", name), log=lambda s: None))
                out[name, "fsdp"] = _result(train(_cfg(f"{d}/fsdp", name, fsdp=True), log=lambda s: None))
                out[name, "stopped"] = _result(train(_cfg(f"{d}/resumed", name, fsdp=True, stop_after_epochs=1),
                                                     log=lambda s: None))
                # without BatchNorm (whose statistics depend on how rows are grouped into
                # forwards), one process computes the 2-rank gradients up to rounding
                out[name, "nobn"] = _result(train(_cfg(f"{d}/nobn", name, fsdp=True, mlp_batchnorm=False),
                                                  log=lambda s: None))
                train(_cfg(f"{d}/nobn-stopped", name, fsdp=True, mlp_batchnorm=False, stop_after_epochs=1),
                      log=lambda s: None)
                if name == "sgd":  # FSDP2 mixed precision: bf16 compute, float32 sharded weights and reduction
                    res = train(_cfg(f"{d}/bf16", name, fsdp=True, fsdp_param_dtype="bf16"), log=lambda s: None)
                    out[name, "bf16"] = {**_result(res), "dtypes": {p.dtype for p in res.model.parameters()}}
            else:
                out[name, "resumed"] = _result(train(_cfg(f"{d}/resumed", name, fsdp=True, resume=True),
                                                     log=lambda s: None))
    finally:
        dist.destroy_process_group()
    torch.save(out, os.path.join(root, f"phase{phase}-rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data.load("digits")  # warm the imports: forked workers inherit them
    mp.start_processes(_worker, args=(2, free_port(), str(root), 1), nprocs=2, join=True, start_method="fork")
    for name in OPTIMIZERS:  # a copy of the 1-epoch checkpoint, resumed on one process below
        shutil.copytree(root / name / "nobn-stopped", root / name / "single")
    mp.start_processes(_worker, args=(2, free_port(), str(root), 2), nprocs=2, join=True, start_method="fork")
    res = {}
    for phase in (1, 2):
        for rank in (0, 1):
            for k, v in torch.load(root / f"phase{phase}-rank{rank}.pt", weights_only=False).items():
                res[(*k, rank)] = v
    for name in OPTIMIZERS:
        res[name, "single", 0] = _result(train(_cfg(str(root / name / "single"), name, fsdp=True, resume=True,
                                                    mlp_batchnorm=False), log=lambda s: None))
    return root, res


def _close(a, b, rel):
    """Every tensor of ``a`` within ``rel`` of ``b``'s in norm (0: bitwise)."""
    assert a.keys() == b.keys()
    for k in a:
        if rel == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            x, y = a[k].double(), b[k].double()
            assert (x - y).norm() <= rel * y.norm() + 1e-12, (k, float((x - y).norm() / y.norm()))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp_equals_ddp(runs, name):
    _, r = runs
    assert r[name, "fsdp", 0]["status"] == "finished"
    for rank in (0, 1):  # FSDP gathers to the same full model on both ranks
        _close(r[name, "fsdp", rank]["weights"], r[name, "fsdp", 0]["weights"], 0)
    # float32 rounding of reduce-scatter vs all-reduce; LAMB's m / sqrt(v) amplifies it on coordinates
    # whose gradients are near zero (the optimizer step itself is held at 1e-9 in float64 by test_sharded)
    _close(r[name, "fsdp", 0]["weights"], r[name, "ddp", 0]["weights"], 1e-4 if name == "lamb" else 1e-5)
    f, d = r[name, "fsdp", 0]["history"], r[name, "ddp", 0]["history"]
    assert [h["train_loss"] for h in f] == pytest.approx([h["train_loss"] for h in d], rel=1e-5)


def test_fsdp_bf16_parameters_keep_float32_master_weights(runs):
    _, r = runs
    bf16, fp32 = r["sgd", "bf16", 0], r["sgd", "fsdp", 0]
    assert bf16["status"] == "finished" and bf16["dtypes"] == {torch.float32}
    # bfloat16 forward/backward (8 bits of mantissa): 2.2% after 15 steps here, as autocast to bf16
    # on one process (2.5%)
    _close(bf16["weights"], fp32["weights"], 5e-2)
    assert [h["train_loss"] for h in bf16["history"]] == pytest.approx([h["train_loss"] for h in fp32["history"]],
                                                                       rel=1e-2)
    with pytest.raises(AssertionError):  # ... but not the float32 run
        _close(bf16["weights"], fp32["weights"], 1e-6)


def test_units_shard_blocks_and_layers():
    from largebatch.models import build_model

    net = build_model("resnet20", 10, (3, 32, 32))
    kinds = [type(u).__name__ for u in fsdp.units(net)]
    assert kinds == ["Conv2d", "BatchNorm2d"] + ["BasicBlock"] * 9 + ["Linear"]
    mlp = build_model("mlp", 10, (1, 8, 8), mlp_depth=2, mlp_width=16)
    assert [type(u).__name__ for u in fsdp.units(mlp)] == ["Linear", "BatchNorm1d"] * 2 + ["Linear"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sharded_checkpoint_resumes_bitwise_on_same_ranks(runs, name):
    root, r = runs
    assert os.path.exists(root / name / "resumed" / "checkpoint" / ".metadata")
    assert os.path.exists(root / name / "resumed" / "checkpoint-prev" / "meta.pt")
    assert not os.path.exists(root / name / "resumed" / "checkpoint.pt")
    assert r[name, "stopped", 0]["status"] == "stopped"
    full, resumed = r[name, "fsdp", 0], r[name, "resumed", 0]
    assert resumed["status"] == "finished"
    _close(resumed["weights"], full["weights"], 0)
    assert resumed["history"] == [dict(h, epoch_seconds=resumed["history"][i]["epoch_seconds"],
                                       images_per_s=resumed["history"][i]["images_per_s"])
                                  for i, h in enumerate(full["history"])]
    assert [row["epoch"] for row in read_table(str(root / name / "resumed" / "metrics.csv"))] == [1, 2, 3]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sharded_checkpoint_resumes_on_one_process(runs, name):
    _, r = runs
    single, full = r[name, "single", 0], r[name, "nobn", 0]
    assert single["status"] == "finished"
    _close(single["weights"], full["weights"], 1e-5)


def test_single_process_fsdp_checkpoint_resumes_bitwise(tmp_path):
    a = train(_cfg(str(tmp_path / "a"), "lamb", fsdp=True, epochs=2), log=lambda s: None)
    train(_cfg(str(tmp_path / "b"), "lamb", fsdp=True, epochs=2, stop_after_epochs=1), log=lambda s: None)
    assert os.path.isdir(tmp_path / "b" / "checkpoint")
    b = train(_cfg(str(tmp_path / "b"), "lamb", fsdp=True, epochs=2, resume=True), log=lambda s: None)
    _close(fsdp.full_state_dict(b.model), fsdp.full_state_dict(a.model), 0)


def test_resume_refuses_to_switch_between_ddp_and_fsdp_checkpoints(tmp_path):
    train(_cfg(str(tmp_path / "a"), "lars", epochs=2, stop_after_epochs=1), log=lambda s: None)
    with pytest.raises(ValueError, match="fsdp: differs"):
        train(_cfg(str(tmp_path / "a"), "lars", epochs=2, fsdp=True, resume=True), log=lambda s: None)


def test_fsdp_config_errors():
    with pytest.raises(ValueError, match="fsdp_param_dtype: applies to FSDP2 only"):
        TrainConfig(fsdp_param_dtype="bf16").validate()
    with pytest.raises(ValueError, match="fsdp_param_dtype: 'fp16' is not one of"):
        TrainConfig(fsdp=True, fsdp_param_dtype="fp16").validate()
    with pytest.raises(ValueError, match="precision: fp16 .* not supported with --fsdp"):
        TrainConfig(fsdp=True, precision="fp16", device="cuda").validate()


# ----------------------------------------------------------------------------- Barlow Twins
def _pt_cfg(out, **kw):
    from largebatch.train.pretrain import PretrainConfig

    base = dict(dataset="digits", model="mlp", mlp_depth=1, mlp_width=45, mlp_batchnorm=True, projector="32-32",
                batch_size=512, epochs=2, optimizer="lars", lr=0.2, out_dir=str(out), progress=False,
                stats_every=1, knn_k=20, device="cpu", optimizer_path="foreach")
    base.update(kw)
    return PretrainConfig(**base)


def _pt_worker(rank, world, port, root):
    from largebatch.train.pretrain import pretrain

    torchrun_env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    try:
        for micro in (None, 64):  # micro 64: embedding caching, the model run through embed()
            out["plain", micro] = _result(pretrain(_pt_cfg(f"{root}/plain{micro}", micro_batch_size=micro),
                                                   log=lambda s: None))
            out["fsdp", micro] = _result(pretrain(_pt_cfg(f"{root}/fsdp{micro}", micro_batch_size=micro, fsdp=True),
                                                  log=lambda s: None))
        pretrain(_pt_cfg(f"{root}/resumed", fsdp=True, stop_after_epochs=1), log=lambda s: None)
        out["resumed", None] = _result(pretrain(_pt_cfg(f"{root}/resumed", fsdp=True, resume=True),
                                                log=lambda s: None))
    finally:
        dist.destroy_process_group()
    torch.save(out, os.path.join(root, f"pt-rank{rank}.pt"))


def test_barlow_twins_on_fsdp(tmp_path):
    """FSDP2 pre-training equals the default data parallelism (global-batch BatchNorm, one gradient
    average), with and without embedding caching; its sharded checkpoint resumes bitwise and
    ``linear-eval`` reads it."""
    from largebatch.train.linear_eval import linear_eval

    data.load("digits")
    mp.start_processes(_pt_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r = [torch.load(tmp_path / f"pt-rank{k}.pt", weights_only=False) for k in (0, 1)]
    for micro in (None, 64):
        _close(r[1]["fsdp", micro]["weights"], r[0]["fsdp", micro]["weights"], 0)
        _close(r[0]["fsdp", micro]["weights"], r[0]["plain", micro]["weights"], 1e-5)
        assert [h["knn_acc"] for h in r[0]["fsdp", micro]["history"]] == pytest.approx(
            [h["knn_acc"] for h in r[0]["plain", micro]["history"]], abs=0.01)
    _close(r[0]["resumed", None]["weights"], r[0]["fsdp", None]["weights"], 0)
    res = linear_eval(str(tmp_path / "fsdpNone"), epochs=2, device="cpu", log=lambda s: None)
    ref = linear_eval(str(tmp_path / "plainNone"), epochs=2, device="cpu", log=lambda s: None)
    assert res["epoch"] == ref["epoch"] == 2 and res["top1"] == pytest.approx(ref["top1"], abs=0.01)


# ----------------------------------------------------------------------------- a failed checkpoint write
def _failing_write_worker(rank, world, port, root):
    from largebatch.train.rundir import RunDirError

    torchrun_env(rank, world, port)
    calls = []

    def write_meta(path, meta, _real=fsdp.write_meta):
        calls.append(path)
        if len(calls) == 2:  # the second epoch's checkpoint: disk full on rank 0 only
            raise OSError(28, "No space left on device")
        _real(path, meta)

    fsdp.write_meta = write_meta
    try:
        train(_cfg(f"{root}/run", "lars", fsdp=True), log=lambda s: None)
        outcome = "finished"
    except RunDirError as e:
        outcome = str(e)
    with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


def test_failed_sharded_checkpoint_write_stops_every_rank_and_keeps_the_last(tmp_path):
    import time

    data.load("digits")
    ctx = mp.start_processes(_failing_write_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):  # a rank waiting forever for rank 0 would hang here
        assert time.time() < deadline, "a rank hung after rank 0 failed to write the checkpoint"
    msgs = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert all("could not write the checkpoint of epoch 2" in m and "checkpoint is kept" in m for m in msgs), msgs
    assert "No space left" in msgs[0] and "rank 0 could not" in msgs[1], msgs
    run = tmp_path / "run"
    assert os.path.exists(run / "checkpoint" / ".metadata") and not os.path.exists(run / "checkpoint.tmp")
    assert fsdp.read_meta(str(run / "checkpoint"))["epoch"] == 1
