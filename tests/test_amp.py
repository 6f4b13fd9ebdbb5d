"""Mixed precision without host syncs: ``torch.amp.GradScaler``'s protocol for
optimizers that unscale inside their step (``_step_supports_amp_scaling``, torch 2.14
``GradScaler.step``; ``optim/_engine.py``, "Mixed precision").

For every optimizer and path: a scaled run (``GradScaler.step``, scale ``2**10``) equals the
unscaled run bit for bit (a power-of-two scale multiplies and divides exactly), in float32 and
float64, without the scaler's unscale pass (float16 parameters, whose gradients that pass
refuses, now step under a scaler too); a step with an inf / NaN gradient leaves weights
and all state (step counters included) untouched while the scale backs off; an explicit
``scaler.unscale_(opt)`` (gradient clipping) gives the unscaled run's result too. The sharded
flow (2 forked Gloo ranks, FSDP2) skips on every rank when one rank's scaler finds an inf.
On CUDA: no host synchronization in ``scale(loss).backward(); step; update``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from forked import count_all_reduce, free_port, init_gloo
from cases import TABLE, make, with_paths
from largebatch.optim import CLARS, param_groups
from largebatch.optim._engine import LayerwiseOptimizer

pytestmark = pytest.mark.usefixtures("one_thread", "kernel_sized")

NAMES = list(TABLE)
SCALE = 2.0 ** 10
STEPS, INF_STEP, MICRO, CLIP = 4, 2, 2, 0.5


@pytest.fixture(scope="module", autouse=True)
def _dynamo_cache():
    """The scaled kernels are further configurations of each class's compiled kernel: start
    and leave this module with empty dynamo caches (recompile limits, other test modules)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Spy:
    """Records the ``inv_scale`` of every ``torch._amp_foreach_non_finite_check_and_unscale_``
    call: GradScaler's unscale pass has ``inv_scale = 1 / scale``, its inf check alone 1."""

    def __init__(self, monkeypatch):
        self.inv_scales: list[float] = []
        real = torch._amp_foreach_non_finite_check_and_unscale_

        def spy(grads, found_inf, inv_scale):
            self.inv_scales.append(float(inv_scale))
            return real(grads, found_inf, inv_scale)

        monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", spy)


@pytest.fixture
def spy(monkeypatch):
    return Spy(monkeypatch)


def make_model(dtype=torch.float32):
    """Weights of >= 64 elements (the compiled kernel under ``kernel_sized``), biases on foreach."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def build(name, model, path, **clars_kw):
    groups = param_groups(model, weight_decay=1e-3)  # ndim <= 1 excluded (adapt=False)
    return make(name, groups, model, path=path, **clars_kw)


def batch(t, dtype):
    g = torch.Generator().manual_seed(10 + t)
    return torch.randn(8, 6, generator=g, dtype=dtype), torch.randint(0, 4, (8,), generator=g)


def run(name, path, *, scaler=None, unscale=False, clip=False, dtype=torch.float32, bad=None, skip=(),
        unscale_persample=None, hook=None):
    """``STEPS`` steps of ``MICRO`` micro-batches each (the training loop's pattern). ``scaler``:
    through ``GradScaler.step`` (``unscale``: ``scaler.unscale_(opt)`` first); ``clip``: clip the
    (unscaled) gradients; ``bad``: a gradient value written at ``INF_STEP``; ``skip``: steps not
    run (the unscaled reference of a skipped step). CLARS: per-sample norms unscaled in the step
    (``unscale_persample``, the loop's way), or via ``loss_scale`` after ``unscale_``."""
    model = make_model(dtype)
    kw = {}
    if TABLE[name].persample:
        if unscale_persample is None:
            unscale_persample = scaler is not None and not unscale
        kw = dict(loss_scale=1.0 / MICRO, unscale_persample=unscale_persample)
    opt = build(name, model, path, **kw)
    opt.track_stats = True
    for t in range(STEPS):
        x, y = batch(t, dtype)
        if t in skip:
            continue
        opt.zero_grad()
        if TABLE[name].persample and scaler is not None and not unscale_persample:
            opt.persample.loss_scale = scaler.get_scale() / MICRO  # the tracker's contract
        for xs, ys in zip(x.chunk(MICRO), y.chunk(MICRO)):
            loss = F.cross_entropy(model(xs), ys) / MICRO
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if t == INF_STEP and bad is not None:
            model[2].weight.grad[1, 3] = bad
        if hook:
            hook(t, "before", model, opt)
        if scaler is None:
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        else:
            if unscale:
                scaler.unscale_(opt)
                if clip:
                    nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            scaler.step(opt)
            scaler.update()
        if hook:
            hook(t, "after", model, opt)
    return model, opt


def snapshot(model, opt):
    return ({k: p.detach().clone() for k, p in model.named_parameters()},
            {k: {s: v.clone() for s, v in opt.state[p].items()} for k, p in model.named_parameters()})


def assert_same(ref, got):
    """Bitwise: weights, every state tensor (step counters included), CLARS's n_k."""
    (w_r, s_r), (w_g, s_g) = snapshot(*ref), snapshot(*got)
    for k in w_r:
        assert torch.equal(w_g[k], w_r[k]), f"weights of {k}"
        assert s_g[k].keys() == s_r[k].keys()
        for key, v in s_r[k].items():
            assert torch.equal(s_g[k][key], v), f"state {key} of {k}"
    if isinstance(ref[1], CLARS):
        assert torch.equal(got[1].last_persample.mean_norm(), ref[1].last_persample.mean_norm())


def scaler_for():
    return torch.amp.GradScaler("cpu", init_scale=SCALE)


# ---------------------------------------------------------------------------- the protocol
def test_protocol_attributes():
    """The scaler sets ``grad_scale`` / ``found_inf`` for ``step()`` and deletes them; the
    engine's own ``found_inf`` (its output) survives the ``del`` as ``last_found_inf``."""
    assert LayerwiseOptimizer._step_supports_amp_scaling is True
    seen = {"inputs": []}

    def hook(t, when, model, opt):
        if when == "after":
            seen[t] = (hasattr(opt, "grad_scale"), opt.found_inf, opt.last_found_inf)
        elif t == 0:  # spy on what step() is given (an instance attribute: torch wraps class steps)
            real_step = opt.step

            def step(*args, **kwargs):
                seen["inputs"].append((opt.grad_scale, opt.found_inf))
                return real_step(*args, **kwargs)

            opt.step = step

    run("LARS", "foreach", scaler=scaler_for(), bad=float("inf"), hook=hook)
    scale, found = seen["inputs"][0]
    assert isinstance(scale, torch.Tensor) and float(scale) == SCALE
    assert isinstance(found, torch.Tensor) and float(found) == 0
    assert float(seen["inputs"][INF_STEP][1]) > 0 and float(seen["inputs"][INF_STEP][0]) == SCALE
    for t in range(STEPS):
        has_scale, found_inf, last = seen[t]
        assert not has_scale
        assert found_inf is last and found_inf.dtype == torch.bool and bool(found_inf) == (t == INF_STEP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name,path", with_paths(NAMES))
def test_scaler_step_equals_unscaled_run(name, path, dtype, spy):
    ref = run(name, path, dtype=dtype)
    scaler = scaler_for()
    grads = {}
    got = run(name, path, scaler=scaler, dtype=dtype,
              hook=lambda t, when, m, o: grads.update({(t, when): [p.grad.clone() for p in m.parameters()]}))
    assert_same(ref, got)
    # no unscale pass: the scaler only checked for infs (inv_scale 1), once per step
    assert spy.inv_scales == [1.0] * STEPS
    assert all(torch.equal(a, b) for t in range(STEPS) for a, b in zip(grads[t, "before"], grads[t, "after"]))
    assert scaler.get_scale() == SCALE and not bool(got[1].found_inf)
    # diagnostics report the unscaled gradient norms
    torch.testing.assert_close(got[1].layer_stats()["g_norm"], ref[1].layer_stats()["g_norm"], rtol=0, atol=0)


@pytest.mark.parametrize("name,path", with_paths(NAMES))
def test_float16_parameters(name, path, spy):
    """float16 parameters: GradScaler's unscale pass raises on float16 gradients ("Attempting to
    unscale FP16 gradients"); its inf check does not. The scaled run matches the unscaled one
    (not bitwise: unscaled float16 gradients lose what underflows, which the float32 state sees)."""
    ref = run(name, path, dtype=torch.float16)
    got = run(name, path, scaler=scaler_for(), dtype=torch.float16)
    (w_r, s_r), (w_g, s_g) = snapshot(*ref), snapshot(*got)
    for k in w_r:
        assert w_g[k].dtype == torch.float16
        torch.testing.assert_close(w_g[k], w_r[k], rtol=1e-3, atol=1e-4, msg=k)
        for key, v in s_r[k].items():
            torch.testing.assert_close(s_g[k][key], v, rtol=1e-3, atol=1e-4, msg=f"state {key} of {k}")
    assert spy.inv_scales == [1.0] * STEPS


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("name,path", with_paths(NAMES))
def test_step_with_inf_is_skipped_entirely(name, path, bad):
    """Weights and every state tensor untouched (LAMB's / LALC's ``step``, TVLARS's
    ``optimizer_steps`` included: under a GradScaler the step did not happen), the scale backs
    off, and the whole run equals the unscaled run without that step."""
    scaler = scaler_for()
    snaps = {}

    def hook(t, when, model, opt):
        if t == INF_STEP:
            snaps[when] = snapshot(model, opt)
            snaps[when + "_scale"] = scaler.get_scale()
            if when == "after":
                snaps["found_inf"] = bool(opt.found_inf)

    got = run(name, path, scaler=scaler, bad=bad, hook=hook)
    (w0, s0), (w1, s1) = snaps["before"], snaps["after"]
    for k in w0:
        assert torch.equal(w1[k], w0[k]), k
        for key, v in s0[k].items():
            assert torch.equal(s1[k][key], v), f"state {key} of {k}"
    assert snaps["found_inf"]
    assert snaps["after_scale"] == snaps["before_scale"] / 2 == SCALE / 2
    assert_same(run(name, path, skip=(INF_STEP,)), got)


@pytest.mark.parametrize("name,path", with_paths(NAMES))
def test_unscale_then_clip_then_step(name, path, spy):
    """``scaler.unscale_(opt)`` before ``scaler.step(opt)`` (clipping): the scaler passes no
    ``grad_scale`` (the gradients are unscaled already) and its ``found_inf``."""
    ref = run(name, path, clip=True)
    got = run(name, path, scaler=scaler_for(), unscale=True, clip=True)
    assert_same(ref, got)
    assert spy.inv_scales == [1.0 / SCALE] * STEPS  # the explicit unscale_, nothing more
    # ... and a step it skips is skipped entirely
    assert_same(run(name, path, clip=True, skip=(INF_STEP,)),
                run(name, path, scaler=scaler_for(), unscale=True, clip=True, bad=float("inf")))


@pytest.mark.parametrize("name,path", with_paths(NAMES))
def test_unscaling_outside_the_step_when_switched_off(name, path, spy):
    """``opt.amp_unscale_in_step = False`` (Lightning's ``16-mixed`` with ``gradient_clip_val``
    refuses optimizers whose ``_step_supports_amp_scaling`` is set): the scaler's standard path,
    ``scaler.unscale_`` + clipping + ``scaler.step``, equals the unscaled clipped run, and a
    step with an inf is skipped by the scaler itself."""
    def off(t, when, model, opt):
        if when == "before":
            opt.amp_unscale_in_step = False

    got = run(name, path, scaler=scaler_for(), unscale=True, clip=True, hook=off)
    assert not getattr(got[1], "_step_supports_amp_scaling", False)   # what Lightning reads
    assert_same(run(name, path, clip=True), got)
    assert_same(run(name, path, clip=True, skip=(INF_STEP,)),
                run(name, path, scaler=scaler_for(), unscale=True, clip=True, bad=float("inf"), hook=off))
    with pytest.raises(ValueError, match="amp_unscale_in_step"):
        got[1].amp_unscale_in_step = "no"


# ---------------------------------------------------------------------------- CLARS specifics
def test_clars_unscales_persample_norms_by_default():
    """Under a GradScaler in a loop that knows nothing of CLARS (Lightning's ``16-mixed``), the
    per-sample norms are divided by the scale the scaler sets, as the gradients are: the
    default is ``unscale_persample=True``."""
    model = make_model(torch.float32)
    assert CLARS(param_groups(model), lr=0.1, model=model).unscale_persample is True


def test_clars_tracker_contract_without_unscale_persample():
    """``unscale_persample=False``: ``loss_scale`` includes the scaler's scale, as before the
    protocol (``PerSampleGradNorms``' contract)."""
    ref = run("CLARS", "foreach")
    assert_same(ref, run("CLARS", "foreach", scaler=scaler_for(), unscale_persample=False))


def test_clars_unscale_persample_diagnostics():
    """``last_persample`` is unscaled too; its ``grad_weight`` matches ``.grad``, which stays
    scaled after ``scaler.step``, so ``variance_factor()`` (the CLARS paper's ``M_k``) is the unscaled one."""
    ref = run("CLARS", "foreach")
    got = run("CLARS", "foreach", scaler=scaler_for())
    for f in ("mean_norm", "mean_sq_norm", "variance_factor"):
        torch.testing.assert_close(getattr(got[1].last_persample, f)(), getattr(ref[1].last_persample, f)(),
                                   rtol=1e-6, atol=0, msg=f)


def test_clars_unscale_persample_refuses_explicit_unscale():
    with pytest.raises(RuntimeError, match="unscale_persample"):
        run("CLARS", "foreach", scaler=scaler_for(), unscale=True, unscale_persample=True)


def test_clars_unscale_persample_without_scaler_is_a_plain_step():
    assert_same(run("CLARS", "foreach"), run("CLARS", "foreach", unscale_persample=True))


# ---------------------------------------------------------------------------- CUDA: no syncs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,path", with_paths(NAMES, ("foreach", "compiled")))
def test_cuda_scaled_step_has_no_host_sync(name, path):
    """``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()`` without a single
    device-to-host synchronization (``torch.cuda.set_sync_debug_mode("error")`` raises on one)."""
    model = make_model().cuda()
    kw = dict(loss_scale=1.0 / MICRO, unscale_persample=True) if TABLE[name].persample else {}
    opt = build(name, model, path, **kw)
    for group in opt.param_groups:  # a device lr: the compiled path copies a float lr to the device
        group["lr"] = torch.tensor(float(group["lr"]), device="cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=SCALE)
    inf = torch.tensor(float("inf"), device="cuda")

    def one_step(t, check):
        x, y = (v.cuda() for v in batch(t, torch.float32))
        opt.zero_grad()
        losses = [F.cross_entropy(model(xs), ys) / MICRO for xs, ys in zip(x.chunk(MICRO), y.chunk(MICRO))]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if check else 0)
        try:
            for loss in losses:
                scaler.scale(loss).backward()
            if t == INF_STEP:
                model[2].weight.grad[1, 3].fill_(inf)
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode(0)

    one_step(0, check=False)  # lazy state, the scaler's scale, compilation
    for t in range(1, STEPS):
        one_step(t, check=True)
    assert scaler.get_scale() == SCALE / 2 and all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------- sharded (FSDP2)
def _sharded_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)).double()


def _sharded_run(name, path, rank=0, world=1, mesh=None, calls=None):
    """With ``mesh``: FSDP2 on 2 ranks (``Shard(0)``), a GradScaler per rank, an inf in rank 1's
    shard of ``2.weight`` only at ``INF_STEP``. Without: one process, unscaled, the two halves
    as two forwards, ``INF_STEP`` not run (a skipped step is no step)."""
    model = _sharded_model()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    kw = dict(loss_scale=1.0 if mesh is not None else 0.5, unscale_persample=True) if TABLE[name].persample else {}
    opt = build(name, model, path, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE) if mesh is not None else None
    found, n_calls = [], []
    for t in range(STEPS):
        x, y = batch(t, torch.float64)
        opt.zero_grad()
        if mesh is None:
            if t != INF_STEP:
                h = x.shape[0] // 2
                ((F.cross_entropy(model(x[:h]), y[:h]) + F.cross_entropy(model(x[h:]), y[h:])) / 2).backward()
                opt.step()
            continue
        h = x.shape[0] // world
        scaler.scale(F.cross_entropy(model(x[rank * h:(rank + 1) * h]), y[rank * h:(rank + 1) * h])).backward()
        if t == INF_STEP and rank == 1:
            model[2].weight.grad.to_local()[0, 0] = float("inf")
        calls.clear()
        scaler.step(opt)
        n_calls.append(len(calls))
        scaler.update()
        found.append(bool(opt.found_inf))
    params = {k: (p.full_tensor() if mesh is not None else p.detach().clone()) for k, p in model.named_parameters()}
    return {"params": params, "found_inf": found, "calls": n_calls,
            "scale": scaler.get_scale() if scaler is not None else None}


def _sharded_worker(rank, world, port, out):
    init_gloo(rank, world, port, compiles=True)
    from torch.distributed.tensor import init_device_mesh

    from largebatch.optim import _compiled

    _compiled.MIN_NUMEL = _compiled.MIN_TOTAL = 64
    calls = count_all_reduce()
    mesh = init_device_mesh("cpu", (world,))
    res = {(n, p): _sharded_run(n, p, rank, world, mesh, calls) for n, p in with_paths(NAMES)}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("amp_sharded")
    mp.start_processes(_sharded_worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name,path", with_paths(NAMES))
def test_sharded_scaled_run_and_one_rank_inf(ranks, name, path):
    """Scaled steps on the local shards equal the unscaled single process; an inf in one rank's
    shard skips the step on both ranks (DTensor reduces the scaler's inf check over the mesh),
    both scales back off, and the step still issues one ``all_reduce`` for all norms."""
    ref = _sharded_run(name, "per_tensor")
    for r, res in enumerate(ranks):
        got = res[(name, path)]
        for k, w in ref["params"].items():
            torch.testing.assert_close(got["params"][k], w, rtol=1e-9, atol=1e-12, msg=f"rank {r}: {k}")
        assert got["found_inf"] == [t == INF_STEP for t in range(STEPS)], f"rank {r}"
        assert got["calls"] == [1 + TABLE[name].persample] * STEPS, f"rank {r}"   # CLARS: + its statistics
        assert got["scale"] == SCALE / 2, f"rank {r}"
