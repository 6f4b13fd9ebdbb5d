"""Sharded parameters (FSDP2 ``fully_shard``, tensor parallelism): one collective per step.

Every rule reads norms of whole tensors (docs/algorithms.md section 1: ``||w||``, ``||g||`` of the full
tensor). For DTensor parameters (``Shard(d)``, ``Replicate()`` on any mesh) the engine
never materializes a full tensor, and never lets DTensor dispatch reduce each norm on its
own (one collective per tensor and norm). ``LayerwiseOptimizer.step`` hands every DTensor
bucket of the step (all groups) to :func:`run`, which works on the local shards
(``to_local()``: the parameter, its gradient and its state; state stays a DTensor, as in
``torch.optim``) in three phases:

1. each rank computes, per tensor, the *local* norms of ``w`` (adapted groups), ``g`` and
   of the tensors ``_update`` takes further norms of (LAMB's ``r``, LALC's ``h``, computed
   out of place as ``_update`` computes them from a finite gradient:
   ``LayerwiseOptimizer._norm_operands``), free of overflow and underflow (``_paths.norms``),
   and their squares in float64 into one flat vector (for float64 data, three squares per
   norm, scaled by ``2^-600``, 1 and ``2^600``: one of them is a normal number for any
   finite norm, :func:`_bands`);
2. **one** ``all_reduce`` (sum) of that vector over the mesh's ranks, then the square root
   (of the band that holds the sum): the norms of the full tensors. A ``Shard`` mesh dimension adds the shards' sums; along a
   ``Replicate`` mesh dimension only coordinate 0 contributes (the copies add exact zeros).
   When no tensor of the mesh is sharded (all ``Replicate()``) the local sums are the full
   ones and there is no collective at all;
3. the path's update (``per_tensor``, ``foreach``, ``compiled`` or ``native``) on the local
   shards with those norms (``LayerwiseOptimizer._given_update``; ``P.norm`` replays the reduced ones).

Non-finite gradients (docs/algorithms.md section 1): a NaN or inf in any rank's shard makes that tensor's sum of
squares NaN or inf on every rank after the reduction (squares are non-negative, so an inf
cannot cancel), and every rank receives the same reduced vector: a tensor is skipped on
every rank or on none, ``found_inf`` agrees, and the zero-norm rule reads the same norms.
Nothing is read on the host (no ``.item()``, no branch on a value).

Under a ``torch.amp.GradScaler`` (``_engine.py``, "Mixed precision") the gradients are divided
by ``grad_scale`` before the sums of squares (eager paths: once, out of place; compiled and
native: inside both kernels) and a nonzero ``found_inf`` skips the step. The ranks agree on it: the scaler's inf
check on DTensor gradients is reduced over the mesh by DTensor itself (``found_inf_reduce_handler``
in ``torch/distributed/tensor/_dispatch.py``), so no rank skips alone and the scales stay equal.

A gradient whose placements differ from its parameter's (e.g. ``Partial``) is first
redistributed to them, a collective of its own; FSDP2's and tensor-parallel gradients
already match. Parameters on several meshes get one collective per mesh.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._dtensor import _sharded, _zero_copies, _all_reduce, dtensor_type

__all__ = ["run"]


def _local_grad(p, DT) -> Tensor:
    """``p.grad``'s local shard, laid out as ``p``'s."""
    if not all(pl.is_shard() or pl.is_replicate() for pl in p.placements):
        raise ValueError(f"a DTensor parameter with placements {tuple(p.placements)}: only Shard and Replicate "
                         "parameters are supported (not Partial)")
    g = p.grad
    if not isinstance(g, DT):
        raise TypeError(f"a DTensor parameter (placements {tuple(p.placements)}) has a gradient of type "
                        f"{type(g).__name__}; expected a DTensor")
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        g = g.redistribute(p.device_mesh, p.placements)  # a collective of its own (not FSDP2 / TP)
    return g.to_local()


def run(opt, jobs: list[tuple[dict[str, Any], list[Tensor], Any]], amp=None) -> list[Tensor]:
    """One step for the DTensor buckets ``jobs`` (``(group, params, P)``, ``P`` the path
    object); returns each bucket's ``fin`` (gradient finite, per tensor). ``amp``: the
    GradScaler's inputs (``_engine._AmpInputs``) or ``None``."""
    from ._engine import _Counters, _working_tensors, maximized

    DT = dtensor_type()
    cache: dict = {}
    prepared, sqs = [], []
    for group, params, P in jobs:  # 1. local norms, squared
        states = [{k: v.to_local() if isinstance(v, DT) else v for k, v in st.items()}
                  for st in opt._states(group, params)]
        work, grads, states, targets = _working_tensors(
            [p.to_local() for p in params], [_local_grad(p, DT) for p in params], states)
        scale = maximized(group, amp.scale(work[0]) if amp is not None else None, work[0])
        if scale is not None and not P.fuses_scale:  # eager: unscale once for both phases
            grads, scale = list(torch._foreach_div(grads, scale)), None
        local = P.local_norms(opt, group, work, grads, states, scale)
        prepared.append((group, params, P, work, grads, states, targets, local.shape, scale))
        sqs.append(_bands(local, work[0].dtype))

    norms: list[Tensor | None] = [None] * len(jobs)  # 2. one all_reduce per mesh (usually one)
    by_mesh: dict[Any, list[int]] = {}
    for j, (_, params, *_rest) in enumerate(prepared):
        by_mesh.setdefault(params[0].device_mesh, []).append(j)
    for mesh, idx in by_mesh.items():
        if any(_sharded(p) for j in idx for p in prepared[j][1]):
            flat = torch.cat([_zero_copies(sqs[j], prepared[j][1], cache).reshape(-1) for j in idx])
            _all_reduce(flat, mesh)
        else:  # every tensor is replicated: the local sums are the full ones, no collective
            flat = torch.cat([sqs[j].reshape(-1) for j in idx])
        for j, part in zip(idx, flat.split([sqs[j].numel() for j in idx])):
            norms[j] = _norms_of_bands(part.view(sqs[j].shape), prepared[j][3][0].dtype)

    fins = []
    for (group, params, P, work, grads, states, targets, shape, scale), nrm in zip(prepared, norms):  # 3. update
        nrm = nrm.reshape(shape).to(work[0].dtype)  # the compute dtype
        ok = amp.ok(nrm.device) if amp is not None else None
        counters = _Counters(states) if ok is not None else None
        cols = P.run_given(opt, group, work, grads, states, nrm, scale, ok)
        if counters is not None:
            counters.restore_unless(ok)
        fin, trust, lr, wn, gn = cols
        if targets is not None:  # float16 / bfloat16: the float32 result, rounded
            torch._foreach_copy_(targets, work)
        opt._record_stats(group, params, fin, trust, lr, wn, gn)
        fins.append(fin)
    return fins


#: float64 sums of squares of norms of float64 data are taken in three bands, the norms scaled by
#: 2^-600, 1 and 2^600: one of them holds every norm from 2^-1074 to 2^1024 as a normal number
_BAND = 600.0


def _bands(local: Tensor, dtype: torch.dtype) -> Tensor:
    """What is summed over the ranks for local norms ``[n, k]``: their squares in float64 (data
    of float32 or narrower: no overflow, no underflow), for float64 data in the three bands of
    :data:`_BAND` (``[n, 3k]``). A non-finite norm stays non-finite in every band."""
    x = local.double()
    if dtype != torch.float64:
        return x.square()
    return torch.cat([torch.ldexp(x, torch.tensor(-_BAND, dtype=torch.float64)).square(), x.square(),
                      torch.ldexp(x, torch.tensor(_BAND, dtype=torch.float64)).square()], dim=-1)


def _norms_of_bands(sq: Tensor, dtype: torch.dtype) -> Tensor:
    """The full tensors' norms (float64, ``[n, k]``) from the reduced :func:`_bands`: for float64
    data the high band where the norm is at least 2^120 (squares it lost are below 2^-114 of
    the sum), else the middle one where at least 2^-450, else the low one. NaN and inf stay
    non-finite (a NaN fails both comparisons and reaches the low band, NaN there too)."""
    if dtype != torch.float64:
        return sq.sqrt()
    hi, mid, lo = sq.chunk(3, dim=-1)
    two = lambda e: torch.tensor(e, dtype=torch.float64)  # noqa: E731
    return torch.where(hi >= 2.0 ** (2 * (120 - _BAND)), torch.ldexp(hi.sqrt(), two(_BAND)),
                       torch.where(mid >= 2.0 ** -900, mid.sqrt(), torch.ldexp(lo.sqrt(), two(-_BAND))))
