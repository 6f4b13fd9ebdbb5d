"""Two processes on CPU (Gloo, DDP) give the single-process result; sharding matches DistributedSampler."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from forked import free_port, torchrun_env
from largebatch.train import data
from largebatch.train import distributed as dist_mod
from largebatch.train.config import TrainConfig
from largebatch.train.loop import train
from largebatch.train.rundir import read_table


pytestmark = pytest.mark.usefixtures("one_thread")



def _cfg(out, **kw):
    base = dict(dataset="digits", model="mlp", mlp_depth=2, mlp_width=32, mlp_batchnorm=False, batch_size=256,
                epochs=2, optimizer="lars", lr=2.0, schedule="cosine", warmup_epochs=1, out_dir=out,
                progress=False, stats_every=2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _worker(rank, world, port, out, result_dir):
    torchrun_env(rank, world, port)
    res = train(_cfg(out), log=lambda s: None)
    torch.save({"status": res.status, "weights": res.model.state_dict(), "history": res.history},
               os.path.join(result_dir, f"rank{rank}.pt"))


def test_two_process_gloo_equals_single_process_accumulation(tmp_path):
    out = str(tmp_path / "ddp")
    data.load("digits")  # warm the imports: forked workers inherit them (spawn would re-import torch twice)
    mp.start_processes(_worker, args=(2, free_port(), out, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["status"] == r1["status"] == "finished"
    for k in r0["weights"]:  # DDP keeps replicas identical
        assert torch.equal(r0["weights"][k], r1["weights"][k])
    # metrics were reduced over ranks: both ranks report the same numbers for the whole test set
    assert [h["test_acc"] for h in r0["history"]] == [h["test_acc"] for h in r1["history"]]
    rows = read_table(os.path.join(out, "metrics.csv"))
    assert [r["epoch"] for r in rows] == [1, 2]  # written once (rank 0)
    assert len(read_table(os.path.join(out, "steps.csv"))) == 10

    # one process, same global batch as 2 micro-batches of 128: same samples per step, same gradient
    single = train(_cfg(str(tmp_path / "single"), micro_batch_size=128), log=lambda s: None)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(v, r0["weights"][k], rtol=1e-5, atol=1e-6), k
    assert single.history[-1]["test_acc"] == pytest.approx(r0["history"][-1]["test_acc"], abs=1 / 359 + 1e-9)


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (11, 3), (5, 4)])
def test_shard_matches_distributed_sampler(n, world):
    from torch.utils.data import DistributedSampler

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        assert dist_mod.shard(perm, rank, world).tolist() == [perm[i].item() for i in sampler]
    # the s-th local batches of all ranks together are the s-th global batch of the permutation
    b = 2
    shards = [dist_mod.shard(perm, r, world) for r in range(world)]
    padded = torch.cat([perm, perm])[: len(shards[0]) * world]
    for s in range(len(shards[0]) // b):
        union = sorted(sum((sh[s * b:(s + 1) * b].tolist() for sh in shards), []))
        assert union == sorted(padded[s * b * world:(s + 1) * b * world].tolist())
