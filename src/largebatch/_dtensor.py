"""DTensor plumbing shared by the optimizers' sharded flow (``optim/_sharded.py``), the
per-sample statistics (``persample``) and the harness (``train``): which tensors are DTensors,
which ranks' local sums enter a sum over a mesh, and one ``all_reduce`` per mesh. Imports no
other part of the package but ``_norms``, so that each of them can use it."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from ._norms import norms

__all__ = ["dtensor_type", "global_sq_norms"]


def dtensor_type():
    """The ``DTensor`` class if ``torch.distributed.tensor`` is loaded, else ``None`` (no DTensor
    can exist then; ``import largebatch`` does not import it)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _process_group(mesh):
    """A process group spanning ``mesh``'s ranks (``None``: the default group)."""
    import torch.distributed as dist

    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return None
    return mesh._flatten().get_group()


def _contributes(mesh, placements) -> bool:
    """Whether this rank's local sum of squares enters the sum over the mesh: not where it
    holds a copy (coordinate != 0 along a ``Replicate`` dimension)."""
    coord = mesh.get_coordinate()
    for dim, pl in enumerate(placements):
        if pl.is_replicate() and coord[dim] != 0:
            return False
    return True


def _sharded(p) -> bool:
    return any(pl.is_shard() for pl in p.placements)


def _zero_copies(sq: Tensor, params, cache: dict) -> Tensor:
    """Rows of tensors this rank holds only a copy of set to exact zeros (device ops only)."""
    keep = []
    for p in params:
        key = (p.device_mesh, tuple(p.placements))
        if key not in cache:
            cache[key] = _contributes(*key)
        keep.append(cache[key])
    if all(keep):
        return sq
    return torch.stack([row if k else torch.zeros_like(row) for row, k in zip(sq.unbind(0), keep)])


def _all_reduce(flat: Tensor, mesh) -> None:
    import torch.distributed as dist

    dist.all_reduce(flat, group=_process_group(mesh))


def _sq(t: Tensor) -> Tensor:
    return norms([t])[0].double().square()


def global_sq_norms(tensors: list[Tensor]) -> list[Tensor]:
    """Squared L2 norms (float64, 0-d) of whole tensors: plain tensors locally, DTensors
    (any placements) from their local shards with one ``all_reduce`` per mesh for all of
    them (the same scheme as :func:`run`). For diagnostics (``PerSampleStats.variance_factor``)."""
    DT = dtensor_type()
    out: list[Tensor | None] = [None] * len(tensors)
    by_mesh: dict[Any, list[int]] = {}
    cache: dict = {}
    for i, t in enumerate(tensors):
        if DT is not None and isinstance(t, DT):
            by_mesh.setdefault(t.device_mesh, []).append(i)
        else:
            out[i] = _sq(t)
    for mesh, idx in by_mesh.items():
        parts = [tensors[i] for i in idx]
        flat = torch.stack([_sq(t.to_local()) for t in parts])
        if any(_sharded(t) for t in parts):
            flat = _zero_copies(flat.unsqueeze(1), parts, cache).reshape(-1)
            _all_reduce(flat, mesh)
        for i, v in zip(idx, flat.unbind()):
            out[i] = v
    return out
