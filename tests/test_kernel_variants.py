"""Kernel variants of the compiled path.

* Every variant (``_compiled.supported_variants()`` on this CPU), forced, for every compilable
  optimizer: equal to the per-tensor reference path (float32: as ``test_fast_paths.py``;
  float64: to 1e-12 of the float64 reference, as ``test_precision.py`` -- float64 tensors
  accumulate in float64 whatever the variant), at 1 and 2 threads, with a GradScaler.
* The chunked float32 norm (variant ``f32``) is accurate: relative error <= 1e-6 of the
  float64 norm on 2.4M-element tensors of mixed magnitudes.
* Forcing: ``f64`` runs by default (nothing measured, no file); ``LARGEBATCH_KERNEL_VARIANT`` /
  ``set_kernel_variant`` / ``kernel_variant`` force another.

Tensors of the compiled kernel hold at least 8192 elements here (``kernel_sized``), so that
the chunked float32 norm runs (smaller tensors take a float64 norm in every variant).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cases import TABLE, names
from largebatch.optim import CLARS, LAMB, LARS, _compiled, param_groups
from test_fast_paths import assert_same_run
from test_precision import inf_in_fc_at_step_2, step_beside_reference

CASES = {n: (TABLE[n].cls, TABLE[n].kw) for n in names(path="compiled", rule=True)}
VARIANTS = _compiled.supported_variants()
#: (optimizer, variant) pairs of the forced-variant tests: every variant for LARS and LAMB (the
#: SGD-type and Adam-type kernels); TVLARS and LALC, whose kernels add a factor to LARS's, take
#: alternate variants, so each variant still meets three rules (each pair is a compile: seconds)
FORCED = [(n, v) for n in CASES for i, v in enumerate(VARIANTS)
          if n in ("LARS", "LAMB") or i % 2 == (n == "LALC")]
BIG = 2 * _compiled.CHUNK   # the chunked float32 norm's smallest tensor


@pytest.fixture(scope="module", autouse=True)
def _dynamo_cache():
    """Start and leave with empty dynamo caches: the default variant's kernels are shared with
    other test modules, whose configurations count against each kernel's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def nothing_forced(monkeypatch, tmp_path):
    """Nothing forced, the package's cache folder fresh (not ~/.cache)."""
    monkeypatch.setenv("LARGEBATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LARGEBATCH_KERNEL_VARIANT", raising=False)
    monkeypatch.setattr(_compiled, "_FORCED", None)
    monkeypatch.setattr(_compiled, "_FAILED", False)
    # a kernel past dynamo's recompile limit would run eagerly (correct, but not the variant)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


@pytest.fixture
def threads(request):
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


def make_params(dtype=torch.float32):
    """Kernel tensors of >= 8192 elements (one a multiple of ``CHUNK``, the others not), a
    zero tensor (zero-norm rule), a non-contiguous one and a small one (foreach)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"fc": (96, 100), "conv": (32, 16, 4, 4), "bias": (6,), "scale": (BIG + 13,)}
    ps = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}
    ps["zero"] = torch.zeros(90, 100, dtype=dtype)
    ps["tr"] = torch.randn(100, 96, generator=g, dtype=dtype).t()
    return {k: nn.Parameter(v) for k, v in ps.items()}


def groups(ps):
    return [dict(params=[ps["fc"], ps["conv"], ps["zero"], ps["tr"]], weight_decay=1e-2),
            dict(params=[ps["bias"], ps["scale"]], weight_decay=0.0, adapt=False)]


def run(name, path, variant=None, steps=4):
    cls, kw = CASES[name]
    ps = make_params()
    opt = cls(groups(ps), path=path, **kw)
    opt.track_stats = True
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    g = torch.Generator().manual_seed(1)
    found, stats = [], []
    with _compiled.kernel_variant(variant):
        for t in range(steps):
            for p in ps.values():
                p.grad = torch.randn(p.shape, generator=g).to(memory_format=torch.contiguous_format)
            if t == 1:                   # non-finite gradients: one kernel tensor, one foreach tensor
                ps["fc"].grad[3, 2] = float("inf")
                ps["bias"].grad[0] = float("nan")
            opt.step()
            sched.step()
            found.append(bool(opt.found_inf))
            stats.append(opt.layer_stats())
    return ps, opt, found, stats


def ran(cls, variant, dtype=torch.float32):
    """The kernel of ``variant`` (as it applies to ``dtype``) really ran, without a fallback."""
    assert _compiled._effective(variant, dtype) in _compiled._KERNELS[cls] and _compiled.available()


# ------------------------------------------------------------------------------ variants
def test_variants_offered_on_this_cpu():
    isa = torch.backends.cpu.get_cpu_capability()
    assert VARIANTS[0] == _compiled.DEFAULT_VARIANT == "f64" and "f32" in VARIANTS
    assert ("f32-256" in VARIANTS) == (isa == "AVX512")
    assert _compiled.supported_variants(torch.float64) == tuple(v for v in VARIANTS if v.startswith("f64"))
    # float64 always accumulates in float64; a width the CPU lacks is its default width
    assert _compiled._effective("f32", torch.float64) == "f64"
    assert _compiled._effective("f32-256", torch.float64) == ("f64-256" if isa == "AVX512" else "f64")
    with pytest.raises(ValueError, match="kernel variant"):
        _compiled.set_kernel_variant("f16")


@pytest.mark.parametrize("threads", [1], indirect=True)
@pytest.mark.parametrize("name, variant", FORCED)
def test_forced_variant_equals_reference(name, variant, threads, kernel_sized):
    ref = run(name, "per_tensor")
    got = run(name, "compiled", variant)
    assert_same_run(ref, got)
    ran(CASES[name][0], variant)


@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_forced_variant_equals_reference_two_threads(name, variant, threads, kernel_sized):
    test_forced_variant_equals_reference(name, variant, threads, kernel_sized)


@pytest.mark.parametrize("variant", VARIANTS)
def test_clars_forced_variant_equals_reference(variant, kernel_sized):
    def train(path, variant=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(96, 100), nn.Tanh(), nn.Linear(100, 4))   # 9600-element weight
        opt = CLARS(param_groups(model, weight_decay=1e-2), lr=0.5, momentum=0.9, eta=0.02, model=model, path=path)
        g = torch.Generator().manual_seed(3)
        with _compiled.kernel_variant(variant):
            for _ in range(3):
                x, y = torch.randn(6, 96, generator=g), torch.randint(0, 4, (6,), generator=g)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        return model

    ref, got = train("per_tensor"), train("compiled", variant)
    for (k, a), b in zip(ref.named_parameters(), got.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=k)
    ran(CLARS, variant)


@pytest.mark.parametrize("variant", _compiled.supported_variants(torch.float64))
@pytest.mark.parametrize("name", list(CASES))
def test_float64_forced_variant_matches_reference(name, variant, kernel_sized):
    """float64: every variant is a float64-accumulating kernel (``f32`` is ``f64``, so the float64
    variants are all there are to test); 1e-12 of
    the float64 reference (test_precision.py), with an LR change every step and a skipped tensor."""
    cls, kw = CASES[name]
    kw = dict(kw)
    lr = kw.pop("lr")
    algo = TABLE[name].rule
    ps = make_params(torch.float64)
    opt = cls(groups(ps), lr=lr, path="compiled", **kw)
    with _compiled.kernel_variant(variant):
        step_beside_reference(opt, ps, algo, kw, 4, inf_in_fc_at_step_2(ps), tag=name)
    ran(cls, variant, torch.float64)


def test_float64_norm_of_f32_path_is_the_f64_one():
    x = torch.randn(3 * BIG + 5, dtype=torch.float64) * 1e3
    assert torch.equal(_compiled._KernelPathF32.norm(x), _compiled._KernelPath.norm(x))


@pytest.mark.parametrize("variant", ["f32", VARIANTS[-1]])
def test_grad_scaler_with_variant(variant, kernel_sized, monkeypatch):
    """A GradScaler's scale and inf flag are kernel inputs in every variant: a scaled run (power
    of two) equals the unscaled run bit for bit; the step with an inf gradient is skipped."""
    monkeypatch.setattr(_compiled, "MIN_NUMEL", BIG)     # one kernel tensor (9600), the rest foreach
    cls, kw = CASES["LAMB"]

    def train(scaler):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(96, 100), nn.Tanh(), nn.Linear(100, 4))
        opt = cls(param_groups(model, weight_decay=1e-2), path="compiled", **kw)
        g = torch.Generator().manual_seed(5)
        with _compiled.kernel_variant(variant):
            for t in range(3):
                x, y = torch.randn(6, 96, generator=g), torch.randint(0, 4, (6,), generator=g)
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                if scaler is None:
                    if t == 1:
                        continue
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    if t == 1:
                        model[0].weight.grad[0, 0] = float("inf")
                    scaler.step(opt)
                    scaler.update()
        return model, opt

    (ref, opt_r), (got, opt_g) = train(None), train(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)
        for key, v in opt_r.state[a].items():
            assert torch.equal(opt_g.state[b][key], v), key
    ran(cls, variant)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_chunked_float32_norm_is_accurate(threads):
    """The ``f32`` kernel's norms (2.4M elements, magnitudes over ~6 decades, a ragged tail)
    are within 1e-6 of the float64 norm; so are LAMB's sums of squares (sharded probe kernel)."""
    n = 2_359_296 + 1001
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))
    grad = torch.randn(n, generator=g) * 1e-3 + 1e-2
    p = nn.Parameter(w.clone())
    p.grad = grad.clone()
    opt = LARS([p], lr=0.1, momentum=0.9, path="compiled")
    opt.track_stats = True
    with _compiled.kernel_variant("f32"):
        opt.step()
    st = opt.layer_stats()
    for got, x in ((st["w_norm"][0], w), (st["g_norm"][0], grad)):
        exact = torch.linalg.vector_norm(x.double())
        assert abs(got.double() / exact - 1) <= 1e-6, (float(got), float(exact))
    ran(LARS, "f32")
    lamb = LAMB([p], lr=0.01, path="compiled")
    states = [lamb._init_state(p, lamb.param_groups[0])]
    grp = lamb.param_groups[0]
    with _compiled.kernel_variant("f32"):
        sq = _compiled.Compiled.local_norms(lamb, grp, [p.detach()], [grad], states)
    exact = torch.stack([x.double().square().sum().sqrt() for x in (p.detach(), grad)])
    torch.testing.assert_close(sq[0, :2].double(), exact, rtol=1e-6, atol=0)
    assert "f32" in _compiled._SHARDED_KERNELS[(LAMB, "probe")]


# ------------------------------------------------------------------------------ forcing
def lars_run(steps=2, variant=None):
    ps = make_params()
    opt = LARS(groups(ps), lr=0.5, momentum=0.9, eta=0.02, path="compiled")
    g = torch.Generator().manual_seed(1)
    with _compiled.kernel_variant(variant):
        for _ in range(steps):
            for p in ps.values():
                p.grad = torch.randn(p.shape, generator=g).to(memory_format=torch.contiguous_format)
            opt.step()
    return ps, opt


def test_the_default_runs_without_a_measurement_or_a_file(kernel_sized, tmp_path, monkeypatch):
    """Nothing forced: the ``f64`` kernel alone is compiled and run, nothing is timed and no
    file is written (the former first-use measurement and its cache file are gone)."""
    monkeypatch.setattr(_compiled, "_KERNELS", {})
    lars_run(steps=2)
    assert list(_compiled._KERNELS[LARS]) == ["f64"]
    assert not os.path.exists(tmp_path / "cache")


@pytest.mark.parametrize("variant", ["f32", VARIANTS[-1]])
def test_forced_by_env_and_api(variant, monkeypatch, kernel_sized):
    monkeypatch.setenv("LARGEBATCH_KERNEL_VARIANT", variant)
    assert _compiled.forced_variant() == variant
    ps, _ = lars_run(steps=2)
    ran(LARS, variant)
    monkeypatch.delenv("LARGEBATCH_KERNEL_VARIANT")
    ps_api, _ = lars_run(steps=2, variant=variant)                      # kernel_variant() context
    for k in ps:
        assert torch.equal(ps[k], ps_api[k]), k
    _compiled.set_kernel_variant("f64")
    monkeypatch.setenv("LARGEBATCH_KERNEL_VARIANT", variant)
    assert _compiled.forced_variant() == "f64"                           # the API wins over the env
    _compiled.set_kernel_variant(None)
    assert _compiled.forced_variant() == variant
    monkeypatch.setenv("LARGEBATCH_KERNEL_VARIANT", "auto")             # the former autotuner's value
    assert _compiled.forced_variant() is None
    monkeypatch.setenv("LARGEBATCH_KERNEL_VARIANT", "fast")
    with pytest.raises(ValueError, match="LARGEBATCH_KERNEL_VARIANT"):
        lars_run(steps=1)
