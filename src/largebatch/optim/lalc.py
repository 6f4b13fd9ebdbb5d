"""LALC, layer-wise asymmetric learning-rate clipping (seed 003 Alg. 3 and Fig. 6).

The rule (docs/algorithms.md, "LALC")::

    d     = g + wd * w
    buf   = momentum * buf + (1 - dampening) * d      # buf starts as d (torch.optim.SGD convention)
    h     = buf                                       # nesterov: h = d + momentum * buf
    local = eta * ||w|| / (||h|| + eps)
    lr_k  = min(lr_t, local) if ||w|| * ||h|| > 0 else lr_t   # adapted tensors; lr_t otherwise
    w     = w - lr_k * h

The norm is that of the processed update ``h``, not of ``g`` (as the paper says). LALC never
amplifies: ``lr_k <= lr_t``.
"""

from __future__ import annotations

import torch

from .._validation import check, check_nonneg, check_unit
from ._engine import LayerwiseOptimizer, select

__all__ = ["LALC"]


class LALC(LayerwiseOptimizer):
    """Layer-wise asymmetric learning-rate clipping on top of ``torch.optim.SGD``'s direction.

    Args:
        lr: learning rate ``lr_t`` (the cap; LALC only ever lowers it).
        momentum: SGD momentum (default 0.9).
        eta: trust coefficient (default 0.01).
        dampening: SGD dampening in [0, 1] (default 0).
        nesterov: SGD's Nesterov direction ``h = d + momentum * buf``.
        eps: added to ``||h||`` (default 1e-8).
        weight_decay, adapt, path: as in :class:`~largebatch.optim.LARS`.

    State per tensor (with momentum): ``momentum_buffer`` (exactly ``torch.optim.SGD``'s)
    and ``step`` (updates applied to this tensor; the first one sets ``buf = d``).
    Diagnostics report ``lr_k / lr_t`` as the "trust ratio".
    """

    compilable = True
    _native_rule = "lalc"  # _native.cpp

    def __init__(self, params, lr: float, momentum: float = 0.9, eta: float = 0.01, dampening: float = 0.0,
                 nesterov: bool = False, eps: float = 1e-8, weight_decay: float = 0.0, adapt: bool = True,
                 path: str | None = None, *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False):
        defaults = dict(lr=lr, momentum=momentum, eta=eta, dampening=dampening, nesterov=nesterov,
                        eps=eps, weight_decay=weight_decay, adapt=adapt)
        super().__init__(params, defaults, path=path, maximize=maximize, foreach=foreach,
                         differentiable=differentiable)

    @classmethod
    def _check_hparams(cls, g):
        check_unit("momentum", g["momentum"])
        check_nonneg("eta", g["eta"])
        check_unit("dampening", g["dampening"], closed=True)
        check_nonneg("eps", g["eps"])
        if g["nesterov"] and (g["momentum"] == 0 or g["dampening"] != 0):
            check("nesterov", True, False, "False unless momentum > 0 and dampening = 0")

    def _init_state(self, p, group):
        if group["momentum"] == 0:
            return {}
        return {"step": torch.zeros((), dtype=torch.int64, device=p.device),
                "momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def _native_spec(self, group, states, dtype):
        from ._native import NativeSpec
        scalars = dict(mu=float(group["momentum"]), eta=float(group["eta"]), damp=float(group["dampening"]),
                       nesterov=bool(group["nesterov"]))
        return NativeSpec(scalars, state=("momentum_buffer", None, "step") if scalars["mu"] != 0 else ())

    @classmethod
    def _n_norm_operands(cls, group):
        return 1 if group["adapt"] else 0

    def _norm_operands(self, group, w, g, st, P, dtype):
        # h of _update below for a finite g, out of place (sharded parameters: ||h|| is reduced
        # with ||w|| and ||g|| in the step's one collective, before the update)
        mu, wd = group["momentum"], group["weight_decay"]
        d = g.add(w, alpha=wd) if wd != 0 else g
        if mu == 0:
            return [d]
        first = P.stack(st["step"]) == 0
        c = select(first, 1.0, 1.0 - group["dampening"], first.to(dtype))
        h = st["momentum_buffer"].mul(mu).addcmul_(d, P.coef(c))
        return [d.add(h, alpha=mu) if group["nesterov"] else h]

    def _update(self, group, w, g, st, w_norm, g_norm, fin, P):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        h = d = g.add_(w, alpha=wd) if wd != 0 else g     # g is already a private (masked) copy
        if mu != 0:
            buf = st["momentum_buffer"]
            first = P.stack(st["step"]) == 0                # buf is 0 there: buf <- d
            c = select(fin, select(first, 1.0, 1.0 - group["dampening"], g_norm), 0.0, g_norm)
            buf.mul_(P.coef(select(fin, mu, 1.0, g_norm))).addcmul_(d, P.coef(c))
            st["step"].add_(P.coef(fin.to(torch.int64)))
            h = d.add_(buf, alpha=mu) if group["nesterov"] else buf
        lr_t = torch.ones_like(g_norm) * lr                 # lr: a float, or a 0-d tensor (compiled path)
        if group["adapt"]:
            h_norm = P.norm(h)
            local = group["eta"] * w_norm / (h_norm + group["eps"])
            lr_k = torch.where(w_norm * h_norm > 0, torch.minimum(local, lr_t), lr_t)
        else:
            lr_k = lr_t
        w.addcmul_(h, P.coef(torch.where(fin, -lr_k, 0.0)))
        trust = torch.where(lr_t > 0, lr_k / lr_t, 1.0)
        return trust, lr_k
