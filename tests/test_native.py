"""The ``native`` path (``optim/_native.py``, ``_native.cpp``).

* float64: every configuration the table (``cases.TABLE``) compares with the reference (its
  base and ``reference`` configurations) against the independent float64 reference
  (``reference.py``) at 1e-12, on tensors split among the threads
  (>= ``SPLIT`` elements) and whole ones, with 1 and 2 threads, a learning-rate schedule,
  and non-finite gradients in a split and in a whole tensor (left untouched);
* float32 (the table's ``native`` configurations): equal to the per-tensor reference path,
  weights, state, step counters and the layer statistics (those of skipped tensors included);
* a GradScaler's inputs: a scaled step equals the unscaled one bitwise, ``found_inf`` leaves
  everything as it was;
* the library: built once and reused, a failed build warns once and falls back; the rule is
  not inherited by subclasses.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from cases import REFERENCE_CASES, REFERENCE_IDS, TABLE, make, names
from largebatch.optim import LALC, LARS, _native
from largebatch.optim._engine import HyperparameterError
from test_precision import step_beside_reference

SPLIT = 1 << 15          # _native.cpp: tensors at least this large are split among the threads
SHAPES = {"big": (SPLIT // 64 + 3, 64), "mid": (40, 30), "small": (7, 5), "bias": (33,)}
STEPS = 6
BAD = {2: "big", 4: "mid"}    # step -> tensor with a non-finite gradient


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


def make_params(dtype):
    g = torch.Generator().manual_seed(0)
    ps = {k: nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for k, s in SHAPES.items()}
    with torch.no_grad():
        ps["small"].zero_()      # the zero-norm rule
    return ps


def groups(ps, wd):
    return [dict(params=[ps["big"], ps["mid"], ps["small"]], weight_decay=wd),
            dict(params=[ps["bias"]], weight_decay=0.0, adapt=False)]


def gradients(ps, t, gen, dtype):
    grads = {k: torch.randn(p.shape, generator=gen, dtype=dtype) * 0.1 for k, p in ps.items()}
    if t in BAD:
        grads[BAD[t]][0, 1] = float("inf") if t % 2 == 0 else float("nan")
    return grads


def run(cls, kw, path, dtype, wd=5e-3, scale=None, hook=None):
    ps = make_params(dtype)
    opt = cls(groups(ps, wd), path=path, **kw)
    opt.track_stats = True
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    gen = torch.Generator().manual_seed(1)
    stats, found = [], []
    for t in range(STEPS):
        grads = gradients(ps, t, gen, dtype)
        for k, p in ps.items():
            p.grad = grads[k] * scale if scale is not None else grads[k]
        if scale is not None:    # what GradScaler.step hands an optimizer that unscales itself
            opt.grad_scale = torch.tensor(scale, dtype=torch.float32)
            opt.found_inf = torch.tensor(0.0)
        if hook:
            hook(t, opt)
        opt.step()
        if hasattr(opt, "grad_scale"):   # the scaler deletes its inputs after the step
            del opt.grad_scale
        del opt.found_inf
        sched.step()
        stats.append(opt.layer_stats())
        found.append(bool(opt.last_found_inf))
    return ps, opt, stats, found


def ran_native():
    assert _native._LIB is not None and _native.available()


@pytest.mark.parametrize("name,j,kw", [c for c in REFERENCE_CASES if "native" in TABLE[c[0]].paths],
                         ids=[i for c, i in zip(REFERENCE_CASES, REFERENCE_IDS) if "native" in TABLE[c[0]].paths])
def test_float64_matches_reference(name, j, kw, threads, kernel_sized):
    cls, algo = TABLE[name].cls, TABLE[name].rule
    kw = dict(kw)
    lr = kw.pop("lr")
    ps = make_params(torch.float64)
    opt = cls(groups(ps, 5e-3), lr=lr, path="native", **kw)

    def grads_of(t, gen):
        return gradients(ps, t, gen, torch.float64), ({BAD[t]} if t in BAD else ())
    step_beside_reference(opt, ps, algo, kw, STEPS, grads_of, atol=1e-14, tag=f"{cls.__name__} {kw}")
    start = make_params(torch.float64)
    moved = max(float((p.detach() - start[k].detach()).abs().max()) for k, p in ps.items())
    assert moved > 1e-3   # not vacuous
    ran_native()


#: the rows on the native path that need no model, and their ``native`` configurations
NATIVE = names(path="native", model_free=True)
NAMED = {f"{n}-{j}": (TABLE[n].cls, kw) for n in NATIVE for j, kw in enumerate(TABLE[n].native)}
#: the rows the costly checks run on (``spot_check``)
SPOT = names(path="native", model_free=True, where=lambda r: r.spot_check)


def assert_runs_close(a, b, rtol, atol):
    (ps_a, opt_a, st_a, f_a), (ps_b, opt_b, st_b, f_b) = a, b
    assert f_a == f_b == [t in BAD for t in range(STEPS)]
    for k in ps_a:
        torch.testing.assert_close(ps_a[k], ps_b[k], rtol=rtol, atol=atol, msg=lambda m: f"weights {k}: {m}")
        for key, v in opt_b.state[ps_b[k]].items():
            torch.testing.assert_close(opt_a.state[ps_a[k]][key], v, rtol=rtol, atol=atol,
                                       msg=lambda m: f"state {key} of {k}: {m}")
    for t, (sa, sb) in enumerate(zip(st_a, st_b)):
        for key in ("w_norm", "g_norm", "trust", "lr"):
            torch.testing.assert_close(sa[key], sb[key], rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m: f"step {t} layer stat {key}: {m}")


@pytest.mark.parametrize("name", list(NAMED))
def test_float32_matches_per_tensor_path(name, threads, kernel_sized):
    cls, kw = NAMED[name]
    ref = run(cls, kw, "per_tensor", torch.float32)
    got = run(cls, kw, "native", torch.float32)
    assert_runs_close(got, ref, rtol=2e-5, atol=1e-6)
    ran_native()


@pytest.mark.parametrize("name", list(NAMED))
def test_grad_scaler_inputs(name, kernel_sized):
    """A scaled run (gradients times 2^10, ``grad_scale`` set) equals the plain run bitwise;
    a step with ``found_inf`` set leaves weights, state and counters as they were."""
    cls, kw = NAMED[name]
    plain = run(cls, kw, "native", torch.float32)
    scaled = run(cls, kw, "native", torch.float32, scale=1024.0)
    assert_runs_close(scaled, plain, rtol=0, atol=0)

    def found_inf_at_3(t, opt):
        if t == 3:
            opt.grad_scale = torch.tensor(1.0)
            opt.found_inf = torch.tensor(1.0)

    def skip_3(t, opt):
        if t == 3:
            for p in opt.param_groups[0]["params"] + opt.param_groups[1]["params"]:
                p.grad = None
    got = run(cls, kw, "native", torch.float32, hook=found_inf_at_3)
    ps_g, opt_g = got[0], got[1]
    ps_s, opt_s = run(cls, kw, "native", torch.float32, hook=skip_3)[:2]
    for k in ps_g:
        assert torch.equal(ps_g[k], ps_s[k]), k
        for key, v in opt_s.state[ps_s[k]].items():
            if key != "optimizer_steps":   # TVLARS: a step without gradients is not a step
                assert torch.equal(opt_g.state[ps_g[k]][key], v), (k, key)


def test_library_is_built_once_and_reused(kernel_sized, monkeypatch):
    run(LARS, TABLE["LARS"].native[0], "native", torch.float32)
    path = _native.library_path()
    assert path.endswith(".so") and _native._LIB is not None
    import os
    assert os.path.exists(path)
    monkeypatch.setattr(_native, "_LIB", None)
    monkeypatch.setattr(_native, "_build", lambda path: pytest.fail("rebuilt an existing library"))
    got = run(LARS, TABLE["LARS"].native[0], "native", torch.float32)
    assert_runs_close(got, run(LARS, TABLE["LARS"].native[0], "per_tensor", torch.float32), rtol=2e-5, atol=1e-6)
    ran_native()


def test_failed_build_warns_once_and_falls_back(kernel_sized, monkeypatch, tmp_path):
    monkeypatch.setenv("LARGEBATCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "_compiler", lambda: str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(_native, "_LIB", None)
    monkeypatch.setattr(_native, "_FAILED", False)
    _native.library_path.cache_clear()
    try:
        ref = run(LALC, TABLE["LALC"].native[0], "compiled", torch.float32)
        with pytest.warns(RuntimeWarning, match="native optimizer path is unavailable"):
            got = run(LALC, TABLE["LALC"].native[0], "native", torch.float32)
        assert_runs_close(got, ref, rtol=0, atol=0)          # it ran the compiled path
        assert not _native.available()
        opt = LALC([nn.Parameter(torch.ones(3))], lr=0.1)
        assert opt._path_for(torch.device("cpu")) == "compiled"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(LALC, TABLE["LALC"].native[0], "native", torch.float32)   # no second warning, no second try
    finally:
        _native.library_path.cache_clear()


def test_rule_is_declared_not_inherited():
    class MyLARS(LARS):   # may change _update: the native LARS kernel would be wrong for it
        pass

    p = nn.Parameter(torch.ones(3))
    assert _native.rule_of(LARS) == "lars" and _native.rule_of(MyLARS) is None
    assert LARS([p], lr=0.1)._path_for(torch.device("cpu")) == "native"
    assert MyLARS([p], lr=0.1)._path_for(torch.device("cpu")) == "foreach"   # `compilable` is not inherited either
    with pytest.raises(HyperparameterError, match="path='native'"):
        MyLARS([p], lr=0.1, path="native")


@pytest.mark.parametrize("name", list(NAMED))
def test_same_bits_for_any_thread_count_and_vector_isa(name, kernel_sized, monkeypatch):
    """The sums of squares run in a fixed order (16 lanes, blocks in order): 1 and 2 threads,
    and a library built for baseline x86-64 (SSE2) instead of this CPU, give the same bits."""
    cls, kw = NAMED[name]
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run(cls, kw, "native", torch.float32)
        torch.set_num_threads(1)
        one = run(cls, kw, "native", torch.float32)
    finally:
        torch.set_num_threads(n)
    assert_runs_close(one, two, rtol=0, atol=0)
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        return
    monkeypatch.setattr(_native, "FLAGS", tuple("-march=x86-64" if f == "-march=native" else f for f in _native.FLAGS))
    monkeypatch.setattr(_native, "_LIB", None)
    _native.library_path.cache_clear()
    try:
        torch.set_num_threads(2)
        base = run(cls, kw, "native", torch.float32)
        assert "-march=x86-64" in _native.FLAGS and _native._LIB is not None
    finally:
        torch.set_num_threads(n)
        _native.library_path.cache_clear()
    assert_runs_close(base, two, rtol=0, atol=0)


def test_optimizers_command_names_each_cpu_path(capsys):
    from largebatch.cli import main
    from largebatch.optim import registry
    by_class = {info.cls: info for info in registry.OPTIMIZERS.values()}
    assert registry.OPTIMIZERS["sgd"].cpu_path == "torch"
    for name, row in TABLE.items():   # every row is registered, on the fastest path it runs on
        assert by_class[row.cls].cpu_path == next(p for p in ("native", "compiled", "foreach") if p in row.paths), name
    assert main(["optimizers"]) == 0
    out = capsys.readouterr().out
    assert out.count("CPU path: native") == len(names(path="native")) and "native path (C++ kernels):" in out


@pytest.mark.parametrize("name", list(NAMED))
def test_state_dict_resume_is_bitwise(name, kernel_sized):
    """Stop after 3 steps, rebuild the optimizer from ``state_dict`` (a fresh process's view),
    finish: the same bits as the uninterrupted run."""
    cls, kw = NAMED[name]
    whole = run(cls, kw, "native", torch.float32)

    saved = {}

    def stop_at_3(t, opt):
        if t == 3:
            saved["state"] = copy.deepcopy(opt.state_dict())
            saved["weights"] = {k: p.detach().clone() for k, p in zip(SHAPES, opt.param_groups[0]["params"]
                                                                       + opt.param_groups[1]["params"])}
    run(cls, kw, "native", torch.float32, hook=stop_at_3)
    ps = make_params(torch.float32)
    with torch.no_grad():
        for k, p in ps.items():
            p.copy_(saved["weights"][k])
    opt = cls(groups(ps, 5e-3), path="native", **kw)
    opt.load_state_dict(saved["state"])
    for group, lr in zip(opt.param_groups, (g["lr"] for g in saved["state"]["param_groups"])):
        group["lr"] = lr     # the scheduler's lr at step 3 (run's LambdaLR: lr / (1 + t))
    gen = torch.Generator().manual_seed(1)
    for t in range(STEPS):
        grads = gradients(ps, t, gen, torch.float32)
        if t < 3:
            continue
        for k, p in ps.items():
            p.grad = grads[k]
        opt.step()
        for group in opt.param_groups:
            group["lr"] = kw["lr"] / (t + 2)
    for k in ps:
        assert torch.equal(ps[k], whole[0][k]), k
        for key, v in whole[1].state[whole[0][k]].items():
            assert torch.equal(opt.state[ps[k]][key], v), (k, key)


@pytest.mark.parametrize("name", SPOT)
def test_channels_last_and_strided_tensors(name, kernel_sized, monkeypatch):
    """Channels-last weights (and their gradients and state) go through the kernel; a weight
    whose gradient has other strides, and a transposed one, take foreach in the same step."""
    cls, kw = TABLE[name].cls, TABLE[name].native[0]
    calls = []
    orig = cls._masked_update

    def spy(self, group, w, g, st, P, *a):
        calls.append(len(w.ts))
        return orig(self, group, w, g, st, P, *a)

    def train(path):
        torch.manual_seed(0)
        convs = [torch.randn(16, 8, 3, 3).to(memory_format=torch.channels_last) for _ in range(2)]
        ps = [nn.Parameter(c) for c in convs] + [nn.Parameter(torch.randn(9, 40).t()), nn.Parameter(torch.randn(5))]
        opt = cls(ps, path=path, **kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for i, p in enumerate(ps):
                g = torch.randn(p.shape, generator=gen)
                p.grad = g.to(memory_format=torch.channels_last) if i == 0 else g   # ps[1]: strides differ
            opt.step()
        return ps

    ref = train("per_tensor")
    monkeypatch.setattr(cls, "_masked_update", spy)
    got = train("native")
    assert calls == [2, 2, 2]          # the conv with contiguous gradient and the transposed weight
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    ran_native()


def test_read_only_cache_folder_builds_in_a_temporary_one(kernel_sized, monkeypatch, tmp_path):
    import os
    import tempfile
    ro = tmp_path / "ro"
    monkeypatch.setenv("LARGEBATCH_CACHE_DIR", str(ro))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    build = _native._build

    def read_only(path):   # what a read-only folder does (the tests may run as root)
        if path.startswith(str(ro)):
            raise PermissionError(13, "Permission denied", path)
        build(path)

    monkeypatch.setattr(_native, "_build", read_only)
    monkeypatch.setattr(_native, "_LIB", None)
    monkeypatch.setattr(_native, "_FAILED", False)
    _native.library_path.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(LARS, TABLE["LARS"].native[0], "native", torch.float32)
        ran_native()
        assert len(os.listdir(tmp_path / "tmp" / f"largebatch-{os.getuid()}" / "native")) == 1
    finally:
        _native.library_path.cache_clear()


#: the rows with random configurations (``fuzz``)
FUZZED = names(path="native", model_free=True, where=lambda r: r.fuzz is not None)
FUZZ_SIZES = [0, 1, 15, 16, 17, 1023, 1024, 1025, 2047, SPLIT - 1, SPLIT, SPLIT + 1, 2 * SPLIT + 1000]


@pytest.mark.parametrize("seed", range(12))
def test_random_configurations_match_per_tensor_in_float64(seed, kernel_sized):
    """Random hyper-parameters (momentum 0 or not, Nesterov, dampening, clipping, eps, weight
    decay, excluded groups, an lr tensor, a GradScaler scale) and sizes at every boundary of the
    kernel (empty, one element, around LANES, BLOCK and SPLIT): float64 native == per_tensor."""
    rng = torch.Generator().manual_seed(100 + seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=rng))]  # noqa: E731
    name = pick(FUZZED)
    mu = pick([0.0, 0.9])
    cls, kw = TABLE[name].cls, TABLE[name].fuzz(pick, seed, mu)
    sizes = [pick(FUZZ_SIZES) for _ in range(5)]
    wds = [pick([0.0, 3e-3]) for _ in range(2)]
    scale = pick([None, 512.0])
    lr_tensor = bool(seed % 3 == 0)

    def train(path):
        g = torch.Generator().manual_seed(seed)
        ps = [nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64)) for n in sizes]
        groups_ = [dict(params=ps[:3], weight_decay=wds[0]), dict(params=ps[3:], weight_decay=wds[1], adapt=False)]
        opt = cls(groups_, path=path, **kw)
        if lr_tensor:
            for group in opt.param_groups:
                group["lr"] = torch.tensor(group["lr"], dtype=torch.float64)
        opt.track_stats = True
        stats = []
        for t in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1
            if t == 2 and sizes[0] > 0:
                ps[0].grad[-1] = float("nan")
            if scale is not None:
                for p in ps:
                    p.grad.mul_(scale)
                opt.grad_scale = torch.tensor(scale, dtype=torch.float64)
                opt.found_inf = torch.tensor(float(t == 3))
            opt.step()
            if scale is not None:
                del opt.grad_scale, opt.found_inf
            stats.append(opt.layer_stats())
        return ps, opt, stats

    ref, got = train("per_tensor"), train("native")
    for a, b in zip(got[0], ref[0]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        for key, v in ref[1].state[b].items():
            torch.testing.assert_close(got[1].state[a][key], v, rtol=1e-12, atol=1e-14, msg=key)
    for sa, sb in zip(got[2], ref[2]):
        for key in ("w_norm", "g_norm", "trust", "lr"):
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-12, atol=1e-14, equal_nan=True, msg=key)


@pytest.fixture
def two_threads():
    """Two OpenMP threads, so that a large tensor is split between them (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("scale", [1e200, 1e-200, 0.0])
@pytest.mark.parametrize("name", names(path="native", model_free=True, where=lambda r: r.spot_check or r.derived_norms))
def test_scaled_norms_on_a_tensor_split_among_threads(name, scale, kernel_sized, two_threads):
    """float64 sums of squares that over- or underflow (or are exactly 0) are redone scaled by
    one thread while the others wait (_native.cpp, norms_of): a tensor large enough to be split
    between 2 threads gives the per-tensor path's result, no tensor skipped. The spot-check rows
    and those with a norm of a derived tensor (LAMB's ``r``, LALC's ``h``)."""
    out = {}
    for path in ("native", "per_tensor"):
        gen = torch.Generator().manual_seed(0)
        w = nn.Parameter(torch.randn(256, 160, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        opt = make(name, [w], path=path)
        for _ in range(2):
            w.grad = scale * torch.randn(256, 160, generator=gen, dtype=torch.float64)
            opt.step()
            assert not bool(opt.found_inf)
        out[path] = w.detach()
    torch.testing.assert_close(out["native"], out["per_tensor"], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("scale", [1e-22, 3e19])
@pytest.mark.parametrize("name", SPOT)
def test_float32_blocks_that_over_or_underflow_are_redone_in_double(name, scale, kernel_sized, two_threads):
    """float32 blocks are summed in float32 and redone in double when a sum may have over- or
    underflowed (_native.cpp, block_sums): a gradient that is 0 except in the first block of each
    thread's slice, at a magnitude whose float32 squares underflow (1e-22) or overflow (3e19),
    gives the per-tensor path's norms (scaled in float64) on a tensor split between 2 threads."""
    out = {}
    for path in ("native", "per_tensor"):
        gen = torch.Generator().manual_seed(0)
        w = nn.Parameter(torch.randn(256, 160, generator=torch.Generator().manual_seed(1)))
        opt = make(name, [w], path=path)
        opt.track_stats = True
        for _ in range(2):
            g = torch.zeros(256 * 160)
            for start in (0, 20480):   # the first block of each thread's slice
                g[start:start + 1024] = scale * torch.randn(1024, generator=gen)
            w.grad = g.view(256, 160)
            opt.step()
        out[path] = (w.detach(), opt.layer_stats())
    torch.testing.assert_close(out["native"][0], out["per_tensor"][0], rtol=1e-5, atol=1e-6)
    for key in ("w_norm", "g_norm", "trust", "lr"):
        torch.testing.assert_close(out["native"][1][key], out["per_tensor"][1][key], rtol=1e-5, atol=0, msg=key)
