"""docs/algorithms.md section 8:

* float64 runs reproduce the float64 formulas (no per-tensor scalar rounded to float32),
  LAMB's bias corrections lose no digits, step counters are exact integers;
* float16 / bfloat16 parameters keep float32 state and do float32 arithmetic, then round
  the result to the parameter dtype;
* complex parameters are updated exactly as their ``torch.view_as_real`` would be.

Every optimizer of the table (``cases.TABLE``), every execution path it runs on. CLARS's float64
run uses the per-sample reference of ``test_clars.py``; its half-precision and complex runs take
``n_k`` from a fixed stand-in tracker (``cases.FixedNorms``: the per-sample tracker itself
refuses complex parameters).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cases import TABLE, make, names, with_paths
from largebatch.optim import CLARS, LAMB, LARS, _compiled, param_groups
from largebatch.persample import PerSampleGradNorms
from reference import Reference
from test_clars import ETA, LR, MU, WD, Net, batches, reference_clars

#: (name, index, configuration, path): the base and ``float64`` configurations of every row with
#: a reference rule, on every path it runs on
F64_CASES = [(n, j, kw, p) for n in names(rule=True) for j, kw in enumerate((TABLE[n].kw, *TABLE[n].float64))
             for p in TABLE[n].paths]
HALF = [torch.float16, torch.bfloat16]
#: the per-sample rows' ``n_k`` (cases.FixedNorms) for the adapted tensors fc, conv, tr
N_K = [3.0, 2.0, 5.0]


def make_params(dtype=torch.float64):
    """fc, conv: adapted, through the compiled kernel (>= 64 elements with ``kernel_sized``);
    tr: adapted, non-contiguous (foreach); bias, scale: excluded (foreach)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"fc": (16, 8), "conv": (4, 2, 3, 3), "bias": (6,), "scale": (40,)}
    real = dtype.to_real()
    ps = {k: torch.randn(s, generator=g, dtype=real) for k, s in shapes.items()}
    ps["tr"] = torch.randn(12, 8, generator=g, dtype=real).t()
    if dtype.is_complex:
        ps = {k: torch.complex(v, torch.randn(v.shape, generator=g, dtype=real)) for k, v in ps.items()}
        ps["tr"] = ps["tr"].t().contiguous().t()
    return {k: nn.Parameter(v.to(dtype)) for k, v in ps.items()}


def groups(ps):
    return [dict(params=[ps["fc"], ps["conv"], ps["tr"]], weight_decay=1e-2),
            dict(params=[ps["bias"], ps["scale"]], weight_decay=0.0, adapt=False)]


def ran_compiled(path, cls):
    """On the compiled path, the fused kernel really ran (no silent fallback to foreach)."""
    if path == "compiled":
        assert cls in _compiled._KERNELS and _compiled.available()


def where(opt, ps):
    names = {id(p): k for k, p in ps.items()}
    return {names[id(p)]: (g["adapt"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def step_beside_reference(opt, ps, algo, kw, steps, gradients, atol=1e-13, tag=""):
    """Steps ``opt`` (over the float64 parameters ``ps``, name -> parameter; an LR schedule
    ``1 / (1 + t)`` is added here) beside the independent float64 ``Reference``: after every
    step ``found_inf`` is right and every weight is within 1e-12 (relative) of the reference.
    ``gradients(t, gen) -> (grads, skip)``: the step's gradients and the names of those made
    non-finite (skipped)."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    ref = Reference(algo, {k: p.detach() for k, p in ps.items()}, where(opt, ps), **kw)
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        grads, skip = gradients(t, gen)
        for k, p in ps.items():
            p.grad = grads[k].clone()
        ref.step(grads, opt.param_groups[0]["lr"], skip=skip)
        opt.step()
        sched.step()
        assert bool(opt.found_inf) == bool(skip)
        for k, p in ps.items():
            torch.testing.assert_close(p.detach(), ref.w[k], rtol=1e-12, atol=atol,
                                       msg=lambda m: f"{tag} step {t} tensor {k}: {m}")


def inf_in_fc_at_step_2(ps):
    """``gradients`` for :func:`step_beside_reference`: standard normal, an inf in ``fc`` at step 2."""
    def gradients(t, gen):
        grads = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in ps.items()}
        skip = ()
        if t == 2:
            grads["fc"][1, 1], skip = float("inf"), ("fc",)
        return grads, skip
    return gradients


# ------------------------------------------------------------------------------ float64
@pytest.mark.parametrize("path", TABLE["LARS"].paths)
def test_float64_minimal_lars_case_is_exact(path, kernel_sized):
    """An excluded float64 tensor, lr 1, momentum 0.9, g = 1 twice: w = -(1 + (0.9 + 1)) = -2.9
    exactly (a float32 momentum gave -2.899999976)."""
    p = nn.Parameter(torch.zeros(64, dtype=torch.float64))
    opt = LARS([dict(params=[p], adapt=False)], lr=1.0, momentum=0.9, path=path)
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.step()
    assert (p == -2.9).all(), p[0].item()
    ran_compiled(path, LARS)


@pytest.mark.parametrize("name,j,kw,path", F64_CASES, ids=[f"{n}-{j}-{p}" for n, j, _, p in F64_CASES])
def test_float64_matches_reference(name, j, kw, path, kernel_sized):
    """Five steps, random gradients, an LR change every step and one skipped (inf) tensor:
    float64 weights equal the float64 reference to 1e-12 (relative)."""
    cls, algo = TABLE[name].cls, TABLE[name].rule
    kw = dict(kw)
    lr = kw.pop("lr")
    ps = make_params(torch.float64)
    opt = cls(groups(ps), lr=lr, path=path, **kw)
    step_beside_reference(opt, ps, algo, kw, 5, inf_in_fc_at_step_2(ps), tag=name)
    ran_compiled(path, cls)


@pytest.mark.parametrize("path", TABLE["CLARS"].paths)
def test_clars_float64_matches_reference(path, kernel_sized):
    torch.manual_seed(0)
    model = Net().double()
    data = [(x.double(), y) for x, y in batches(4, 6)]
    ref = reference_clars(model, data)
    opt = CLARS(param_groups(model, weight_decay=WD), lr=LR, momentum=MU, eta=ETA, model=model, path=path)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (1 + t) / 4)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[k], rtol=1e-12, atol=1e-13, msg=k)
    ran_compiled(path, CLARS)


@pytest.mark.parametrize("path", TABLE["LAMB"].paths)
@pytest.mark.parametrize("b2", [0.999, 0.99999])
def test_lamb_float32_bias_correction_without_cancellation(b2, path, kernel_sized):
    """LAMB's first update of an excluded float32 tensor (``w = 0``: the update is stored
    exactly) is ``-lr * r`` to float32 accuracy; ``1 - b2 ** t`` in float32 was 1.3e-5
    (b2 = 0.999) and 1.4e-3 (b2 = 0.99999) off, so ``r`` was 6.6e-6 and 6.8e-4 off."""
    p = nn.Parameter(torch.zeros(64))
    opt = LAMB([dict(params=[p], adapt=False)], lr=1.0, betas=(0.9, b2), eps=1e-3, path=path)
    ref = Reference("lamb", {"p": p.detach()}, {"p": (False, 0.0)}, betas=(0.9, b2), eps=1e-3)
    p.grad = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 1e-2
    ref.step({"p": p.grad}, 1.0)
    opt.step()
    torch.testing.assert_close(p.detach().double(), ref.w["p"], rtol=1e-6, atol=0)


def _counter_keys(name):
    """The state keys of row ``name`` that hold step counters (0-d tensors), after one step."""
    p = nn.Parameter(torch.randn(5, 4))
    opt = make(name, [p], path="per_tensor")
    p.grad = torch.randn(5, 4)
    opt.step()
    return [k for k, v in opt.state[p].items() if v.dim() == 0]


#: name -> its counters' state keys, for the rows without a model that keep step counters
COUNTERS = {n: keys for n in names(model_free=True) if (keys := _counter_keys(n))}


def test_step_counters_are_exact_integers():
    """Counters stay exact past 2**24, where a float32 counter stops counting."""
    p = nn.Parameter(torch.randn(5, 4))
    p.grad = torch.randn(5, 4)
    for name, keys in COUNTERS.items():
        opt = make(name, [p], lr=1e-3)
        opt.step()
        st = opt.state[p]
        for key in keys:
            assert not st[key].is_floating_point(), (name, key)
            st[key].fill_(2 ** 24)
        opt.step()
        for key in keys:
            assert int(st[key]) == 2 ** 24 + 1, (name, key)


def _counters(opt):
    return {(i, k): v for i, s in opt.state_dict()["state"].items() for k, v in s.items() if v.dim() == 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", COUNTERS)
def test_state_dict_with_float32_counters_still_loads(name, dtype):
    """Checkpoints written before the counters became int64 (float32 counters under the same
    keys) load, and the run continues exactly as the uninterrupted one."""

    def steps(ps, opt, seed, n):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            for p in ps.values():
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
            opt.step()

    a, b = make_params(dtype), make_params(dtype)
    opt_a = make(name, groups(a))
    steps(a, opt_a, 0, 3)
    sd = copy.deepcopy(opt_a.state_dict())
    assert _counters(opt_a) and all(v.dtype == torch.int64 for v in _counters(opt_a).values())
    for s in sd["state"].values():  # as saved before this change
        for k, v in s.items():
            if v.dim() == 0:
                s[k] = v.float()
    for k, p in b.items():
        p.data.copy_(a[k])
    opt_b = make(name, groups(b))
    opt_b.load_state_dict(sd)
    for (i, k), v in _counters(opt_b).items():
        assert v.dtype == torch.int64 and torch.equal(v, _counters(opt_a)[i, k])
    steps(a, opt_a, 1, 3)
    steps(b, opt_b, 1, 3)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ half precision
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name,path", with_paths(names()))
def test_half_precision_keeps_float32_state_and_arithmetic(name, path, dtype, kernel_sized):
    """Each step of a half-precision run is the float32 step of the upcast weights and
    gradients, rounded to the parameter dtype; the state is float32 and equals the float32
    run's. Gradients ~1e-3 (LAMB's ``g * g`` underflows in float16: NaN weights before)."""
    ph = make_params(dtype)
    pf = {k: nn.Parameter(p.detach().float()) for k, p in ph.items()}
    opt_h, opt_f = make(name, groups(ph), path=path, n_k=N_K), make(name, groups(pf), path=path, n_k=N_K)
    g = torch.Generator().manual_seed(1)
    for t in range(4):
        for k, p in ph.items():
            pf[k].data.copy_(p.detach())      # the float32 step starts from the same (rounded) weights
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(dtype)
            pf[k].grad = p.grad.float()
        opt_h.step()
        opt_f.step()
        assert not opt_h.found_inf
        for k, p in ph.items():
            assert p.dtype == dtype and torch.isfinite(p).all(), (k, t)
            torch.testing.assert_close(p.detach().float(), pf[k].detach(), rtol=torch.finfo(dtype).eps / 2,
                                       atol=0, msg=lambda m: f"{name} step {t} tensor {k}: {m}")
            for key, v in opt_h.state[p].items():
                assert v.dtype in (torch.float32, torch.int64), (key, v.dtype)
                assert torch.equal(v, opt_f.state[pf[k]][key]), (k, key)
    ran_compiled(path, type(opt_h))


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_half_precision_state_dict_keeps_float32_state(dtype):
    """``torch.optim`` casts loaded state to the parameter dtype; half-precision parameters
    keep their float32 state through a save / load instead."""
    a = make_params(dtype)
    opt_a = LAMB(groups(a), lr=0.05)
    for p in a.values():
        p.grad = torch.randn(p.shape).to(dtype) * 1e-3
    opt_a.step()
    b = {k: nn.Parameter(p.detach().clone()) for k, p in a.items()}
    opt_b = LAMB(groups(b), lr=0.05)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for k in a:
        for key, v in opt_a.state[a[k]].items():
            assert v.dtype != dtype and torch.equal(opt_b.state[b[k]][key], v), (k, key)


# ------------------------------------------------------------------------------ complex
@pytest.mark.parametrize("name,path", with_paths(names()))
def test_complex_equals_view_as_real(name, path, kernel_sized):
    """A complex parameter is updated exactly as the real tensor ``view_as_real(p)`` would
    be (as ``torch.optim`` does; LAMB's ``v`` accumulated ``g * g``, not ``|g|^2``, before)."""
    pc = make_params(torch.complex64)
    pr = {k: nn.Parameter(torch.view_as_real(p.detach()).clone()) for k, p in pc.items()}
    opt_c, opt_r = make(name, groups(pc), path=path, n_k=N_K), make(name, groups(pr), path=path, n_k=N_K)
    g = torch.Generator().manual_seed(1)
    for t in range(4):
        for k, p in pc.items():
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.complex64)
            pr[k].grad = torch.view_as_real(p.grad).clone()
        opt_c.step()
        opt_r.step()
        for k, p in pc.items():
            assert p.dtype == torch.complex64
            torch.testing.assert_close(torch.view_as_real(p.detach()), pr[k].detach(), rtol=0, atol=0,
                                       msg=lambda m: f"{name} step {t} tensor {k}: {m}")
    ran_compiled(path, type(opt_c))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_unsupported_dtypes_are_refused():
    with pytest.raises(TypeError, match="complex32"):
        LARS([torch.zeros(3, dtype=torch.complex32)], lr=0.1)
    with pytest.raises(TypeError, match="int64"):
        LAMB([torch.zeros(3, dtype=torch.int64)], lr=0.1)
    opt = LARS([nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(TypeError, match="complex32"):
        opt.add_param_group(dict(params=[torch.zeros(2, dtype=torch.complex32)]))


def test_persample_tracker_refuses_complex_parameters():
    """The per-sample rules square real numbers; complex layers are refused, naming them."""
    model = nn.Sequential(nn.Linear(4, 3, dtype=torch.complex64), nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"'0\.weight' is complex"):
        PerSampleGradNorms(model)
    PerSampleGradNorms(model, params=[model[1].weight]).remove()  # untracked complex layers are fine


# ------------------------------------------------------------------------------ extreme magnitudes
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float32, 1e-30), (torch.float64, 1e200),
                                         (torch.float64, 1e-200)], ids=["f32-1e20", "f32-1e-30", "f64-1e200",
                                                                        "f64-1e-200"])
@pytest.mark.parametrize("name,path", with_paths(names(rule=True)))
def test_norms_neither_overflow_nor_underflow(name, path, dtype, scale, kernel_sized):
    """Finite gradients far from 1 give the exact step (docs/algorithms.md, section 8): a
    float32 gradient of 1e20 (its squares overflow float32) or 1e-30 (they underflow), a
    float64 one of 1e200 or 1e-200, against the float64 reference whose norms are scaled.
    Before, the first was skipped with found_inf and the second took the zero-norm rule.
    Known failures: the table's ``known`` (LAMB, compiled, float32 1e20)."""
    cls, algo, kw = TABLE[name].cls, TABLE[name].rule, TABLE[name].kw
    kw = dict(kw)
    lr = kw.pop("lr")
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(64, 32, generator=gen, dtype=torch.float64).to(dtype))
    opt = cls([p], lr=lr, path=path, **kw)
    ref = Reference(algo, {"w": p.detach()}, {"w": (True, 0.0)}, **kw)
    for _ in range(2):
        p.grad = (scale * torch.randn(64, 32, generator=gen, dtype=torch.float64)).to(dtype)
        ref.step({"w": p.grad}, lr)
        opt.step()
        assert not bool(opt.found_inf)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(p.detach().double(), ref.w["w"], **tol, msg=lambda m: f"{name} {path}: {m}")
