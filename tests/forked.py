"""What every multi-process test shares: two (or more) forked children on one machine, talking
over Gloo on the CPU (``torch.multiprocessing.start_processes(..., start_method="fork")``)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on localhost for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> None:
    """In a child: the variables ``torchrun`` sets (the harness then initializes the group
    itself), and one intra-op thread per process (2 cores)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def init_gloo(rank: int, world: int, port: int, compiles: bool = False) -> None:
    """In a child: one intra-op thread and the Gloo process group. ``compiles``: the child runs
    ``torch.compile``. A forked child inherits inductor's compile thread pool object but not
    its threads (torch resets only the process pool after a fork): waiting on it would hang
    forever once earlier tests in the pytest process compiled something, so the child compiles
    synchronously."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if compiles:
        import torch._inductor.async_compile as async_compile
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        async_compile.AsyncCompile.pool.cache_clear()
    dist.init_process_group("gloo", rank=rank, world_size=world)


def count_all_reduce() -> list:
    """Patch ``dist.all_reduce`` in this child to append to the returned list at each call."""
    calls: list = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(1)
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    return calls
