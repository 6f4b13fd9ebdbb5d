"""Test-set evaluation (the test set split across ranks, reduced) and the mixed-precision context."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import distributed as dist_mod


def autocast_for(precision: str, device: torch.device):
    """The forward pass's context: nothing for fp32, ``torch.autocast`` to bf16 or fp16 otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, ds: data_mod.ArrayDataset, batch: int, info: dist_mod.DistInfo,
             autocast=None) -> tuple[float, float]:
    """Mean test loss and accuracy, the test set split across ranks (each sample once), reduced."""
    core = _unwrap(model)
    was_training = core.training
    core.eval()
    n = ds.test_x.shape[0]
    idx = torch.arange(info.rank, n, info.world_size, device=ds.test_x.device)
    sums = torch.zeros(3, device=ds.test_x.device, dtype=torch.float64)
    chunks = list(idx.split(batch))
    per_rank = -(-n // info.world_size)  # every rank runs as many forwards (under FSDP each is a collective)
    chunks += [idx[:0]] * (-(-per_rank // batch) - len(chunks))
    for ch in chunks:
        x = data_mod.normalize(ds.test_x[ch], ds.mean, ds.std)
        y = ds.test_y[ch]
        with (autocast or contextlib.nullcontext()):
            logits = core(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += ch.numel()
    dist_mod.all_reduce_sum(sums, info)
    core.train(was_training)
    s = sums.cpu().tolist()
    return s[0] / s[2], s[1] / s[2]


def _unwrap(model: nn.Module) -> nn.Module:  # DDP's module; an FSDP2 model is its own
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
