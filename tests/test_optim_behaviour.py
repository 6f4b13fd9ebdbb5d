"""torch.optim contract: state_dict, closures, schedulers, GradScaler, non-finite gradients,
bad input, and what is never touched."""

import copy
import io
import pytest
import torch
from torch import nn

from cases import EAGER_PATHS as PATHS
from cases import TABLE, make, names
from largebatch.optim import LALC, LAMB, LARS, TVLARS, param_groups

#: the rows of the table that need no model
ALL = {name: (lambda ps, _n=name, **k: make(_n, ps, **k)) for name in names(model_free=True)}


def make_model():
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))


def train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(10, 6, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_is_bitwise(name, path):
    torch.manual_seed(0)
    a = make_model()
    b = copy.deepcopy(a)
    opt_a = ALL[name](param_groups(a, weight_decay=1e-3), path=path)
    train(a, opt_a, 10, seed=1)

    opt_b = ALL[name](param_groups(b, weight_decay=1e-3), path=path)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # same first 5 batches as the uninterrupted run
        x = torch.randn(10, 6, generator=g)
        opt_b.zero_grad()
        b(x).square().mean().backward()
        opt_b.step()
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    c = make_model()
    c.load_state_dict(saved["model"])
    opt_c = ALL[name](param_groups(c, weight_decay=1e-3), path=path)
    opt_c.load_state_dict(saved["opt"])
    for _ in range(5):
        x = torch.randn(10, 6, generator=g)
        opt_c.zero_grad()
        c(x).square().mean().backward()
        opt_c.step()
    assert torch.equal(flat(a), flat(c))


@pytest.mark.parametrize("name", ALL)
def test_tvlars_step_counter_in_state_dict(name):
    model = make_model()
    opt = ALL[name](model.parameters())
    train(model, opt, 3, seed=0)
    sd = opt.state_dict()
    if name == "TVLARS":
        assert all(float(s["optimizer_steps"]) == 3 for s in sd["state"].values())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ALL)
def test_closure_grad_none_and_grad_untouched(name, path):
    model = make_model()
    frozen = model[3].bias  # never receives a gradient
    opt = ALL[name](model.parameters(), path=path)
    x = torch.randn(10, 6)

    def closure():
        opt.zero_grad()
        loss = model[:3](x).square().mean() + 0 * model[3].weight.sum()
        loss.backward()
        return loss

    before = frozen.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert frozen.grad is None and torch.equal(frozen, before) and frozen not in opt.state
    grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    opt.step()
    for p, g in grads.items():
        assert torch.equal(p.grad, g)  # p.grad is never modified


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ALL)
def test_non_finite_gradient_leaves_tensor_and_state_untouched(name, path):
    torch.manual_seed(0)
    model = make_model()
    opt = ALL[name](param_groups(model, weight_decay=1e-3), path=path)
    train(model, opt, 2, seed=0)
    assert not opt.found_inf
    victim = model[0].weight
    w0 = {p: p.detach().clone() for p in model.parameters()}
    s0 = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    opt.zero_grad()
    model(torch.randn(10, 6)).square().mean().backward()
    victim.grad[0, 0] = float("nan")
    model[3].bias.grad[1] = float("inf")
    opt.step()
    assert bool(opt.found_inf)
    for p in (victim, model[3].bias):
        assert torch.equal(p, w0[p])
        for k, v in opt.state[p].items():
            if name == "TVLARS" and k == "optimizer_steps":  # t counts optimizer steps, skipped or not
                assert v == s0[id(p)][k] + 1
                continue
            assert torch.equal(v, s0[id(p)][k]), k
    assert not torch.equal(model[3].weight, w0[model[3].weight])  # the others did step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    train(model, opt, 1, seed=3)
    assert not opt.found_inf and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ALL)
def test_grad_scaler_matches_unscaled_run(name):
    torch.manual_seed(0)
    a = make_model()
    b = copy.deepcopy(a)
    opt_a, opt_b = ALL[name](a.parameters()), ALL[name](b.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for _ in range(4):
        x = torch.randn(10, 6)
        opt_a.zero_grad()
        a(x).square().mean().backward()
        opt_a.step()
        opt_b.zero_grad()
        scaler.scale(b(x).square().mean()).backward()
        scaler.step(opt_b)
        scaler.update()
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ALL)
def test_scheduler_drives_lr(name):
    model = make_model()
    opt = ALL[name](model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0 if t >= 2 else 1.0)
    train(model, opt, 2, seed=0)
    sched.step(); sched.step()
    opt.track_stats = True
    before = flat(model)
    train(model, opt, 1, seed=1)
    assert (opt.layer_stats()["lr"] == 0).all()
    assert opt.param_groups[0]["lr"] == 0.0
    moved = not torch.equal(before, flat(model))
    # LARS/TVLARS keep coasting on a velocity that already holds lr; LAMB/LALC step by lr_k * direction = 0
    assert moved == TABLE[name].lr_in_velocity


@pytest.mark.parametrize("name", ALL)
def test_torch_compile_of_a_training_step(name):
    torch._dynamo.reset()
    model = make_model()
    opt = ALL[name](model.parameters())
    x = torch.randn(10, 6)

    @torch.compile(backend="eager")
    def train_step():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    ref = copy.deepcopy(model)
    # eager on foreach, the path a traced step takes: the first Linear's bias has a gradient of
    # pure rounding noise under BatchNorm, which the trust ratio turns into O(1) steps, so only
    # the same arithmetic agrees there
    ref_opt = ALL[name](ref.parameters(), path="foreach")
    for _ in range(3):
        train_step()
        ref_opt.zero_grad()
        ref(x).square().mean().backward()
        ref_opt.step()
    torch.testing.assert_close(flat(model), flat(ref), rtol=1e-5, atol=1e-6)


def test_sparse_gradients_raise():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = LARS(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


BAD = [
    (LARS, dict(lr=-0.1), "lr"),
    (LARS, dict(lr=float("nan")), "lr"),
    (LARS, dict(lr=0.1, momentum=1.0), "momentum"),
    (LARS, dict(lr=0.1, momentum=-0.1), "momentum"),
    (LARS, dict(lr=0.1, eta=-1.0), "eta"),
    (LARS, dict(lr=0.1, weight_decay=float("nan")), "weight_decay"),
    (LARS, dict(lr=0.1, momentum=0.0, nesterov=True), "nesterov"),
    (LAMB, dict(lr=0.1, betas=(1.0, 0.999)), r"betas\[0\]"),
    (LAMB, dict(lr=0.1, betas=(0.9, -0.1)), r"betas\[1\]"),
    (LAMB, dict(lr=0.1, max_trust=0.0), "max_trust"),
    (LAMB, dict(lr=0.1, eps=0.0), r"eps.*> 0 \(eps = 0 divides 0 by 0"),
    (TVLARS, dict(lr=0.1, lam=-1e-4), "lam"),
    (TVLARS, dict(lr=0.1, alpha=-1.0), "alpha"),
    (TVLARS, dict(lr=0.1, delay=-1), "delay"),
    (LALC, dict(lr=0.1, dampening=1.5), "dampening"),
    (LALC, dict(lr=0.1, eps=-1.0), "eps"),
]


@pytest.mark.parametrize("cls,kw,field", BAD, ids=[f"{c.__name__}-{f}-{i}" for i, (c, _, f) in enumerate(BAD)])
def test_bad_hyperparameters_raise_naming_the_argument(cls, kw, field):
    with pytest.raises(ValueError, match=field):
        cls(make_model().parameters(), **kw)


def test_bad_param_groups():
    m = make_model()
    with pytest.warns(UserWarning, match="'moment' is not a hyper-parameter of LARS.*did you mean 'momentum'"):
        LARS([{"params": m[0].parameters(), "moment": 0.5}], lr=0.1)   # kept (torch.optim), but warned
    with pytest.raises(ValueError, match="more than one parameter group"):
        LARS([{"params": m[0].parameters()}, {"params": m.parameters()}], lr=0.1)
    with pytest.raises(ValueError, match=r"momentum.*param group 1"):
        LARS([{"params": m[0].parameters()}, {"params": m[3].parameters(), "momentum": 2.0}], lr=0.1)
    with pytest.raises(ValueError, match="path"):
        LARS(m.parameters(), lr=0.1, path="fast")


SPECS = {
    "LARS": (LARS, dict(eta=0.02, nesterov=True)),
    "TVLARS": (TVLARS, dict(eta=0.02, lam=0.1, delay=2)),
    "LAMB": (LAMB, dict()),
    "LALC": (LALC, dict(eta=0.05, dampening=0.1)),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", SPECS)
def test_tensor_lr_equals_float_lr_under_a_scheduler(name, path):
    cls, kw = SPECS[name]
    torch.manual_seed(0)
    a = make_model()
    b = copy.deepcopy(a)
    lr = torch.tensor(0.2)
    opt_a = cls(param_groups(a, weight_decay=1e-3), lr=0.2, path=path, **kw)
    opt_b = cls(param_groups(b, weight_decay=1e-3), lr=lr, path=path, **kw)
    assert opt_b.param_groups[0]["lr"] is lr
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)) for o in (opt_a, opt_b)]
    for _ in range(5):
        x = torch.randn(10, 6)
        for m, o, s in ((a, opt_a, scheds[0]), (b, opt_b, scheds[1])):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
            s.step()
    assert opt_b.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.2 / 6)  # updated in place
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-6, atol=1e-7)


def test_bad_tensor_lr():
    with pytest.raises(ValueError, match="lr"):
        LARS(make_model().parameters(), lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="lr"):
        LARS(make_model().parameters(), lr=torch.tensor(-0.1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SPECS)
def test_cuda_graph_capture_of_step(name):
    """With lr a device tensor, ``step()`` can be captured once and replayed: same result as
    eager steps, including an lr change between replays."""
    cls, kw = SPECS[name]
    torch.manual_seed(0)
    a = make_model().cuda()
    b = copy.deepcopy(a)
    opt_a = cls(param_groups(a, weight_decay=1e-3), lr=0.2, **kw)
    lr = torch.tensor(0.2, device="cuda")
    opt_b = cls(param_groups(b, weight_decay=1e-3), lr=lr, **kw)
    grads = [[torch.randn_like(p) for p in a.parameters()] for _ in range(6)]

    def eager(gs):
        for p, g in zip(a.parameters(), gs):
            p.grad = g.clone()
        opt_a.step()

    for p, g in zip(b.parameters(), grads[0]):
        p.grad = g.clone()  # static gradient buffers
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt_b.step()  # warm-up: creates the state outside the graph
    torch.cuda.current_stream().wait_stream(side)
    eager(grads[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_b.step()
    for i, gs in enumerate(grads[1:]):
        if i == 3:
            opt_a.param_groups[0]["lr"] = opt_a.param_groups[1]["lr"] = 0.05
            lr.fill_(0.05)
        eager(gs)
        for p, g in zip(b.parameters(), gs):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-5, atol=1e-6)


def test_load_state_dict_refuses_another_class_and_bad_groups():
    """A state of another class (its buffers mean other things) or an invalid loaded group is
    refused before anything is loaded; classes keeping the same state load each other's."""
    from largebatch.optim import CLARS

    def trained(cls, **kw):
        torch.manual_seed(0)
        model = make_model()
        opt = cls(param_groups(model, weight_decay=1e-3), lr=0.1, **kw)
        if persample[cls]:
            opt.attach(model)
        train(model, opt, 2, seed=0)
        return model, opt

    classes = [row.cls for row in TABLE.values()]   # every row, its constructor's defaults
    persample = {row.cls: row.persample for row in TABLE.values()}
    saved = {cls: trained(cls)[1].state_dict() for cls in classes}
    refused = 0
    for a in classes:
        for b in classes:
            model, opt = trained(b)
            before = copy.deepcopy(opt.state_dict())
            # both keep only `velocity` (v, the same quantity); CLARS's groups lack LARS's
            # `nesterov` and `trust_clip`, so only LARS loads into CLARS
            same = (a, b) == (LARS, CLARS)
            if a is b or same:
                opt.load_state_dict(copy.deepcopy(saved[a]))
                continue
            with pytest.raises(ValueError, match=r"^state_dict: .*another optimizer class"):
                opt.load_state_dict(copy.deepcopy(saved[a]))
            refused += 1
            after = opt.state_dict()  # untouched by the refused load
            assert all(torch.equal(before["state"][i][k], after["state"][i][k])
                       for i in before["state"] for k in before["state"][i])
    assert refused == len(classes) ** 2 - len(classes) - 1
    for key, bad in (("momentum", 1.5), ("lr", -3.0)):
        _, opt = trained(LARS)
        sd = opt.state_dict()
        sd["param_groups"][0][key] = bad
        with pytest.raises(ValueError, match=rf"{key}.*loaded param group 0"):
            opt.load_state_dict(sd)


@pytest.mark.parametrize("path", ["per_tensor", "foreach", "native"])
def test_lamb_with_exact_zero_gradients_stays_finite(path, kernel_sized):
    """LAMB's ``r = m_hat / (sqrt(v_hat) + eps)`` is 0/0 where an element's gradients were all
    exactly 0 if ``eps = 0`` (refused above); the smallest accepted eps gives finite weights."""
    w = nn.Parameter(torch.randn(64, 32))
    opt = LAMB([w], lr=0.1, eps=1e-30, path=path)
    for _ in range(3):
        g = torch.randn(64, 32)
        g[:, :4] = 0.0      # dead units
        w.grad = g
        opt.step()
        assert torch.isfinite(w).all() and not bool(opt.found_inf)
