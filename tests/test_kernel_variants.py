"""Kernel variants of the compiled path and their first-use choice.

* Every variant (``_compiled.supported_variants()`` on this CPU), forced, for every compilable
  optimizer: equal to the per-tensor reference path (float32: as ``test_fast_paths.py``;
  float64: to 1e-12 of the float64 reference, as ``test_precision.py`` -- float64 tensors
  accumulate in float64 whatever the variant), at 1 and 2 threads, with a GradScaler.
* The chunked float32 norm (variant ``f32``) is accurate: relative error <= 1e-6 of the
  float64 norm on 2.4M-element tensors of mixed magnitudes.
* The choice: the fastest variant by a fake timer wins, the user's tensors are not written
  while timing, the choice is written to the cache file atomically, read back by the next
  process, keyed by machine, threads, class and dtype; a corrupt file is ignored and
  rewritten; ``LARGEBATCH_KERNEL_VARIANT`` / ``set_kernel_variant`` force a variant and
  ``LARGEBATCH_NO_AUTOTUNE=1`` keeps ``f64``.

Tensors of the compiled kernel hold at least 8192 elements here (``kernel_sized``), so that
the chunked float32 norm runs (smaller tensors take a float64 norm in every variant).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cases import OPTIMIZERS
from largebatch.optim import CLARS, LAMB, LARS, _compiled, param_groups
from test_fast_paths import assert_same_run
from test_precision import inf_in_fc_at_step_2, step_beside_reference

CASES = {name: (cls, kw) for name, (cls, _, kw) in OPTIMIZERS.items()}
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
def fresh_choice(monkeypatch, tmp_path):
    """No choice made yet, nothing forced, the cache in a fresh folder (not ~/.cache)."""
    monkeypatch.setenv("LARGEBATCH_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("LARGEBATCH_KERNEL_VARIANT", "LARGEBATCH_NO_AUTOTUNE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_compiled, "_CHOSEN", {})
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
    algo = OPTIMIZERS[name][1]
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


# ------------------------------------------------------------------------------ the choice
def test_time_variants_takes_the_interleaved_minimum(monkeypatch):
    """A fake clock: each call advances it by its variant's cost (plus noise in one round)."""
    now = [0.0]
    monkeypatch.setattr(_compiled, "_clock", lambda: now[0])
    order = []
    cost = {"f64": 3.0, "f32": 2.0, "f64-256": 4.0}
    noise = {(1, "f32"): 5.0}
    rounds = {v: 0 for v in cost}

    def call(v):
        def f():
            order.append(v)
            now[0] += cost[v] + noise.get((rounds[v], v), 0.0)
            rounds[v] += 1
        return f

    best = _compiled._time_variants({v: call(v) for v in cost}, rounds=3)
    assert best == {"f64": 3.0, "f32": 2.0, "f64-256": 4.0}
    assert order == list(cost) * 4                    # one untimed call each, then interleaved rounds
    assert _compiled._pick(best) == "f32"
    assert _compiled._pick({"f64": 1.0, "f32": 0.99}) == "f64"        # within the margin: the default
    assert _compiled._pick({"f64": 1.0, "f32-256": 0.5, "f32": 0.7}) == "f32-256"


def test_bucket_estimate_weighs_fixed_costs(monkeypatch):
    """Two lengths when the median tensor is under half the largest; a line through them."""
    monkeypatch.setattr(_compiled, "TUNE_MAX_NUMEL", 1 << 22)
    assert _compiled._tune_lengths([2_359_296]) == [2_359_296]
    assert _compiled._tune_lengths([40_000, 147_456, 147_456, 2_359_296]) == [2_359_296, 147_456]
    assert _compiled._tune_lengths([10_000, 20_000, 9_000_000]) == [1 << 22, 20_000]
    assert _compiled._tune_lengths([20_000, 30_000]) == [30_000]
    assert _compiled._tune_lengths([16_384, 16_384, 30_000]) == [30_000]
    # "a": 10 us per call + 1 ns per element; "b": 50 us per call + 0.9 ns per element
    times = {("a", 10**6): 1010e-6, ("a", 10**5): 110e-6, ("b", 10**6): 950e-6, ("b", 10**5): 140e-6}
    few_big = _compiled._bucket_times(times, [10**6] * 4)
    many_small = _compiled._bucket_times(times, [10**6] + [10**5] * 20)
    assert few_big["b"] < few_big["a"] and many_small["a"] < many_small["b"]
    assert _compiled._pick(few_big) == "b" and _compiled._pick(many_small) == "a"
    one = _compiled._bucket_times({("a", 1000): 1.0}, [1000, 500])
    assert one == {"a": 1.5}


class FakeTimer:
    """Replaces ``_time_variants``: runs every call (real kernels on the scratch tensors), checks
    that the user's tensors are untouched, and reports made-up times (``winner`` fastest)."""

    def __init__(self, monkeypatch, winner, watch):
        self.winner, self.watch, self.calls = winner, watch, []
        monkeypatch.setattr(_compiled, "_time_variants", self)

    def __call__(self, calls, rounds):
        before = [t.detach().clone() for t in self.watch()]
        for call in calls.values():
            call()
            call()
        for a, b in zip(before, self.watch()):
            assert torch.equal(a, b), "timing wrote the user's tensors"
        self.calls.append(list(dict.fromkeys(v for v, _ in calls)))     # keys: (variant, length)
        return {(v, n): (1.0 if v == self.winner else 2.0 + i) * n for i, (v, n) in enumerate(calls)}


def lars_run(steps=2, variant=None, opt_box=None):
    ps = make_params()
    opt = LARS(groups(ps), lr=0.5, momentum=0.9, eta=0.02, path="compiled")
    if opt_box is not None:
        opt_box.append(opt)
    g = torch.Generator().manual_seed(1)
    with _compiled.kernel_variant(variant):
        for _ in range(steps):
            for p in ps.values():
                p.grad = torch.randn(p.shape, generator=g).to(memory_format=torch.contiguous_format)
            opt.step()
    return ps, opt


def user_tensors(opt):
    """The weights, gradients and state of ``opt``: what timing must not write."""
    ps = [p for grp in opt.param_groups for p in grp["params"]]
    return ps + [p.grad for p in ps if p.grad is not None] + [v for st in opt.state.values() for v in st.values()]


def test_first_use_measures_picks_fastest_and_caches(monkeypatch, kernel_sized):
    monkeypatch.setattr(_compiled, "TUNE_MIN_NUMEL", 64)
    winner = VARIANTS[-1]                     # "f32-256" on AVX-512, "f32" elsewhere
    box = []
    timer = FakeTimer(monkeypatch, winner, lambda: user_tensors(box[0]))
    ps, opt = lars_run(opt_box=box)
    # measured once: the adapted group's bucket decided, the excluded group's kernel tensor
    # (8205 elements) took the class's choice
    assert timer.calls == [list(VARIANTS)]
    key = _compiled._choice_key(LARS, None, torch.float32)
    choice = _compiled.kernel_choices()[key]
    assert choice["variant"] == winner and choice["source"] == "measured"
    assert set(choice["times_us"]) == set(VARIANTS)
    ran(LARS, winner)
    # the steps equal a run with the winner forced (timing changed nothing of the user's)
    ps_f, _ = lars_run(variant=winner)
    for k in ps:
        assert torch.equal(ps[k], ps_f[k]), k
    # the cache file: valid JSON, no temporary file left, keyed by machine, threads, class, dtype
    path = _compiled.cache_path()
    assert os.path.dirname(path) == os.environ["LARGEBATCH_CACHE_DIR"]
    assert os.listdir(os.path.dirname(path)) == ["kernels.json"]
    data = json.load(open(path))
    assert data["format"] == 1 and data["choices"][key]["variant"] == winner
    for part in (_compiled.cpu_model(), torch.backends.cpu.get_cpu_capability(), torch.__version__,
                 f"{torch.get_num_threads()} threads", "largebatch.optim.lars.LARS", "update", "torch.float32"):
        assert part in key, part

    # a new process: the choice comes from the file, nothing is measured
    monkeypatch.setattr(_compiled, "_CHOSEN", {})
    timer.calls.clear()
    lars_run(steps=1)
    assert timer.calls == []
    assert _compiled.kernel_choices()[key] == {"variant": winner, "source": "disk",
                                               "times_us": data["choices"][key]["times_us"]}


def test_cache_is_keyed_by_threads_and_class(monkeypatch, kernel_sized):
    monkeypatch.setattr(_compiled, "TUNE_MIN_NUMEL", 64)
    n = torch.get_num_threads()
    keys = set()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            timer = FakeTimer(monkeypatch, "f64", lambda: [])
            lars_run(steps=1)
            assert len(timer.calls) == 1, threads           # another thread count: measured again
            keys.add(_compiled._choice_key(LARS, None, torch.float32))
        finally:
            torch.set_num_threads(n)
    assert len(keys) == 2
    assert _compiled._choice_key(LAMB, None, torch.float32) not in keys
    assert _compiled._choice_key(LARS, None, torch.float64) not in keys
    assert _compiled._choice_key(LARS, "probe", torch.float32) not in keys
    assert set(json.load(open(_compiled.cache_path()))["choices"]) == keys


@pytest.mark.parametrize("corrupt", ['{"format": 1, "choices": {"x": ', "[1, 2]", '{"format": 7, "choices": {}}',
                                     "\x00\xff garbage"])
def test_corrupt_cache_is_ignored_and_rebuilt(corrupt, monkeypatch, kernel_sized):
    monkeypatch.setattr(_compiled, "TUNE_MIN_NUMEL", 64)
    path = _compiled.cache_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(corrupt)
    timer = FakeTimer(monkeypatch, "f32", lambda: [])
    lars_run(steps=1)
    assert len(timer.calls) == 1
    data = json.load(open(path))
    assert [v["variant"] for v in data["choices"].values()] == ["f32"]


def test_cache_entry_with_unknown_variant_is_ignored(monkeypatch, kernel_sized):
    monkeypatch.setattr(_compiled, "TUNE_MIN_NUMEL", 64)
    key = _compiled._choice_key(LARS, None, torch.float32)
    os.makedirs(os.path.dirname(_compiled.cache_path()))
    with open(_compiled.cache_path(), "w") as f:
        json.dump({"format": 1, "choices": {key: {"variant": "f16-1024"}}}, f)
    timer = FakeTimer(monkeypatch, "f64", lambda: [])
    lars_run(steps=1)
    assert len(timer.calls) == 1
    assert _compiled.kernel_choices()[key]["source"] == "measured"


def test_cache_write_is_atomic(monkeypatch):
    """A write that fails half-way leaves the previous file as it was, and no temporary file."""
    _compiled._write_cache("a", {"variant": "f64"})
    path = _compiled.cache_path()
    before = open(path).read()

    def broken_dump(obj, f, **kw):
        f.write('{"format": 1, "choi')
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(json, "dump", broken_dump)
        _compiled._write_cache("b", {"variant": "f32"})   # skipped silently
    assert open(path).read() == before
    assert os.listdir(os.path.dirname(path)) == ["kernels.json"]
    assert set(_compiled._read_cache()) == {"a"}
    _compiled._write_cache("b", {"variant": "f32"})
    assert set(_compiled._read_cache()) == {"a", "b"}


def test_unwritable_cache_is_skipped(monkeypatch, kernel_sized, tmp_path):
    monkeypatch.setattr(_compiled, "TUNE_MIN_NUMEL", 64)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LARGEBATCH_CACHE_DIR", str(tmp_path / "file" / "sub"))   # cannot be created
    timer = FakeTimer(monkeypatch, "f32", lambda: [])
    lars_run(steps=1)
    assert len(timer.calls) == 1
    assert _compiled.kernel_choices()[_compiled._choice_key(LARS, None, torch.float32)]["variant"] == "f32"


def test_small_tensors_and_no_autotune_use_the_default(monkeypatch, kernel_sized):
    timer = FakeTimer(monkeypatch, "f32", lambda: [])
    lars_run(steps=1)                                   # largest tensor < TUNE_MIN_NUMEL: no measurement
    assert timer.calls == [] and _compiled.kernel_choices() == {}
    monkeypatch.setattr(_compiled, "TUNE_MIN_NUMEL", 64)
    monkeypatch.setenv("LARGEBATCH_NO_AUTOTUNE", "1")
    lars_run(steps=1)
    assert timer.calls == [] and _compiled.kernel_choices() == {}
    assert not os.path.exists(_compiled.cache_path())
    ran(LARS, "f64")


def test_distributed_ranks_do_not_measure(monkeypatch, kernel_sized):
    """Replicas must run the same kernel: in a process group nothing is measured or read (a
    cache entry written by a single-process run is ignored); forcing still applies."""
    assert not _compiled._replicated()                 # no process group in this test process
    monkeypatch.setattr(_compiled, "TUNE_MIN_NUMEL", 64)
    os.makedirs(os.path.dirname(_compiled.cache_path()))
    with open(_compiled.cache_path(), "w") as f:
        json.dump({"format": 1, "choices": {_compiled._choice_key(LARS, None, torch.float32): {"variant": "f32"}}}, f)
    monkeypatch.setattr(_compiled, "_replicated", lambda: True)
    timer = FakeTimer(monkeypatch, "f32", lambda: [])
    ps, _ = lars_run(steps=2)
    assert timer.calls == [] and _compiled.kernel_choices() == {}
    ps_f, _ = lars_run(steps=2, variant="f64")
    for k in ps:
        assert torch.equal(ps[k], ps_f[k]), k
    monkeypatch.setenv("LARGEBATCH_KERNEL_VARIANT", "f32")
    assert _compiled._choose(LARS, None, torch.ones(1), 1 << 20, None) == "f32"


@pytest.mark.parametrize("variant", ["f32", VARIANTS[-1]])
def test_forced_by_env_and_api(variant, monkeypatch, kernel_sized):
    monkeypatch.setattr(_compiled, "TUNE_MIN_NUMEL", 64)
    timer = FakeTimer(monkeypatch, "f64", lambda: [])
    monkeypatch.setenv("LARGEBATCH_KERNEL_VARIANT", variant)
    assert _compiled.forced_variant() == variant
    ps, _ = lars_run(steps=2)
    assert timer.calls == [] and _compiled.kernel_choices() == {}       # forced: nothing measured
    monkeypatch.delenv("LARGEBATCH_KERNEL_VARIANT")
    ps_api, _ = lars_run(steps=2, variant=variant)                      # kernel_variant() context
    for k in ps:
        assert torch.equal(ps[k], ps_api[k]), k
    ran(LARS, variant)
    _compiled.set_kernel_variant("f64")
    monkeypatch.setenv("LARGEBATCH_KERNEL_VARIANT", variant)
    assert _compiled.forced_variant() == "f64"                           # the API wins over the env
    _compiled.set_kernel_variant(None)
    assert _compiled.forced_variant() == variant
    monkeypatch.setenv("LARGEBATCH_KERNEL_VARIANT", "fast")
    with pytest.raises(ValueError, match="LARGEBATCH_KERNEL_VARIANT"):
        lars_run(steps=1)


def test_variant_failing_to_compile_is_not_a_candidate(monkeypatch, kernel_sized):
    monkeypatch.setattr(_compiled, "TUNE_MIN_NUMEL", 64)
    real = _compiled._get_kernel

    def get(cls, kind, variant):
        if variant == "f32":
            def k(*args):
                raise torch._inductor.exc.CppCompileError(["g++"], "unsupported")
            return k, None
        return real(cls, kind, variant)

    monkeypatch.setattr(_compiled, "_get_kernel", get)
    timer = FakeTimer(monkeypatch, "f64", lambda: [])
    lars_run(steps=1)
    assert timer.calls == [[v for v in VARIANTS if v != "f32"]] and _compiled.available()


def test_scratch_copies_are_fresh_and_bounded(monkeypatch):
    monkeypatch.setattr(_compiled, "TUNE_MAX_NUMEL", 100)
    p, g = torch.randn(300), torch.randn(300)
    st = {"m": torch.randn(300), "step": torch.tensor(3)}
    sp, sg, sst = _compiled._scratch(p, g, st)
    assert sp.shape == sg.shape == sst["m"].shape == (100,) and sst["step"].shape == ()
    for a, b in ((sp, p), (sg, g), (sst["m"], st["m"]), (sst["step"], st["step"])):
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        assert torch.equal(a, b.reshape(-1)[:a.numel()].reshape(a.shape))
