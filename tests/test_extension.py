"""The public extension API (docs/optimizers.md, "Adding an optimizer"), exercised by the worked
example outside the package, examples/custom_rule.py: its rule against an independent float64
formula on every path a user's class runs on, its state_dict round trip, its registry entry;
and the API itself: ``largebatch.optim`` exports it, the docs never send users to a private
module."""

from __future__ import annotations

import copy
import glob
import importlib.util
import inspect
import os
import re

import pytest
import torch
from torch import nn

import largebatch.optim as optim
from largebatch.cli import main
from largebatch.optim import _compiled, param_groups, registry

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "custom_rule.py")


@pytest.fixture(scope="module")
def example():
    """examples/custom_rule.py imported from its file (it registers ``normsgd``: removed after)."""
    spec = importlib.util.spec_from_file_location("custom_rule", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    registry.OPTIMIZERS.pop("normsgd", None)


# ---------------------------------------------------------------- the reference formula
def reference_step(w, g, m, lr, adapt, wd, momentum, eta, eps):
    """One step of NormSGD in plain float64, written from the example's docstring; returns
    ``(w, m, trust)``. ``g`` of ``None``: a non-finite gradient, the tensor is left untouched."""
    if g is None:
        return w, m, None
    d = g + wd * w
    den = float(g.norm()) + wd * float(w.norm()) + eps
    trust = eta / den if adapt and den > 0 else 1.0
    m = momentum * m + trust * d
    return w - lr * m, m, trust


#: constructor keywords and the adapted groups' weight decay; the second reaches the zero-norm
#: rule (eps = 0, no weight decay, a zero gradient: trust 1)
CASES = [dict(momentum=0.9, eta=0.1, eps=1e-8, wd=1e-2), dict(momentum=0.0, eta=1.0, eps=0.0, wd=0.0)]
PATHS = ["per_tensor", "foreach", "compiled"]   # "native" holds the package's own C++ rules only
#: step -> (tensor, what its gradient becomes): non-finite steps leave it untouched; the zero
#: gradient meets the zero-norm rule
EDITS = {1: ("3.weight", 0.0), 3: ("3.weight", float("inf")), 4: ("0.weight", float("nan"))}


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def _backward(model, dtype, k):
    model.zero_grad()
    model(torch.randn(32, 12, dtype=dtype, generator=torch.Generator().manual_seed(k))).square().mean().backward()


# float64 at 1e-12: per-tensor scalars built with `select` keep the parameters' dtype
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_example_matches_its_reference(example, case, path, dtype, tol, kernel_sized):
    if path == "compiled" and case is not CASES[0]:
        pytest.skip("one compiled configuration: each compile costs seconds")
    kw = {k: v for k, v in case.items() if k != "wd"}
    model = _model(dtype)
    opt = example.NormSGD(param_groups(model, weight_decay=case["wd"]), lr=0.5, path=path, **kw)
    opt.track_stats = True
    names = {id(p): n for n, p in model.named_parameters()}
    where = {names[id(p)]: (g["adapt"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert {a for a, _ in where.values()} == {True, False}   # adapted and excluded tensors
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    mom = {n: torch.zeros_like(w) for n, w in ref.items()}
    for k in range(6):
        lr = 0.5 * (1 - 0.1 * k)                               # a schedule: lr is read every step
        for group in opt.param_groups:
            group["lr"] = lr
        _backward(model, dtype, k)
        edited, value = EDITS.get(k, (None, None))
        if edited:
            grad = dict(model.named_parameters())[edited].grad
            grad.zero_() if value == 0 else grad.view(-1)[0].fill_(value)
        trust = {}
        for n, p in model.named_parameters():
            adapt, wd = where[n]
            g = None if n == edited and value != 0 else p.grad.double()
            ref[n], mom[n], trust[n] = reference_step(ref[n], g, mom[n], lr, adapt, wd, **kw)
        opt.step()
        assert bool(opt.last_found_inf) == (edited is not None and value != 0)
        stats = opt.layer_stats()
        for i, p in enumerate(stats["params"]):
            n = names[id(p)]
            torch.testing.assert_close(p.detach().double(), ref[n], rtol=tol, atol=tol, msg=f"step {k}, {n}")
            torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), mom[n], rtol=tol, atol=tol)
            if trust[n] is not None:                           # the diagnostics report the trust applied
                assert abs(float(stats["trust"][i]) - trust[n]) <= 1e-5 * (1 + trust[n]), (k, n)
    if path == "compiled":
        assert example.NormSGD in _compiled._KERNELS   # it really ran fused, not on a fallback


@pytest.mark.parametrize("path", ["per_tensor", "foreach"])
def test_example_state_dict_round_trip(example, path):
    """Saved after 3 steps and loaded into a fresh optimizer, it continues exactly as the
    uninterrupted run."""
    dtype = torch.float64
    a = _model(dtype)
    opt_a = example.NormSGD(param_groups(a, weight_decay=1e-2), lr=0.3, path=path)
    for k in range(3):
        _backward(a, dtype, k)
        opt_a.step()
    saved = copy.deepcopy(opt_a.state_dict())
    b = copy.deepcopy(a)
    opt_b = example.NormSGD(param_groups(b, weight_decay=1e-2), lr=0.3, path=path)
    opt_b.load_state_dict(saved)
    assert set(opt_b.state_dict()["state"][0]) == {"momentum_buffer"}
    for k in range(3, 6):
        for model, opt in ((a, opt_a), (b, opt_b)):
            _backward(model, dtype, k)
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)
        torch.testing.assert_close(opt_b.state[pb]["momentum_buffer"], opt_a.state[pa]["momentum_buffer"],
                                   rtol=0, atol=0)


def test_example_is_registered_and_trains(example, tmp_path, capsys):
    """Importing the example is all ``largebatch train --optimizer normsgd`` needs; its own
    validation answers through the command line, naming the field."""
    assert registry.get("normsgd") is example.INFO and example.INFO.cls is example.NormSGD
    assert example.INFO.cpu_path == "compiled"
    rc = main(["train", "--optimizer", "normsgd", "--optimizer-path", "foreach", "--dataset", "digits",
               "--epochs", "2", "--batch-size", "256", "--lr", "0.1", "--eta", "1.0", "--mlp-width", "64",
               "--out-dir", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and float(rows[-1].split(",")[6]) > 0.6   # header + 2 epochs; test_acc learned
    assert main(["train", "--optimizer", "normsgd", "--momentum", "1.0", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "momentum: invalid momentum=1.0" in capsys.readouterr().err


# ---------------------------------------------------------------- the API itself
def test_all_lists_exactly_the_public_names():
    public = {n for n, v in vars(optim).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert set(optim.__all__) == public and len(optim.__all__) == len(set(optim.__all__))
    for name in ("LayerwiseOptimizer", "select", "zero_norm_safe_ratio", "compute_dtype", "state_dtype",
                 "HyperparameterError", "check_nonneg", "check_unit", "timm_register", "timm_groups"):
        assert name in optim.__all__, name


def test_example_and_docs_use_only_the_public_api():
    """No user-facing text (README, docs, examples) sends users to the private modules the
    extension API lives in; the route's own page and the examples name no private module at all.
    (docs/performance.md names ``largebatch.optim._compiled`` for the compiled path's
    kernel-variant knob: a tuning switch, not the extension API.)"""
    any_private = re.compile(r"largebatch(\.\w+)*\._\w+")
    extension_home = re.compile(r"largebatch(\.optim\._engine|\._validation|\.optim\._paths)\b")
    route = [os.path.join(ROOT, "docs", "optimizers.md"), *glob.glob(os.path.join(ROOT, "examples", "*.py"))]
    for path in [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md")), *route]:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        hits = [m.group(0) for m in (any_private if path in route else extension_home).finditer(text)]
        assert not hits, f"{os.path.relpath(path, ROOT)} names private modules: {sorted(set(hits))}"
