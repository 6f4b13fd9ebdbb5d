"""Each optimizer of the table (``cases.TABLE``: its base configuration and its ``reference``
ones) against the independent float64 reference (tests/reference.py) on the eager paths; the
native path runs the same configurations in float64 in test_native.py."""

import pytest
import torch
from torch import nn

from cases import EAGER_PATHS, REFERENCE_CASES, REFERENCE_IDS, TABLE, names, reference_configs
from largebatch.optim import LALC, LARS, param_groups
from reference import Reference


def make_model():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 5),
    )


def run_against_reference(cls, algo, kw, path, wd, steps=10, model=None, grad_hook=None):
    """``kw``: constructor keywords, ``lr`` included (``cases.TABLE``)."""
    torch.manual_seed(0)
    model = model or make_model()
    kw = dict(kw)
    lr = kw.pop("lr")
    opt = cls(param_groups(model, weight_decay=wd), lr=lr, path=path, **kw)
    opt.track_stats = True
    # lr changed mid-run by a scheduler: halved at step 4, halved again at step 7
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[4, 7], gamma=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {names[id(p)]: (g["adapt"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    ref = Reference(algo, dict(model.named_parameters()), groups, **kw)
    moved = 0.0
    for t in range(steps):
        x, y = torch.randn(16, 3, 7, 7), torch.randint(0, 5, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if grad_hook:
            grad_hook(model, t)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ref.step(grads, opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        for n, p in model.named_parameters():
            moved = max(moved, float((p.detach() - before[n]).abs().max()))
            torch.testing.assert_close(p.detach().double(), ref.w[n], rtol=2e-5, atol=2e-6,
                                       msg=lambda m: f"{cls.__name__} {kw} step {t} tensor {n}: {m}")
    return model, opt, ref, moved


@pytest.mark.parametrize("path", EAGER_PATHS)
@pytest.mark.parametrize("wd", [0.0, 5e-3])
@pytest.mark.parametrize("name,j,kw", REFERENCE_CASES, ids=REFERENCE_IDS)
def test_matches_reference(name, j, kw, path, wd):
    _, _, _, moved = run_against_reference(TABLE[name].cls, TABLE[name].rule, kw, path, wd)
    assert moved > 1e-4  # the comparison is not vacuous: weights really moved


def zero_layer_model():
    torch.manual_seed(0)
    m = make_model()
    with torch.no_grad():
        m[9].weight.zero_()  # zero weight norm; also makes every upstream gradient exactly zero
    return m


@pytest.mark.parametrize("path", EAGER_PATHS)
@pytest.mark.parametrize("name", names(rule=True))
def test_zero_norms_give_trust_one(name, path):
    """Its first further reference configuration (else the base one), one step."""
    row = TABLE[name]
    kw = reference_configs(name)[1 if row.reference else 0]
    model, opt, _, _ = run_against_reference(row.cls, row.rule, kw, path, wd=0.0, steps=1, model=zero_layer_model())
    stats = opt.layer_stats()
    adapted = stats["adapt"]
    assert adapted.sum() == 4
    # model[9].weight: ||w|| = 0; the other adapted tensors: ||g|| = 0 (LAMB: ||r|| = 0)
    assert (stats["trust"][adapted] == 1.0).all()
    assert (stats["g_norm"][adapted][:3] == 0).all() and stats["w_norm"][adapted][3] == 0
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert model[9].weight.abs().sum() > 0  # the zero weight moved (trust 1, not 0)


@pytest.mark.parametrize("path", EAGER_PATHS)
def test_lalc_never_exceeds_lr(path):
    for eta in (1e-3, 0.05, 10.0):  # mostly clipped, mixed, never clipped
        torch.manual_seed(0)
        model = make_model()
        opt = LALC(param_groups(model, weight_decay=1e-3), lr=0.5, eta=eta, path=path)
        opt.track_stats = True
        clipped = 0
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(16, 3, 7, 7)).square().mean().backward()
            opt.step()
            lr = opt.layer_stats()["lr"]
            assert (lr <= 0.5).all()
            clipped += int((lr < 0.5).sum())
        assert (clipped > 0) == (eta < 10.0)


def test_excluded_tensors_get_plain_base_update():
    """An excluded tensor (adapt=False, wd=0) under LARS gets exactly momentum SGD at lr."""
    torch.manual_seed(0)
    model = make_model()
    opt = LARS(param_groups(model, weight_decay=0.1), lr=0.3, momentum=0.9)
    twin = nn.Parameter(model[7].bias.detach().clone())
    sgd = torch.optim.SGD([twin], lr=0.3, momentum=0.9)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 3, 7, 7)).square().mean().backward()
        twin.grad = model[7].bias.grad.clone()
        opt.step()
        sgd.step()
        torch.testing.assert_close(model[7].bias, twin, rtol=1e-6, atol=1e-7)
