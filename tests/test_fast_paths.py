"""Every execution path equals the per-tensor reference; the compiled path compiles once,
falls back safely and is not used for small models; ``step()`` traces without graph breaks.

Compilation is the slow part (seconds per configuration on 2 cores), so each optimizer
class is compiled for two group configurations only, shared by all tests of this module
(the compiled kernels live in ``_compiled._KERNELS`` for the whole session).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import inspect

from cases import TABLE, names
from largebatch.optim import LAMB, LARS, _compiled

#: the rows on the compiled path that need no model: name -> (class, base configuration)
CASES = {name: (TABLE[name].cls, TABLE[name].kw) for name in names(path="compiled", model_free=True)}
NESTEROV = {name for name, (cls, _) in CASES.items() if "nesterov" in inspect.signature(cls).parameters}


def make_params():
    """Compiled-eligible (>= 64 elements, contiguous) and foreach ones, in two groups."""
    g = torch.Generator().manual_seed(0)
    shapes = {"fc": (16, 8), "conv": (4, 2, 3, 3), "bias": (6,), "scale": (80,)}
    ps = {k: nn.Parameter(torch.randn(s, generator=g)) for k, s in shapes.items()}
    ps["zero"] = nn.Parameter(torch.zeros(9, 8))                       # zero-norm rule, compiled
    ps["tr"] = nn.Parameter(torch.randn(12, 8, generator=g).t())       # non-contiguous: foreach
    return ps


def groups(ps, name, cfg):
    adapted = [ps["fc"], ps["conv"], ps["zero"], ps["tr"]]
    excluded = [ps["bias"], ps["scale"]]
    wd_a, wd_e, nest_a, nest_e = (1e-2, 0.0, True, False) if cfg == 1 else (0.0, 1e-2, False, True)
    ga, ge = dict(params=adapted, weight_decay=wd_a), dict(params=excluded, weight_decay=wd_e, adapt=False)
    if name in NESTEROV:
        ga["nesterov"], ge["nesterov"] = nest_a, nest_e
    return [ga, ge]


def run(name, cfg, path, steps=4, track=True):
    cls, kw = CASES[name]
    ps = make_params()
    opt = cls(groups(ps, name, cfg), path=path, **kw)
    opt.track_stats = track
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))   # lr changes every step
    g = torch.Generator().manual_seed(1)
    found, stats = [], []
    for t in range(steps):
        for p in ps.values():
            p.grad = torch.randn(p.shape, generator=g).to(memory_format=torch.contiguous_format)
        if t == 1:                      # non-finite gradients: one compiled tensor, one foreach tensor
            ps["fc"].grad[3, 2] = float("inf")
            ps["bias"].grad[0] = float("nan")
        opt.step()
        sched.step()
        found.append(bool(opt.found_inf))
        if track:
            stats.append(opt.layer_stats())
    return ps, opt, found, stats


def assert_same_run(ref, got, atol=1e-6, rtol=1e-5):
    (ps_r, opt_r, found_r, stats_r), (ps_g, opt_g, found_g, stats_g) = ref, got
    assert found_g == found_r == [False, True, False, False]
    for k in ps_r:
        torch.testing.assert_close(ps_g[k], ps_r[k], atol=atol, rtol=rtol, msg=f"weights of {k}")
        for key, v in opt_r.state[ps_r[k]].items():
            torch.testing.assert_close(opt_g.state[ps_g[k]][key], v, atol=atol, rtol=rtol,
                                       msg=f"state {key} of {k}")
    for s_r, s_g in zip(stats_r, stats_g):
        for key in ("w_norm", "g_norm", "trust", "lr"):
            torch.testing.assert_close(s_g[key], s_r[key], atol=atol, rtol=rtol, equal_nan=True,
                                       msg=f"layer stat {key}")


@pytest.mark.parametrize("name,cfg", [(n, 1) for n in CASES] + [(n, 2) for n in CASES if n in NESTEROV])
def test_paths_equal_reference(name, cfg, kernel_sized):
    """Group configuration 1, and 2 (the groups' ``nesterov`` swapped) where groups have one."""
    ref = run(name, cfg, "per_tensor")
    for path in (p for p in TABLE[name].paths if p != "per_tensor"):
        got = run(name, cfg, path)
        assert_same_run(ref, got)
    # the compiled run really used a kernel (no silent fallback to foreach)
    assert CASES[name][0] in _compiled._KERNELS and _compiled.available()


@pytest.mark.parametrize("name", list(CASES))
def test_lr_schedule_does_not_recompile(name, kernel_sized, monkeypatch):
    monkeypatch.setattr(_compiled, "_FAILED", False)
    run(name, 1, "compiled", steps=1, track=False)       # compiles (or reuses) this configuration
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.simplefilter("error")                   # a recompile must not be swallowed as a fallback
        run(name, 1, "compiled", steps=3, track=False)   # lr 1, 1/2, 1/3: same kernels
    assert _compiled.available()


def test_default_path_and_fallbacks(monkeypatch):
    opt = LARS([nn.Parameter(torch.ones(3))], lr=0.1)
    assert opt._path_for(torch.device("cpu")) == "native"
    assert opt._path_for(torch.device("meta")) == "foreach"
    assert LARS([nn.Parameter(torch.ones(3))], lr=0.1, path="per_tensor")._path_for(torch.device("cpu")) == "per_tensor"
    monkeypatch.setenv("LARGEBATCH_NO_NATIVE", "1")
    assert opt._path_for(torch.device("cpu")) == "compiled"
    monkeypatch.setenv("LARGEBATCH_NO_COMPILE", "1")   # also disables native (both build C++)
    monkeypatch.delenv("LARGEBATCH_NO_NATIVE")
    assert opt._path_for(torch.device("cpu")) == "foreach"
    with pytest.raises(ValueError, match="path"):
        LARS([nn.Parameter(torch.ones(3))], lr=0.1, path="fused")


def test_small_model_never_compiles():
    """Default thresholds: a small model (every test and demo model) runs without compiling."""
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.Linear(256, 10))
    opt = LAMB(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).square().mean().backward()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    opt.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
    assert opt.state[model[2].weight]["exp_avg"].abs().sum() > 0


def test_compile_failure_falls_back_to_foreach(monkeypatch, kernel_sized):
    def broken(cls):
        def k(*args):
            raise torch._inductor.exc.CppCompileError(["g++"], "no C++ compiler")
        return k, None
    monkeypatch.setattr(_compiled, "_kernel_for", broken)
    monkeypatch.setattr(_compiled, "_FAILED", False)
    ref = run("LARS", 1, "foreach")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        got = run("LARS", 1, "compiled")
    assert_same_run(ref, got, atol=0, rtol=0)
    assert not _compiled.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("LARS", 1, "compiled", steps=1)   # no second warning, no second attempt


@pytest.mark.parametrize("name", list(CASES))
def test_step_compiles_without_graph_break(name):
    """A compiled training step (``fullgraph=True``) containing our ``step()``, equal to eager."""
    cls, kw = CASES[name]

    def setup(path=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        from largebatch.optim import param_groups
        return model, cls(param_groups(model, weight_decay=1e-2), path=path, **kw)

    x = torch.randn(6, 5)
    results = []
    for compiled in (False, True):
        # eager: foreach, the path the default resolves to while traced (the first Linear's
        # bias has a gradient of pure rounding noise under BatchNorm, which LAMB's m / sqrt(v)
        # turns into O(1) steps: only the same path agrees there)
        model, opt = setup(None if compiled else "foreach")

        def step():
            opt.step()
            return opt.found_inf

        fn = torch.compile(step, fullgraph=True, backend="eager") if compiled else step
        for _ in range(2):
            opt.zero_grad()            # torch's own zero_grad is marked not traceable by dynamo
            model(x).square().mean().backward()
            fn()                       # fullgraph=True raises on any graph break
        results.append([p.detach().clone() for p in model.parameters()])
    model, opt = setup()
    model(x).square().mean().backward()
    assert torch._dynamo.explain(opt.step)().graph_break_count == 0
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_default_path_never_synchronizes(name):
    cls, kw = CASES[name]
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.Linear(128, 10)).cuda()
    from largebatch.optim import param_groups
    opt = cls(param_groups(model, weight_decay=1e-2), **kw)
    model(torch.randn(8, 64, device="cuda")).square().mean().backward()
    opt.step()                              # state creation may allocate; then no syncs at all
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt._path_for(torch.device("cuda")) == "foreach"
