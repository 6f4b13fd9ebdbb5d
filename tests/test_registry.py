"""Adding an optimizer by the documented route (docs/optimizers.md, "Adding an optimizer"):
one module (here, a class in this file), one registry entry, one reference formula and one
test-table row; then ``largebatch train`` trains it on digits on every execution path.

Also: the registry is what the config, the docs' table and the compiled path read."""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn

from cases import TABLE
from largebatch.cli import main
from largebatch.optim import _compiled, param_groups, registry
from largebatch.optim import PATHS, LayerwiseOptimizer, check_nonneg, check_unit, select, zero_norm_safe_ratio
from largebatch.train.config import resolve

pytestmark = pytest.mark.usefixtures("one_thread")

#: the paths a user's class runs on: "native" is the C++ kernels of the package's own rules
#: (a class without ``_native_rule`` is refused there, tests/test_native.py)
USER_PATHS = [p for p in PATHS if p != "native"]


# ---------------------------------------------------------------- 1. the module
class TrustAdam(LayerwiseOptimizer):
    """A toy Adam-family rule: ``m, v`` as Adam (no bias correction), ``r = m / (sqrt(v) +
    eps) + wd w``, ``trust = eta ||w|| / ||r||``, ``w -= lr trust r``. State: ``exp_avg``,
    ``exp_avg_sq``. Uses ``div`` and ``sqrt`` on the foreach path (no engine edit)."""

    compilable = True

    def __init__(self, params, lr, betas=(0.9, 0.99), eta=1.0, eps=1e-8, weight_decay=0.0, adapt=True, path=None):
        super().__init__(params, dict(lr=lr, betas=betas, eta=eta, eps=eps, weight_decay=weight_decay,
                                      adapt=adapt), path=path)

    @classmethod
    def _check_hparams(cls, g):
        check_unit("betas[0]", g["betas"][0])
        check_unit("betas[1]", g["betas"][1])
        check_nonneg("eta", g["eta"])
        check_nonneg("eps", g["eps"])

    def _init_state(self, p, group):
        return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def _update(self, group, w, g, st, w_norm, g_norm, fin, P):
        (b1, b2), wd = group["betas"], group["weight_decay"]
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.mul_(P.coef(select(fin, b1, 1.0, g_norm))).add_(g, alpha=1 - b1)
        v.mul_(P.coef(select(fin, b2, 1.0, g_norm))).addcmul_(g, g, value=1 - b2)
        r = m.div(v.sqrt().add_(group["eps"]))
        if wd != 0:
            r.add_(w, alpha=wd)
        trust = zero_norm_safe_ratio(w_norm, P.norm(r), group["eta"]) if group["adapt"] else torch.ones_like(g_norm)
        lr_k = group["lr"] * trust
        w.addcmul_(r, P.coef(torch.where(fin, -lr_k, 0.0)))
        return trust, lr_k


# ---------------------------------------------------------------- 2. the registry entry
TOY = registry.OptimizerInfo("trustadam", TrustAdam, {"betas": "betas", "eta": "eta", "eps": "eps"},
                             "toy: Adam direction, LARS-style trust",
                             demo=(dict(lr=0.05, lr_scaling="none", warmup=0.0),))


@pytest.fixture
def registered():
    registry.register(TOY)
    yield TOY
    registry.OPTIMIZERS.pop(TOY.name)


# ---------------------------------------------------------------- 3. the reference formula
def reference_step(w, g, st, lr, adapt, wd, betas, eta, eps):
    """Plain float64, written from the docstring's rule."""
    b1, b2 = betas
    st["m"] = b1 * st.get("m", torch.zeros_like(w)) + (1 - b1) * g
    st["v"] = b2 * st.get("v", torch.zeros_like(w)) + (1 - b2) * g * g
    r = st["m"] / (torch.sqrt(st["v"]) + eps) + wd * w
    wn, rn = float(w.norm()), float(r.norm())
    trust = eta * wn / rn if adapt and wn > 0 and rn > 0 else 1.0
    return w - lr * trust * r


# ---------------------------------------------------------------- 4. the test-table row
CASES = [dict(betas=(0.9, 0.99), eta=0.5, eps=1e-8), dict(betas=(0.5, 0.9), eta=2.0, eps=1e-3)]


# float64 at 1e-12: per-tensor scalars built with `select` keep the parameters' dtype
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("path", USER_PATHS)
@pytest.mark.parametrize("kw", CASES)
def test_toy_matches_its_reference_on_every_path(kw, path, dtype, tol, kernel_sized):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    opt = TrustAdam(param_groups(model, weight_decay=1e-2), lr=0.05, path=path, **kw)
    names = {id(p): n for n, p in model.named_parameters()}
    where = {names[id(p)]: (g["adapt"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    states = {n: {} for n in ref}
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(32, 12, dtype=dtype)).square().mean().backward()
        for n, p in model.named_parameters():
            adapt, wd = where[n]
            ref[n] = reference_step(ref[n], p.grad.double(), states[n], 0.05, adapt, wd, **kw)
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach().double(), ref[n], rtol=tol, atol=tol)
    if path == "compiled":
        assert TrustAdam in _compiled._KERNELS  # it really ran fused, not on a fallback


# ---------------------------------------------------------------- the harness knows it
def test_largebatch_train_runs_the_toy_on_every_path(registered, kernel_sized, tmp_path, capsys):
    for path in USER_PATHS:
        out = tmp_path / path
        rc = main(["train", "--optimizer", "trustadam", "--optimizer-path", path, "--dataset", "digits",
                   "--epochs", "2", "--batch-size", "256", "--lr", "0.05", "--eta", "0.5", "--betas", "0.9,0.99",
                   "--mlp-width", "64", "--out-dir", str(out), "--no-progress", "--stats-every", "1"])
        assert rc == 0, capsys.readouterr().err
        text = (out / "metrics.csv").read_text().splitlines()
        assert len(text) == 3 and float(text[-1].split(",")[6]) > 0.6  # header + 2 epochs; test_acc learned
        assert "trustadam" in (out / "config.yaml").read_text()
    assert TrustAdam in _compiled._KERNELS
    # its own validation, through config files and flags alike, naming the field
    assert main(["train", "--optimizer", "trustadam", "--eta", "-1", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "eta: invalid eta=-1.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^betas: invalid betas\[1\]=1.0"):
        resolve(overrides={"optimizer": "trustadam", "betas": (0.9, 1.0)})


def test_demo_picks_up_a_registered_optimizer(registered, tmp_path, capsys):
    rc = main(["demo", "--optimizers", "trustadam", "--epochs", "1", "--out-dir", str(tmp_path), "--no-plots"])
    assert rc == 0
    assert re.search(r"^\| trustadam \| 0.05 \|", capsys.readouterr().out, re.M)


# ---------------------------------------------------------------- registry contracts
def test_docs_table_is_the_registry():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "optimizers.md")).read()
    block = doc.split("<!-- registry-table: begin")[1].split("-->", 1)[1].split("<!-- registry-table: end")[0]
    assert block.strip() == registry.markdown_table(), "regenerate with `largebatch optimizers --markdown`"


def test_every_optimizer_class_of_the_package_is_exported():
    """``largebatch.optim.<class>`` for each of the package's registry entries (the docs' table
    names them so), without a list to keep in ``optim/__init__.py``."""
    import largebatch.optim as optim

    ours = [i.cls for i in registry.OPTIMIZERS.values() if i.cls.__module__.startswith("largebatch.")]
    assert {c.__name__ for c in ours} >= {"LARS", "LAMB", "TVLARS", "LALC", "CLARS", "PaperLAMB", "PaperLARS"}
    for cls in ours:
        assert getattr(optim, cls.__name__) is cls and cls.__name__ in optim.__all__, cls.__name__


def test_config_accepts_exactly_what_the_class_accepts():
    for name, info in registry.OPTIMIZERS.items():
        for fld, arg in info.args.items():
            if fld in ("momentum", "tvlars_alpha"):
                bad = {"momentum": 1.0, "tvlars_alpha": -1.5}[fld]
                if name == "sgd":
                    continue  # torch.optim.SGD accepts any momentum >= 0
                with pytest.raises(ValueError, match=rf"^{fld}:"):
                    resolve(overrides={"optimizer": name, fld: bad})
                with pytest.raises(ValueError, match=arg):
                    info.cls([nn.Parameter(torch.zeros(2, 2))], lr=0.1, **{arg: bad})
    # values the old harness refused but the class accepts are accepted now (one source of truth)
    cfg = resolve(overrides={"optimizer": "tvlars", "tvlars_alpha": -0.5, "eta": 0.0})
    assert cfg.tvlars_alpha == -0.5 and cfg.eta == 0.0


def test_compiled_path_is_declared_per_class():
    class Sub(registry.OPTIMIZERS["lars"].cls):  # inherits the rule, not the declaration
        pass

    p = [nn.Parameter(torch.ones(3))]
    assert Sub(p, lr=0.1)._path_for(torch.device("cpu")) == "foreach"
    with pytest.raises(ValueError, match="compilable"):
        Sub(p, lr=0.1, path="compiled")
    with pytest.raises(ValueError, match="^optimizer_path:"):
        resolve(overrides={"optimizer": "sgd", "optimizer_path": "foreach"})
    compiled = {i.cls for i in registry.OPTIMIZERS.values() if i.compiled and i.cls.__module__.startswith("largebatch.")}
    assert compiled == {r.cls for r in TABLE.values() if "compiled" in r.paths}


def test_every_registered_layerwise_optimizer_has_a_test_table_row():
    """The package's optimizers are the rows of tests/cases.py: each is tested by every module
    that reads the table (a registry entry without a row would go untested)."""
    package = {i.cls for i in registry.OPTIMIZERS.values() if i.layerwise and i.cls.__module__.startswith("largebatch.")}
    assert package == {r.cls for r in TABLE.values()}
