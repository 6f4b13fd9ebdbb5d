"""The ``torch.optim`` contract, generically (in the spirit of PyTorch's ``TestOptimRenewed``):
every optimizer x configuration x path of the table in ``cases.py`` (``TABLE``: each row's
``generic`` configurations, on its paths but the compiled one) goes through
the same tests: state_dict round trips that continue equal to an uninterrupted run (renumbered
and name-keyed state as ``torch.distributed.checkpoint`` passes it, ``step`` as a number or a
float tensor), deepcopy / pickle / ``torch.save(opt)``, load-state-dict hooks, extra group
keys, closures, ``add_param_group``, ``None`` / zero gradients, complex parameters,
schedulers, ``maximize`` / ``foreach`` / ``differentiable``, and a state of another shape,
dtype or class refused before any kernel reads it (in a subprocess: a memory error there
would be a crash, not an exception)."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from cases import TABLE, make, names
from largebatch.optim import param_groups

pytestmark = pytest.mark.usefixtures("one_thread", "kernel_sized")

#: the paths of the generic tests; the compiled one only for the ``spot_check`` rows' state-dict
#: round trip (each compile costs seconds)
GENERIC_PATHS = ("per_tensor", "foreach", "native")
CASES = [(name, i, path) for name, row in TABLE.items() for i in range(len(row.generic))
         for path in GENERIC_PATHS if path in row.paths]
IDS = [f"{n}-{i}-{p}" for n, i, p in CASES]
#: one configuration per optimizer on every path (the tests that do not depend on the configuration)
FIRST = [(n, i, p) for n, i, p in CASES if i == 0]
FIRST_IDS = [f"{n}-{p}" for n, _, p in FIRST]


def model_of(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def setup(name, i, path, seed=0, **kw):
    model = model_of(seed)
    cfg = {**TABLE[name].generic[i], **kw}
    opt = make(name, param_groups(model, weight_decay=cfg.pop("weight_decay", 0.0)), model, path=path, **cfg)
    return model, opt


def batch(t):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(5, 3, generator=g)


def step(model, opt, t):
    x = batch(t)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    return opt.step(closure)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def uninterrupted(name, i, path, steps=5):
    model, opt = setup(name, i, path)
    for t in range(steps):
        step(model, opt, t)
    return weights(model)


def resumed(name, i, path, transform, steps=5, cut=3):
    """Train ``cut`` steps, pass the optimizer's state_dict through ``transform``, load it into a
    fresh optimizer over a copy of the model, train the rest."""
    model, opt = setup(name, i, path)
    for t in range(cut):
        step(model, opt, t)
    sd = transform(copy.deepcopy(opt.state_dict()), model)
    model2, opt2 = setup(name, i, path, seed=1)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    for t in range(cut, steps):
        step(model2, opt2, t)
    return weights(model2)


# ----------------------------------------------------------------------------- state_dict
def _saved(sd, model):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _renumbered(sd, model):
    """Other integer ids, state entries in another order: loading maps by the groups' order."""
    ids = {old: 100 - k for k, old in enumerate(i for g in sd["param_groups"] for i in g["params"])}
    for g in sd["param_groups"]:
        g["params"] = [ids[i] for i in g["params"]]
    sd["state"] = {ids[i]: st for i, st in reversed(list(sd["state"].items()))}
    return sd


def _name_keyed(sd, model):
    """As ``torch.distributed.checkpoint.set_optimizer_state_dict`` passes it: keyed by name."""
    names = [n for n, _ in model.named_parameters()]
    order = [p for g in param_groups(model) for p in g["params"]]
    by_param = {id(p): n for n, p in model.named_parameters()}
    ids = {i: by_param[id(p)] for i, p in enumerate(order)}
    assert sorted(ids.values()) == sorted(names)
    for g in sd["param_groups"]:
        g["params"] = [ids[i] for i in g["params"]]
    sd["state"] = {ids[i]: st for i, st in sd["state"].items()}
    return sd


def _python_steps(sd, model):
    """``step`` counters as Python numbers (torch's own tests, old checkpoints)."""
    for st in sd["state"].values():
        for k, v in st.items():
            if v.dim() == 0:
                st[k] = int(v)
    return sd


def _float_steps(sd, model):
    """Counters as float32 tensors (checkpoints of earlier versions)."""
    for st in sd["state"].values():
        for k, v in st.items():
            if v.dim() == 0:
                st[k] = v.float()
    return sd


@pytest.mark.parametrize("name,i,path", CASES, ids=IDS)
def test_state_dict_round_trip_continues_equal(name, i, path):
    want = uninterrupted(name, i, path)
    assert_same(resumed(name, i, path, _saved), want)


@pytest.mark.parametrize("transform", [_renumbered, _name_keyed, _python_steps, _float_steps],
                         ids=["renumbered", "name_keyed", "int_step", "float_step"])
@pytest.mark.parametrize("name,i,path", FIRST, ids=FIRST_IDS)
def test_state_dict_variants_load_and_continue_equal(name, i, path, transform):
    assert_same(resumed(name, i, path, transform), uninterrupted(name, i, path))


@pytest.mark.parametrize("name", names(path="compiled", where=lambda r: r.spot_check))
def test_state_dict_round_trip_compiled_path(name):
    assert_same(resumed(name, 0, "compiled", _saved, steps=3, cut=2), uninterrupted(name, 0, "compiled", steps=3))


@pytest.mark.parametrize("name", TABLE)
def test_groups_with_their_own_hyperparameters_keep_them_through_state_dict(name):
    model, opt = setup(name, 0, "foreach")
    opt.param_groups[1]["lr"] = 0.125
    opt.param_groups[0]["weight_decay"] = 0.5
    step(model, opt, 0)
    model2, opt2 = setup(name, 0, "foreach")
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[1]["lr"] == 0.125 and opt2.param_groups[0]["weight_decay"] == 0.5
    assert opt2.param_groups[0]["params"] == list(opt2.param_groups[0]["params"])


@pytest.mark.parametrize("name", TABLE)
def test_a_group_of_another_class_is_refused_before_anything_is_loaded(name):
    """An empty state (the other optimizer never stepped) whose groups lack this class's
    hyper-parameters: refused at load time, not with a KeyError at the next step."""
    model, opt = setup(name, 0, "foreach")
    never_stepped = "LAMB" if name != "LAMB" else "LARS"   # e.g. a LAMB that never stepped into LARS
    for other in (torch.optim.SGD(param_groups(model), lr=0.1),
                  torch.optim.Adam(param_groups(model), lr=0.1),
                  make(never_stepped, param_groups(model), model)):
        before = copy.deepcopy(opt.param_groups[0])
        with pytest.raises(ValueError, match="lacks .* another optimizer class"):
            opt.load_state_dict(other.state_dict())
        assert opt.param_groups[0].keys() == before.keys()
    step(model, opt, 0)


@pytest.mark.parametrize("name", TABLE)
def test_state_of_another_shape_or_kind_is_refused_at_load(name):
    model, opt = setup(name, 0, "foreach")
    step(model, opt, 0)
    sd = opt.state_dict()
    full = [k for k, v in sd["state"][0].items() if v.dim() > 0]
    if full:
        bad = copy.deepcopy(sd)
        bad["state"][0][full[0]] = torch.zeros(7)
        with pytest.raises(ValueError, match=rf"parameter 0 .*'{full[0]}' is a torch.float32 tensor of shape \(7,\)"):
            opt.load_state_dict(bad)
        bad["state"][0][full[0]] = torch.zeros(sd["state"][0][full[0]].shape, dtype=torch.int64)
        with pytest.raises(ValueError, match="expected a floating tensor"):
            opt.load_state_dict(bad)
    counters = [k for k, v in sd["state"][0].items() if v.dim() == 0]
    if counters:
        bad = copy.deepcopy(sd)
        bad["state"][0][counters[0]] = torch.zeros(3)
        with pytest.raises(ValueError, match="expected a number or a one-element tensor"):
            opt.load_state_dict(bad)


# ----------------------------------------------------------------------------- copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch_save"])
@pytest.mark.parametrize("name,i,path", FIRST, ids=FIRST_IDS)
def test_copies_step_as_the_original(name, i, path, how):
    """``copy.deepcopy``, ``pickle`` and ``torch.save(opt)`` keep the instance's settings
    (``path``, ``track_stats``, CLARS's tracker): the copy steps as the original does."""
    model, opt = setup(name, i, path)
    opt.track_stats = True
    step(model, opt, 0)
    pair = (model, opt)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy(pair)
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps(pair))
    else:
        buf = io.BytesIO()
        torch.save(pair, buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.path == path and opt2.track_stats
    for t in (1, 2):
        step(model, opt, t)
        step(model2, opt2, t)
    assert_same(weights(model2), weights(model))
    assert opt2.layer_stats()["trust"].shape == opt.layer_stats()["trust"].shape


# ----------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("name", TABLE)
def test_load_state_dict_hooks_run_first_and_their_result_is_used(name):
    """Pre-hooks run in order on the previous one's result, before any check (a hook that
    renames a legacy key is what makes the dict loadable); post-hooks run after the load."""
    model, opt = setup(name, 0, "foreach")
    step(model, opt, 0)
    sd = opt.state_dict()
    legacy = copy.deepcopy(sd)
    legacy["param_groups"][0]["learning_rate"] = legacy["param_groups"][0].pop("lr")
    calls = []

    def rename(o, d):
        calls.append("rename")
        d = dict(d)
        d["param_groups"] = [dict(g) for g in d["param_groups"]]
        g = d["param_groups"][0]
        g["lr"] = g.pop("learning_rate") * 2
        return d

    def second(o, d):
        calls.append(("second", d["param_groups"][0]["lr"]))

    def post(o):
        calls.append(("post", o.param_groups[0]["lr"]))

    opt2 = setup(name, 0, "foreach")[1]
    opt2.register_load_state_dict_pre_hook(rename)
    opt2.register_load_state_dict_pre_hook(second)
    opt2.register_load_state_dict_post_hook(post)
    opt2.load_state_dict(legacy)
    lr = sd["param_groups"][0]["lr"] * 2
    assert calls == ["rename", ("second", lr), ("post", lr)]
    assert opt2.param_groups[0]["lr"] == lr and "learning_rate" not in opt2.param_groups[0]


# ----------------------------------------------------------------------------- groups
@pytest.mark.parametrize("name", TABLE)
def test_unknown_group_keys_are_kept_and_a_misspelling_warns(name):
    model = model_of()
    groups = param_groups(model)
    groups[0]["lr_scale"] = 0.75        # timm's layer decay
    groups[1]["model"] = "anything"     # ZeroRedundancyOptimizer's extra keys
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = make(name, groups, model, path="foreach")
    assert opt.param_groups[0]["lr_scale"] == 0.75 and opt.param_groups[1]["model"] == "anything"
    step(model, opt, 0)
    opt2 = make(name, param_groups(model), model, path="foreach")
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr_scale"] == 0.75
    with pytest.warns(UserWarning, match="did you mean 'weight_decay'"):
        opt2.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "weight_decy": 0.1, "adapt": False})


@pytest.mark.parametrize("name,i,path", FIRST, ids=FIRST_IDS)
def test_add_param_group_trains_the_new_tensors(name, i, path):
    model, opt = setup(name, i, path)
    step(model, opt, 0)
    extra = nn.Linear(2, 2)
    model.append(extra)   # the new layer is part of the model's forward (CLARS measures it)
    opt.add_param_group({"params": list(extra.parameters())})
    before = weights(extra)
    step(model, opt, 1)
    step(model, opt, 2)
    assert all(not torch.equal(a, b) for a, b in zip(before, weights(extra)))
    assert all(p in opt.state for p in extra.parameters())


# ----------------------------------------------------------------------------- closures, gradients
@pytest.mark.parametrize("name,i,path", FIRST, ids=FIRST_IDS)
def test_closure_is_called_once_with_grad_enabled_and_its_loss_returned(name, i, path):
    model, opt = setup(name, i, path)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = model(batch(0)).square().mean()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen == [True] and isinstance(loss, torch.Tensor) and loss.requires_grad


@pytest.mark.parametrize("name,i,path", CASES, ids=IDS)
def test_none_and_zero_gradients(name, i, path):
    """``grad is None``: untouched, no state created; all gradients ``None``: nothing happens;
    zero gradients: a finite step (no NaN from a zero norm), found_inf False."""
    model, opt = setup(name, i, path)
    before = weights(model)
    opt.step()                                   # no gradient anywhere
    assert_same(weights(model), before) and not opt.state
    step(model, opt, 0)
    opt.zero_grad()
    if TABLE[name].persample:   # CLARS needs this step's per-sample statistics
        model(batch(1)).square().mean().backward()
    else:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    model[2].bias.grad = None
    b2 = model[2].bias.detach().clone()
    opt.step()
    assert torch.equal(model[2].bias, b2)
    opt.zero_grad(set_to_none=False)
    if TABLE[name].persample:   # a zero-loss backward: per-sample statistics of zero gradients
        (model(batch(1)) * 0).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not bool(opt.found_inf)


@pytest.mark.parametrize("name,i,path", [c for c in FIRST if not TABLE[c[0]].persample],
                         ids=[f"{n}-{p}" for n, _, p in FIRST if not TABLE[n].persample])
def test_complex_parameter_is_its_real_view(name, i, path):
    """A complex tensor is optimized as ``torch.view_as_real`` of it (``torch.optim``); not
    for a per-sample rule (the per-sample tracker refuses complex parameters: test_precision.py
    runs CLARS's complex case with a stand-in tracker)."""
    torch.manual_seed(0)
    z = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    r = nn.Parameter(torch.view_as_real(z.detach()).clone())
    oz = make(name, [z], path=path, **TABLE[name].generic[i])
    orr = make(name, [r], path=path, **TABLE[name].generic[i])
    for t in range(3):
        gz = torch.randn(4, 3, dtype=torch.complex64)
        z.grad, r.grad = gz, torch.view_as_real(gz).clone()
        oz.step()
        orr.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,i,path", FIRST, ids=FIRST_IDS)
def test_scheduler_changes_lr_as_setting_it_by_hand(name, i, path):
    model, opt = setup(name, i, path)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model2, opt2 = setup(name, i, path)
    for t in range(3):
        step(model, opt, t)
        sched.step()
        step(model2, opt2, t)
        for g in opt2.param_groups:
            g["lr"] = g["lr"] * 0.5
    assert_same(weights(model), weights(model2))
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


# ----------------------------------------------------------------------------- torch.optim's switches
@pytest.mark.parametrize("name,i,path", FIRST, ids=FIRST_IDS)
def test_maximize_equals_the_negated_gradient(name, i, path):
    model, opt = setup(name, i, path, maximize=True)
    model2, opt2 = setup(name, i, path)
    for t in range(3):
        step(model, opt, t)
        opt2.zero_grad()
        (-model2(batch(t)).square().mean()).backward()
        opt2.step()
    assert_same(weights(model), weights(model2))


@pytest.mark.parametrize("name", TABLE)
def test_foreach_maps_to_a_path_and_differentiable_is_refused_with_a_reason(name):
    model = model_of()
    assert make(name, param_groups(model), model, foreach=True).path == "foreach"
    assert make(name, param_groups(model), model, foreach=False).path == "per_tensor"
    assert make(name, param_groups(model), model, foreach=None).path is None
    with pytest.raises(ValueError, match="foreach=True contradicts path='native'"):
        make(name, param_groups(model), model, foreach=True, path="native")
    with pytest.raises(ValueError, match="differentiable=True is not supported: the step updates"):
        make(name, param_groups(model), model, differentiable=True)
    make(name, param_groups(model), model, differentiable=False)


# ----------------------------------------------------------------------------- memory safety
_CHILD = textwrap.dedent("""
    import sys, torch
    from cases import TABLE, names
    from largebatch.optim import _compiled
    _compiled.MIN_NUMEL = _compiled.MIN_TOTAL = 64
    torch.set_num_threads(1)
    out = []
    for cls, paths in ((TABLE[n].cls, TABLE[n].paths) for n in names(model_free=True)):
        for path in paths:
            for how in ("load", "assign"):
                if how == "assign" and path == "compiled":
                    continue   # the load case covers it without a compile (seconds per class)
                w = torch.nn.Parameter(torch.randn(96, 32))
                src = torch.nn.Parameter(torch.randn(24, 32))    # a state of another shape
                other = cls([src], lr=0.1, path="per_tensor")
                src.grad = torch.randn_like(src)
                other.step()
                opt = cls([w], lr=0.1, path=path)
                w.grad = torch.randn_like(w)
                try:
                    if how == "load":
                        opt.load_state_dict(other.state_dict())
                    else:
                        opt.step()
                        opt.state[w].update({k: v for k, v in other.state[src].items() if v.dim() > 0})
                    for _ in range(3):
                        opt.step()
                    out.append(f"{cls.__name__} {path} {how}: no error")
                except (ValueError, RuntimeError) as e:
                    out.append(f"{cls.__name__} {path} {how}: {type(e).__name__}: {e}")
    print("\\n".join(out))
    print("DONE")
""")


def test_state_of_another_shape_never_reaches_a_kernel():
    """The native kernel reads state as flat arrays of the parameter's length: a state of
    another length (a checkpoint of another model) must be refused before it runs, on every
    path, at ``load_state_dict`` and when assigned by hand. In a subprocess: an out-of-bounds
    write there aborts the process (``free(): invalid next size``), which pytest could not catch."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0 and "DONE" in res.stdout, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()[:-1]
    paths = [TABLE[n].paths for n in names(model_free=True)]
    assert len(lines) == sum(2 * len(ps) - ("compiled" in ps) for ps in paths)
    for line in lines:
        assert "no error" not in line, line
        if " load: " in line:
            assert "ValueError: state_dict: parameter 0 (param group 0): state" in line, line
            assert "of the parameter's shape (96, 32)" in line, line
        if " native assign: " in line:
            assert "parameter 0: state" in line and "shape (24, 32)" in line and "(96, 32)" in line, line


@pytest.mark.parametrize("name,i,path", FIRST, ids=FIRST_IDS)
def test_the_checkpoint_initialisation_step_creates_state_and_moves_nothing(name, i, path):
    """``torch.distributed.checkpoint`` initialises an optimizer's state before loading into it:
    zero gradients, ``lr = 0``, ``step()`` without a backward (CLARS then has no per-sample
    statistics)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model, opt = setup(name, i, path)
    before, lr = weights(model), opt.param_groups[0]["lr"]
    _init_optim_state(opt)
    assert_same(weights(model), before)
    assert len(opt.state) == len(list(model.parameters()))
    assert opt.param_groups[0]["lr"] == lr
    step(model, opt, 0)
    if TABLE[name].persample:   # at lr > 0 a step without statistics is still refused
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError, match="without per-sample statistics"):
            opt.step()

