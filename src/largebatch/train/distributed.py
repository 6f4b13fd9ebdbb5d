"""Data parallelism with PyTorch's own engine: torchrun sets the environment, DDP averages gradients.

``setup()`` reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and initialises the process
group (NCCL on GPUs, Gloo on CPU); without them the run is a single process. The data lives
whole on every process's device; ``shard`` gives each rank its part of an epoch's permutation
exactly like ``torch.utils.data.DistributedSampler`` (pad by wrapping, then ``perm[rank::world]``),
so the union of the ranks' ``s``-th local batches is the ``s``-th global batch of the permutation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False  # True when setup() created the process group (cleanup destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: cuda requested but no CUDA device is available")
        return torch.device(f"cuda:{local_rank}")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {pref} requested but no CUDA device is available")
    return torch.device(pref)


def setup(device_pref: str = "auto") -> DistInfo:
    """Initialise the process group if launched by torchrun (or with RANK/WORLD_SIZE set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=pick_device(device_pref))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(device_pref, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, device, backend, owns)


def cleanup(info: DistInfo) -> None:
    if info.enabled and info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(perm: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's indices of an epoch permutation (DistributedSampler semantics, drop_last=False)."""
    if world_size == 1:
        return perm
    n = perm.numel()
    total = -(-n // world_size) * world_size
    if total > n:
        perm = torch.cat([perm, perm[: total - n]])
    return perm[rank::world_size]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op for one process). Gloo needs CPU tensors for some ops;
    all_reduce on the device tensor is supported by both NCCL (GPU) and Gloo (CPU)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_flag(flag: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Logical OR of a 0-d flag over ranks (as a float sum > 0)."""
    f = flag.float().reshape(1)
    all_reduce_sum(f, info)
    return f[0] > 0
