"""Time of one ``optimizer.step()`` under FSDP2: one reduction for all norms vs one collective per tensor.

Parameter set: the CIFAR ResNet-18 of ``benchmarks/optimizer_step.py`` (11.2M parameters in
62 tensors), ``fully_shard`` on every residual block, the stem and the root (every parameter a
``Shard(0)`` DTensor), float32, ``--world`` processes (default 2) on CPU with Gloo, one thread
each. Gradients come from one real forward/backward (batch of 4 per rank) and stay set.

Compared, in one run and on the same sharded parameters:

* ``one reduction``: largebatch as shipped: the local sums of squares of all tensors in one
  flat vector, one ``all_reduce``, then the update on the local shards
  (``largebatch/optim/_sharded.py``), on each path;
* ``per-tensor collectives``: the behaviour before (``_shard_aware = False``: the DTensors go
  to the paths as they are, and DTensor dispatch reduces every norm of every tensor on its
  own). Only the paths on which that ran (LARS: ``per_tensor``, ``foreach``; LAMB:
  ``foreach``; ``compiled`` failed for both).

Each implementation is warmed up (3 steps; compiling on the first), then timed for
``--rounds`` rounds; each round runs ``--steps`` consecutive steps of every implementation,
in an order rotated by one per round, timed on every rank between two barriers (time per
step; a step's collectives keep the ranks in step); the reported time of a round is the
slowest rank's. Collectives per step are counted with ``CommDebugMode`` on one extra
step (eager). Prints a table with the CPU model.

    python benchmarks/sharded_step.py [--rounds N] [--steps K] [--world N] [--optimizers LARS,LAMB]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn

from largebatch.optim import LAMB, LARS, param_groups

OPTIMIZERS = {"LARS": (LARS, dict(lr=0.1, momentum=0.9)), "LAMB": (LAMB, dict(lr=1e-3))}
#: the paths on which the DTensors ran as they are (before sharded norms were summed across ranks): LAMB's per_tensor failed at its step counter
OLD_PATHS = {"LARS": ("per_tensor", "foreach"), "LAMB": ("foreach",)}


def cifar_resnet18() -> nn.Module:
    m = torchvision.models.resnet18(weights=None, num_classes=10)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def cpu_model() -> str:
    from largebatch.optim._compiled import cpu_model as model  # one reader of /proc/cpuinfo

    return model()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _implementations(model, names):
    out = []
    for name in names:
        cls, kw = OPTIMIZERS[name]
        old = type(f"{name}PerTensorCollectives", (cls,), {"_shard_aware": False, "compilable": True})
        for path in ("per_tensor", "foreach", "compiled", "native"):
            out.append((f"{name} {path}", "one reduction",
                        cls(param_groups(model, weight_decay=5e-5), path=path, **kw)))
        for path in OLD_PATHS[name]:
            out.append((f"{name} {path}", "per-tensor collectives",
                        old(param_groups(model, weight_decay=5e-5), path=path, **kw)))
    return out


def _timed_step(opt, k: int = 1) -> float:
    """Seconds per step over ``k`` consecutive steps (each step synchronizes the ranks in its
    collectives), between two barriers (whose cost is spread over the ``k`` steps)."""
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(k):
        opt.step()
    dist.barrier()  # every rank has finished
    return (time.perf_counter() - t0) / k


def _worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = cifar_resnet18()
    for m in [model.conv1, *model.layer1, *model.layer2, *model.layer3, *model.layer4, model.fc]:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(rank)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=g)), torch.randint(0, 10, (4,), generator=g)).backward()
    n_tensors = sum(1 for _ in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())

    impls = _implementations(model, args.optimizers.split(","))
    first, collectives = {}, {}
    for name, kind, opt in impls:
        t = _timed_step(opt)
        first[(name, kind)] = t
        for _ in range(2):
            _timed_step(opt)
        with CommDebugMode() as cm:
            opt.step()
        collectives[(name, kind)] = cm.get_total_counts()
    times = {(name, kind): [] for name, kind, _ in impls}
    for r in range(args.rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for name, kind, opt in order:
            times[(name, kind)].append(_timed_step(opt, args.steps))
    gathered = [None] * world
    dist.all_gather_object(gathered, times)
    if rank == 0:
        slowest = {k: [max(g[k][i] for g in gathered) for i in range(args.rounds)] for k in times}
        torch.save({"times": slowest, "first": first, "collectives": collectives, "n_tensors": n_tensors,
                    "n_params": n_params}, out)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5, help="consecutive steps per timing (default 5)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--optimizers", default="LARS")
    args = ap.parse_args()
    out = f"/tmp/largebatch-sharded-step-{os.getpid()}.pt"
    t0, load0 = time.time(), os.getloadavg()[0]
    mp.start_processes(_worker, args=(args.world, _free_port(), args, out), nprocs=args.world, join=True,
                       start_method="fork")
    res = torch.load(out)
    os.remove(out)
    print(f"# optimizer.step() under FSDP2: {args.world} processes x 1 thread, CPU Gloo, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, load average before "
          f"{load0:.2f}, after {os.getloadavg()[0]:.2f}; CIFAR ResNet-18: {res['n_params'] / 1e6:.1f}M parameters in "
          f"{res['n_tensors']} tensors, Shard(0) on {args.world} ranks; {args.rounds} rounds of {args.steps} steps\n")
    print("| step of | norms reduced by | collectives per step | median ms | min-max ms | first step ms |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, kind), ts in res["times"].items():
        ms = [1e3 * t for t in ts]
        print(f"| {name} | {kind} | {res['collectives'][(name, kind)]} | {statistics.median(ms):.2f} | "
              f"{min(ms):.2f}-{max(ms):.2f} | {1e3 * res['first'][(name, kind)]:.0f} |")
    print(f"\n({time.time() - t0:.0f} s; ms per step: the slowest rank of each round of {args.steps} steps)")


if __name__ == "__main__":
    main()
