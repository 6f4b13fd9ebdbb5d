"""Sharded parameters (docs/algorithms.md section 1: the norms are those of the *full* tensors),
2 processes on CPU (Gloo), forked once for the whole module:

* ``fsdp``: FSDP2 ``fully_shard`` (``Shard(0)``) on conv + BatchNorm + two linears, every
  layer's first dimension uneven on 2 ranks (5, 7 rows) or smaller than the world (a 1-output
  head: rank 1's shards of its weight and bias are empty), biases and BatchNorm excluded
  (``adapt=False``); each rank trains on its half of the global batch (logistic loss);
* ``tp``: tensor parallelism (``ColwiseParallel``: ``Shard(0)`` weight and bias;
  ``RowwiseParallel``: ``Shard(1)`` weight, ``Replicate()`` bias), hidden width 9 (uneven);
* ``replicate``: every parameter ``Replicate()`` (``distribute_module``);
* ``hsdp-2x1``, ``hsdp-1x2``: FSDP2 on a 2-D mesh (replicate x shard; placements
  ``(Replicate(), Shard(0))``), with the fsdp model and data: replicas, then shards.

Each optimizer x each path, 5 steps, with a NaN in one rank's shard of one gradient at step 2,
must equal one process (the per-tensor path, float64; with FSDP the single process runs the two
halves as two forwards, so BatchNorm uses per-rank statistics as under data parallelism) on
both ranks, skip that tensor on both ranks, and issue exactly one collective per step for all
norms (CLARS: one more for its per-sample statistics; ``Replicate()`` only: none). Collectives
are counted twice: every ``torch.distributed.all_reduce`` call on every step, and everything
``CommDebugMode`` sees (c10d and functional collectives, i.e. also DTensor dispatch) on one step.
The compiled path runs its kernels eagerly under ``CommDebugMode`` (a dispatch mode disables
dynamo), so for it the first count is the one that covers the compiled code.
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard

from forked import count_all_reduce, free_port, init_gloo
from cases import TABLE, make, names, with_paths
from largebatch.optim import param_groups
from largebatch.optim.lars import _TrustMomentum

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = list(TABLE)
SETTINGS = ["fsdp", "tp", "replicate", "hsdp-2x1", "hsdp-1x2"]
MESH = {"hsdp-2x1": (2, 1), "hsdp-1x2": (1, 2)}   # others: (2,)
STEPS, NAN_STEP, COUNT_STEP, B = 5, 2, 3, 8
#: (tensor, index in the full tensor) of the NaN gradient at NAN_STEP: on rank 1's shard only
#: (fsdp: rows 4-6 of 7 are rank 1's; tp: columns 5-8 of 9), in both replicas for replicate
NAN_AT = {"fsdp": ("4.weight", (5, 3)), "tp": ("2.weight", (1, 7)), "replicate": ("0.weight", (2, 3)),
          "hsdp-2x1": ("4.weight", (5, 3)), "hsdp-1x2": ("4.weight", (5, 3))}


def _data_parallel(setting):
    return setting == "fsdp" or setting.startswith("hsdp")


def _model(setting):
    torch.manual_seed(0)
    if _data_parallel(setting):
        return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(),
                             nn.Linear(5 * 4 * 4, 7), nn.ReLU(), nn.Linear(7, 1)).double()
    return nn.Sequential(nn.Linear(20, 9), nn.ReLU(), nn.Linear(9, 16)).double()


def _batch(setting, t):
    g = torch.Generator().manual_seed(100 + t)
    if _data_parallel(setting):
        return (torch.randn(B, 3, 6, 6, generator=g, dtype=torch.float64),
                torch.randint(0, 2, (B, 1), generator=g).double())
    return torch.randn(B, 20, generator=g, dtype=torch.float64), torch.randint(0, 16, (B,), generator=g)


def _loss(setting, out, y):
    return F.binary_cross_entropy_with_logits(out, y) if _data_parallel(setting) else F.cross_entropy(out, y)


def _optimizer(name, model, path, **clars_kw):
    groups = param_groups(model, weight_decay=1e-3)   # ndim <= 1 excluded (adapt=False)
    return make(name, groups, model, path=path, **clars_kw)


@functools.lru_cache(maxsize=None)
def _reference(setting, name):
    """One process, per-tensor path: final weights and the last step's CLARS n_k."""
    model = _model(setting)
    fsdp = _data_parallel(setting)
    opt = _optimizer(name, model, "per_tensor", **({"loss_scale": 0.5} if fsdp and TABLE[name].persample else {}))
    opt.track_stats = True
    params = dict(model.named_parameters())
    for t in range(STEPS):
        x, y = _batch(setting, t)
        opt.zero_grad()
        if fsdp:  # the ranks' halves as two forwards: BatchNorm statistics per half, as on the ranks
            h = B // 2
            ((_loss(setting, model(x[:h]), y[:h]) + _loss(setting, model(x[h:]), y[h:])) / 2).backward()
        else:
            _loss(setting, model(x), y).backward()
        if t == NAN_STEP:
            k, idx = NAN_AT[setting]
            params[k].grad[idx] = float("nan")
        opt.step()
    stats = opt.last_persample if TABLE[name].persample else None
    return ({k: p.detach().clone() for k, p in params.items()}, _layer_stats(opt),
            stats and (stats.mean_norm(), stats.variance_factor()))


def _layer_stats(opt):
    st = opt.layer_stats()
    return {k: st[k] for k in ("w_norm", "g_norm", "trust", "lr")}


# ---------------------------------------------------------------------------- the 2 ranks
def _distribute(setting, model, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if _data_parallel(setting):
        for layer in (model[0], model[4], model[6]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif setting == "tp":
        parallelize_module(model, mesh, {"0": ColwiseParallel(use_local_output=False), "2": RowwiseParallel()})
    else:
        distribute_module(model, mesh,
                          input_fn=lambda m, xs, mesh: tuple(DTensor.from_local(x, mesh, [Replicate()]) for x in xs),
                          output_fn=lambda m, out, mesh: out.to_local())
    return model


def _set_nan(p, idx):
    """NaN at ``idx`` of the full gradient, written into the shard that holds it (into every
    replica of it: after their all-reduce, replicated gradients agree)."""
    local, idx, coord = p.grad.to_local(), list(idx), p.device_mesh.get_coordinate()
    for dim, pl in enumerate(p.placements):
        if pl.is_shard():
            size = -(-p.shape[pl.dim] // p.device_mesh.size(dim))  # torch.chunk: the first get ceil(n / k)
            if idx[pl.dim] // size != coord[dim]:
                return
            idx[pl.dim] -= coord[dim] * size
    local[tuple(idx)] = float("nan")


def _run(setting, name, path, rank, world, mesh, calls):
    from torch.distributed.tensor.debug import CommDebugMode

    model = _distribute(setting, _model(setting), mesh)
    opt = _optimizer(name, model, path)
    opt.track_stats = True
    params = dict(model.named_parameters())
    found, n_calls, comm = [], [], None
    for t in range(STEPS):
        x, y = _batch(setting, t)
        if _data_parallel(setting):
            x, y = x[rank * B // world:(rank + 1) * B // world], y[rank * B // world:(rank + 1) * B // world]
        opt.zero_grad()
        _loss(setting, model(x), y).backward()
        if t == NAN_STEP:
            _set_nan(params[NAN_AT[setting][0]], NAN_AT[setting][1])
        calls.clear()
        with CommDebugMode() if t == COUNT_STEP else nullcontext() as mode:
            opt.step()
        n_calls.append(len(calls))
        if mode is not None:
            comm = mode.get_total_counts()
        found.append(bool(opt.found_inf))
    return {"params": {k: p.full_tensor() for k, p in params.items()}, "found_inf": found,
            "all_reduce_calls": n_calls, "comm_debug_count": comm, "layer_stats": _layer_stats(opt),
            "clars": ((opt.last_persample.mean_norm(), opt.last_persample.variance_factor())
                      if TABLE[name].persample else None),
            "placements": {k: tuple(p.placements) for k, p in params.items()},
            "local_shapes": {k: tuple(p.to_local().shape) for k, p in params.items()}}


class _UndeclaredNorm(_TrustMomentum):  # the LARS family, with a norm in _update it does not declare
    compilable = False

    def __init__(self, params):
        super().__init__(params, dict(lr=0.1, momentum=0.9, eta=0.02, weight_decay=0.0, eps=0.0, nesterov=False))

    @classmethod
    def _check_hparams(cls, g):
        pass

    def _trust_norm(self, group, w, g_norm, st, P):
        return P.norm(w)   # a norm the sharded flow was not told about (_n_norm_operands)


def _undeclared_norm_error(mesh, rank, world):
    model = _distribute("fsdp", _model("fsdp"), mesh)
    opt = _UndeclaredNorm(param_groups(model))
    x, y = _batch("fsdp", 0)
    _loss("fsdp", model(x[rank::world]), y[rank::world]).backward()
    try:
        opt.step()
    except RuntimeError as e:   # raised on both ranks, after the collective
        return str(e)
    return None


def _worker(rank, world, port, out):
    init_gloo(rank, world, port, compiles=True)
    from torch.distributed.tensor import init_device_mesh

    from largebatch.optim import _compiled, _native

    _compiled.MIN_NUMEL = _compiled.MIN_TOTAL = 64   # the kernel_sized fixture, in this process
    native_modes, native_call = set(), _native._call

    def spying_call(*args, mode=_native.MODE_FULL, **kwargs):
        native_modes.add(mode)
        return native_call(*args, mode=mode, **kwargs)

    _native._call = spying_call
    calls = count_all_reduce()
    meshes = {s: init_device_mesh("cpu", MESH[s], mesh_dim_names=("replicate", "shard")) if s in MESH
              else init_device_mesh("cpu", (world,)) for s in SETTINGS}
    res = {(s, n, p): _run(s, n, p, rank, world, meshes[s], calls) for s in SETTINGS for n, p in with_paths(NAMES)}
    res["undeclared_norm_error"] = _undeclared_norm_error(meshes["fsdp"], rank, world)
    res["kernels"] = sorted((cls.__name__, kind) for cls, kind in _compiled._SHARDED_KERNELS)
    res["compile_ok"] = _compiled.available()
    res["native_modes"] = sorted(native_modes)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


# ---------------------------------------------------------------------------- tests
def test_placements_are_the_ones_under_test(ranks):
    pl = ranks[0][("fsdp", "LARS", "foreach")]["placements"]
    assert {repr(p) for v in pl.values() for p in v} == {"Shard(dim=0)"}
    shapes = [r[("fsdp", "LARS", "foreach")]["local_shapes"] for r in ranks]
    assert [s["4.weight"] for s in shapes] == [(4, 80), (3, 80)]            # uneven
    assert [s["6.weight"] for s in shapes] == [(1, 7), (0, 7)]              # empty on rank 1
    pl = ranks[0][("tp", "LARS", "foreach")]["placements"]
    assert [repr(v[0]) for v in pl.values()] == ["Shard(dim=0)", "Shard(dim=0)", "Shard(dim=1)", "Replicate()"]
    pl = ranks[0][("replicate", "LARS", "foreach")]["placements"]
    assert {repr(p) for v in pl.values() for p in v} == {"Replicate()"}
    for s in MESH:
        assert set(ranks[0][(s, "LARS", "foreach")]["placements"].values()) == {(Replicate(), Shard(0))}


@pytest.mark.parametrize("name,path", with_paths(NAMES))
@pytest.mark.parametrize("setting", SETTINGS)
def test_sharded_equals_one_process(ranks, setting, name, path):
    ref, stats, clars = _reference(setting, name)
    for r, res in enumerate(ranks):
        got = res[(setting, name, path)]
        for k, w in ref.items():
            torch.testing.assert_close(got["params"][k], w, rtol=1e-9, atol=1e-12, msg=f"rank {r}: {k}")
        # diagnostics (track_stats) of the last step: the norms of the full tensors
        torch.testing.assert_close(got["layer_stats"], stats, rtol=1e-9, atol=1e-12, equal_nan=True)
        # the NaN in one rank's shard skipped the tensor on both ranks (in the weights above too)
        assert got["found_inf"] == [t == NAN_STEP for t in range(STEPS)], f"rank {r}"
        if TABLE[name].persample:  # CLARS's n_k: per-sample norms of the full per-sample gradients, over all
            # samples; M_k (CLARS paper Fig. 2) from the sharded .grad (the last step's, no NaN)
            torch.testing.assert_close(got["clars"], clars, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name,path", with_paths(NAMES))
@pytest.mark.parametrize("setting", SETTINGS)
def test_one_collective_per_step_for_all_norms(ranks, setting, name, path):
    want = (0 if setting == "replicate" else 1) + TABLE[name].persample  # CLARS: + its statistics
    for r, res in enumerate(ranks):
        got = res[(setting, name, path)]
        assert got["all_reduce_calls"] == [want] * STEPS, f"rank {r}"
        assert got["comm_debug_count"] == want, f"rank {r}: collectives outside all_reduce (DTensor dispatch?)"


def test_compiled_path_ran_its_kernels(ranks):
    for res in ranks:
        assert res["compile_ok"]
        # "probe": the local norms of the rows whose _update takes a derived tensor's norm (LAMB, LALC)
        want = ({(TABLE[n].cls.__name__, "given") for n in names(path="compiled")}
                | {(TABLE[n].cls.__name__, "probe") for n in names(path="compiled", where=lambda r: r.derived_norms)})
        assert want <= set(res["kernels"])


def test_native_path_ran_its_two_phases(ranks):
    """On the native path the local sums of squares and the update with the reduced norms are
    the C++ kernel's two modes (the full step never runs on sharded parameters)."""
    from largebatch.optim import _native
    for res in ranks:
        assert res["native_modes"] == [_native.MODE_SUMS, _native.MODE_GIVEN]


def test_an_undeclared_norm_in_update_is_refused(ranks):
    """An ``_update`` taking a norm through ``P.norm`` must declare it for sharded parameters
    (``_n_norm_operands`` / ``_norm_operands``): the step says so instead of guessing."""
    for res in ranks:
        assert "define _n_norm_operands and _norm_operands" in res["undeclared_norm_error"]


# ---------------------------------------------------------------------------- float32, extreme magnitudes
#: (dtype, gradient factor): float32 at 1 (conv + BatchNorm + three Linears, uneven shards: LALC
#: on the eager paths was reported 4e-3 off one process there) and the magnitudes whose squares
#: leave the dtype's range (the sums over the ranks are taken in bands for float64)
EXTREME = [(torch.float32, 1.0), (torch.float32, 1e20), (torch.float32, 1e-30), (torch.float64, 1e200),
           (torch.float64, 1e-200)]


def _model3(dtype):
    """No convolution bias: before a BatchNorm its true gradient is 0 and what backward gives is
    rounding noise, which depends on the order of the sums (one process vs. the ranks' halves);
    LAMB's Adam direction and LARS's trust ratio normalize that noise into steps of normal
    size, so in float32 those steps differ from one process by 1e-3 relative on every path
    (measured: 4e-3 to 1e-2 on the bias alone), whatever the optimizer does with the norms."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 7),
                         nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 1)).to(dtype)


def _run3(name, path, dtype, factor, rank=0, world=1, mesh=None):
    """3 steps on the batch halves (one process: both halves as two forwards), gradients
    multiplied by ``factor`` (then 1 step: the excluded tensors take plain steps of that size,
    after which the model itself overflows); returns the full weights and found_inf per step."""
    model = _model3(dtype)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard
        for layer in (model[0], model[4], model[6], model[8]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = _optimizer(name, model, path)
    found = []
    for t in range(3 if factor == 1 else 1):
        x, y = (v.to(dtype) for v in _batch("fsdp", t))
        opt.zero_grad()
        h = B // 2
        if mesh is None:
            ((_loss("fsdp", model(x[:h]), y[:h]) + _loss("fsdp", model(x[h:]), y[h:])) / 2).backward()
        else:
            _loss("fsdp", model(x[rank * h:(rank + 1) * h]), y[rank * h:(rank + 1) * h]).backward()
        with torch.no_grad():
            for p in model.parameters():
                (p.grad.to_local() if mesh is not None else p.grad).mul_(factor)
        opt.step()
        found.append(bool(opt.found_inf))
    return {k: (p.full_tensor() if mesh is not None else p).detach() for k, p in model.named_parameters()}, found


def _extreme_worker(rank, world, port, out):
    init_gloo(rank, world, port, compiles=True)
    from torch.distributed.tensor import init_device_mesh

    from largebatch.optim import _compiled
    _compiled.MIN_NUMEL = _compiled.MIN_TOTAL = 64
    mesh = init_device_mesh("cpu", (world,))
    res = {(n, p, str(d), f): _run3(n, p, d, f, rank, world, mesh)
           for n, p in with_paths(names(model_free=True)) for d, f in EXTREME
           if f == 1.0 or p != "compiled" or TABLE[n].spot_check}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def extreme_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("extreme")
    mp.start_processes(_extreme_worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("dtype,factor", EXTREME, ids=[f"{d}-{f:g}".replace("torch.", "") for d, f in EXTREME])
@pytest.mark.parametrize("name,path", with_paths(names(model_free=True)))
def test_float32_and_extreme_magnitudes_equal_one_process(extreme_ranks, name, path, dtype, factor):
    """FSDP2 with uneven shards in float32, and gradients whose squares leave the dtype's
    range: the step equals one process's (per-tensor path), no tensor is skipped."""
    key = (name, path, str(dtype), factor)
    if key not in extreme_ranks[0]:
        pytest.skip("compiled: the spot-check rows (LARS, LAMB) cover the kernels at extreme magnitudes "
                    "(compiles cost seconds)")
    ref, found = _run3(name, "per_tensor", dtype, factor)
    assert not any(found)
    tol = dict(rtol=1e-10, atol=0) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for r, res in enumerate(extreme_ranks):
        got, found = res[key]
        assert not any(found), f"rank {r}"
        for k, w in ref.items():
            torch.testing.assert_close(got[k], w, **tol, msg=lambda m: f"rank {r} {k}: {m}")
