"""The TVLARS papers' LAMB (pytorch-optimizer) and LARS (Lightning Flash) against reference formulas
written from the upstream code, in float64, with the zero-norm and clamp cases."""

import math

import pytest
import torch

from largebatch.optim import registry
from largebatch.optim.paper_variants import PaperLAMB, PaperLARS


def ref_lamb(ws, grads, lr, b1, b2, eps, wd, steps):
    """pytorch-optimizer ``Lamb.step`` (v3, no debiasing) per tensor, as plain float arithmetic."""
    ws = [w.clone() for w in ws]
    m = [torch.zeros_like(w) for w in ws]
    v = [torch.zeros_like(w) for w in ws]
    for t in range(steps):
        for i, w in enumerate(ws):
            g = grads[t][i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = m[i] / (v[i].sqrt() + eps)
            if wd != 0:
                r = r + wd * w
            wn = min(math.sqrt(float((w * w).sum())), 10.0)
            rn = math.sqrt(float((r * r).sum()))
            trust = 1.0 if wn == 0 or rn == 0 else wn / rn
            ws[i] = w - lr[t] * trust * r
    return ws


def ref_lars(ws, grads, lr, mu, wd, eta, eps, nesterov, steps):
    """Lightning Flash ``LARS.step`` per tensor."""
    ws = [w.clone() for w in ws]
    buf = [None] * len(ws)
    for t in range(steps):
        for i, w in enumerate(ws):
            d = grads[t][i]
            pn, gn = math.sqrt(float((w * w).sum())), math.sqrt(float((d * d).sum()))
            if wd != 0 and pn != 0 and gn != 0:
                d = (d + wd * w) * (eta * pn / (gn + pn * wd + eps))
            if mu != 0:
                buf[i] = d.clone() if buf[i] is None else mu * buf[i] + d
                d = d + mu * buf[i] if nesterov else buf[i]
            ws[i] = w - lr[t] * d
    return ws


def _problem(seed=0, big=False):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(5, 3, generator=g, dtype=torch.float64) * (8.0 if big else 1.0),  # big: ||w|| > 10 (clamped)
          torch.randn(4, generator=g, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]  # a zero tensor
    grads = [[torch.randn_like(w) for w in ws] for _ in range(4)]
    grads[2][1] = torch.zeros_like(ws[1])  # a zero gradient once
    return ws, grads


def _run(cls, ws, grads, lrs, groups=None, **kw):
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = cls(groups(params) if groups else params, lr=lrs[0], **kw)
    for t, gs in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_paper_lamb_matches_pytorch_optimizer(big, wd):
    ws, grads = _problem(1, big)
    lrs = [0.1, 0.2, 0.3, 0.05]
    got = _run(PaperLAMB, ws, grads, lrs, weight_decay=wd)
    want = ref_lamb(ws, grads, lrs, 0.9, 0.999, 1e-6, wd, 4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if big:  # the clamp is what differs from ours: ||w|| > 10 is taken as 10
        assert float(ws[0].norm()) > 10


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_paper_lars_matches_lightning_flash(nesterov, wd):
    ws, grads = _problem(2)
    lrs = [0.0, 1.0, 4.0, 2.0]  # a warm-up: the LR multiplies the velocity after the momentum
    got = _run(PaperLARS, ws, grads, lrs, momentum=0.9, weight_decay=wd, nesterov=nesterov, eta=1e-3)
    want = ref_lars(ws, grads, lrs, 0.9, wd, 1e-3, 1e-8, nesterov, 4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_every_tensor_takes_the_weight_decay_like_model_parameters():
    """Our param groups exempt BN/biases (weight decay 0); the papers passed model.parameters() with one."""
    ws, grads = _problem(3)
    lrs = [1.0] * 4

    def groups(ps):
        return [{"params": ps[:1], "weight_decay": 5e-4}, {"params": ps[1:], "weight_decay": 0.0, "adapt": False}]

    got = _run(PaperLARS, ws, grads, lrs, groups=groups, momentum=0.9)
    want = ref_lars(ws, grads, lrs, 0.9, 5e-4, 1e-3, 1e-8, False, 4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    kept = _run(PaperLARS, ws, grads, lrs, groups=groups, momentum=0.9, uniform_weight_decay=False)
    assert not torch.allclose(kept[1], want[1])


def test_differs_from_ours_where_the_papers_differ():
    """Flash's LARS under a changing LR is not ours (LR inside the velocity); PTO's LAMB is not ours (bias correction)."""
    from largebatch.optim import LAMB, LARS

    ws, grads = _problem(4, big=True)
    lrs = [0.1, 1.0, 2.0, 3.0]
    flash = _run(PaperLARS, ws, grads, lrs, momentum=0.9, weight_decay=5e-4)
    ours = _run(LARS, ws, grads, lrs, groups=lambda ps: [{"params": ps, "weight_decay": 5e-4}], momentum=0.9)
    assert not torch.allclose(flash[0], ours[0])
    pto = _run(PaperLAMB, ws, grads, lrs, weight_decay=0.01)
    ours = _run(LAMB, ws, grads, lrs, groups=lambda ps: [{"params": ps, "weight_decay": 0.01}])
    assert not torch.allclose(pto[0], ours[0])


def test_registered_and_validated():
    assert registry.get("lamb-pto").cls is PaperLAMB and registry.get("lars-flash").cls is PaperLARS
    with pytest.raises(ValueError, match="eta"):
        registry.get("lars-flash").check({"lr": 1.0, "eta": -1.0})
    with pytest.raises(ValueError, match="betas"):
        PaperLAMB([torch.nn.Parameter(torch.ones(2))], betas=(1.0, 0.9))


def test_float32_step_has_no_host_sync_branch():
    """The zero-norm cases go through torch.where: a step on a zero tensor leaves it finite and unchanged by trust."""
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    PaperLARS([p], lr=1.0, momentum=0.9, weight_decay=5e-4).step()
    torch.testing.assert_close(p.detach(), -torch.ones(3))  # trust skipped: d = g
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.ones(3)
    PaperLAMB([q], lr=1.0).step()
    assert torch.isfinite(q).all()
