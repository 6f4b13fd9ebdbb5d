"""The LAMB and LARS the TVLARS papers actually ran, as named variants of ours.

TVLARS 000 Sec. VI-A: "the Pytorch version of LARS used in this research is verified and referenced
from Lightning Flash [footnote 2]. LAMB Pytorch code, on the other hand, verified and referenced from
Pytorch Optimizer [footnote 3]." They differ from :class:`~largebatch.optim.LARS` /
:class:`~largebatch.optim.LAMB` (docs/algorithms.md) as follows.

``lamb-pto`` (:class:`PaperLAMB`, pytorch-optimizer's ``Lamb``):
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2`` (no bias correction),
    ``r = m / (sqrt(v) + eps) + wd w``, ``trust = min(||w||, 10) / ||r||`` (1 when either norm is 0),
    ``w -= lr trust r``. Every tensor adapts, eps defaults to 1e-6.

``lars-flash`` (:class:`PaperLARS`, Lightning Flash's ``LARS``):
    for a tensor with weight decay ``wd != 0`` and ``||w||, ||g|| > 0``:
    ``d = eta ||w|| / (||g|| + wd ||w|| + eps) (g + wd w)``, else ``d = g``;
    ``buf = d`` at the first step, then ``buf = mu buf + d``; ``w -= lr buf`` (Nesterov: ``lr (d + mu buf)``).
    The learning rate multiplies the velocity *after* the momentum (ours: inside it), so a schedule's
    LR change applies at once to the accumulated velocity; eta defaults to 0.001.

Which tensors: the papers' scripts pass ``model.parameters()`` with one weight decay, so with
``uniform_weight_decay`` (the default) every parameter group takes the largest weight decay of the
groups given: every tensor, BatchNorm and biases included, is decayed and adapted, as in the
papers' runs. No host-device synchronisation: the zero-norm cases are selected with ``torch.where``.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from .._validation import HyperparameterError
from .._validation import check as _check

__all__ = ["PaperLAMB", "PaperLARS"]


def _uniform(params, weight_decay: float | None):
    """Parameter groups with one weight decay (the largest given) when ``weight_decay`` is None."""
    groups = list(params)
    if groups and isinstance(groups[0], dict):
        wd = max(g.get("weight_decay", 0.0) for g in groups) if weight_decay is None else weight_decay
        return [{**g, "weight_decay": wd} for g in groups]
    return groups


class PaperLAMB(Optimizer):
    """pytorch-optimizer's ``Lamb`` (the module docstring): no bias correction, ``||w||`` clamped at ``clamp``."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, clamp: float = 10.0, uniform_weight_decay: bool = True):
        _check("lr", lr, lr >= 0, "a number >= 0")
        _check("eps", eps, eps >= 0, "a number >= 0")
        _check("betas", betas, 0 <= betas[0] < 1 and 0 <= betas[1] < 1, "two numbers in [0, 1)")
        _check("clamp", clamp, clamp > 0, "a number > 0")
        if uniform_weight_decay:
            params = _uniform(params, None)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, clamp=clamp))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, st = p.grad, self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                r = m / v.sqrt().add(group["eps"])
                if group["weight_decay"] != 0:
                    r.add_(p, alpha=group["weight_decay"])
                wn = torch.linalg.vector_norm(p).clamp(0, group["clamp"])
                rn = torch.linalg.vector_norm(r)
                trust = torch.where((wn > 0) & (rn > 0), wn / torch.where(rn > 0, rn, torch.ones_like(rn)),
                                    torch.ones_like(wn))
                p.sub_(r * (trust * group["lr"]))
        return loss


class PaperLARS(Optimizer):
    """Lightning Flash's ``LARS`` (the module docstring): LR outside the velocity, tensors with weight decay adapt."""

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, eta: float = 1e-3, eps: float = 1e-8, uniform_weight_decay: bool = True):
        _check("lr", lr, lr >= 0, "a number >= 0")
        _check("momentum", momentum, 0 <= momentum < 1, "a number in [0, 1)")
        _check("eta", eta, eta > 0, "a number > 0")
        _check("eps", eps, eps >= 0, "a number >= 0")
        if nesterov and momentum <= 0:
            raise HyperparameterError("nesterov", "nesterov: Nesterov momentum needs momentum > 0")
        if uniform_weight_decay:
            params = _uniform(params, None)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      eta=eta, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mu = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if wd != 0:
                    pn, gn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = group["eta"] * pn / (gn + pn * wd + group["eps"])
                    d = torch.where((pn > 0) & (gn > 0), (d + wd * p) * trust, d)
                if mu != 0:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        buf = st["momentum_buffer"] = d.clone()
                    else:
                        buf = st["momentum_buffer"]
                        buf.mul_(mu).add_(d)
                    d = d.add(buf, alpha=mu) if group["nesterov"] else buf
                p.add_(d, alpha=-group["lr"])
        return loss


def _register() -> None:
    from .registry import OPTIMIZERS, OptimizerInfo, register

    if "lamb-pto" not in OPTIMIZERS:
        register(OptimizerInfo(
            "lamb-pto", PaperLAMB, {"betas": "betas", "eps": "eps"},
            "the TVLARS papers' LAMB (pytorch-optimizer): no bias correction, min(||w||, 10) / ||r||, every tensor",
            lr_scaling="sqrt"))
    if "lars-flash" not in OPTIMIZERS:
        register(OptimizerInfo(
            "lars-flash", PaperLARS, {"momentum": "momentum", "nesterov": "nesterov", "eta": "eta", "eps": "eps"},
            "the TVLARS papers' LARS (Lightning Flash): trust on g + wd w, lr outside the velocity, every tensor",
            lr_scaling="sqrt"))
