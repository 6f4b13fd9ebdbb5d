"""LSignum, a toy layer-wise sign-momentum rule (the contributor route of docs/optimizers.md).

The rule::

    d     = g + wd * w
    m     = beta * m + (1 - beta) * d                   # m starts at 0
    trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)    # adapted tensors; 1 otherwise
    w     = w - lr_t * trust * sign(m)

Zero-norm rule: trust = 1 where ``||w|| == 0`` or ``||g|| + wd * ||w|| == 0``.
"""

from __future__ import annotations

import torch

from .._validation import check_nonneg, check_unit
from ._engine import LayerwiseOptimizer, select, zero_norm_safe_ratio

__all__ = ["LSignum"]


class LSignum(LayerwiseOptimizer):
    """Layer-wise sign momentum (toy).

    State per tensor: ``momentum_buffer`` (``m``).
    """

    compilable = True

    def __init__(self, params, lr: float, beta: float = 0.9, eta: float = 1e-3, eps: float = 0.0,
                 weight_decay: float = 0.0, adapt: bool = True, path: str | None = None, *,
                 maximize: bool = False, foreach: bool | None = None, differentiable: bool = False):
        defaults = dict(lr=lr, beta=beta, eta=eta, eps=eps, weight_decay=weight_decay, adapt=adapt)
        super().__init__(params, defaults, path=path, maximize=maximize, foreach=foreach,
                         differentiable=differentiable)

    @classmethod
    def _check_hparams(cls, g):
        check_unit("beta", g["beta"])
        check_nonneg("eta", g["eta"])
        check_nonneg("eps", g["eps"])

    def _init_state(self, p, group):
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def _update(self, group, w, g, st, w_norm, g_norm, fin, P):
        beta, wd = group["beta"], group["weight_decay"]
        d = g.add_(w, alpha=wd) if wd != 0 else g
        m = st["momentum_buffer"]
        m.mul_(P.coef(select(fin, beta, 1.0, g_norm))).addcmul_(d, P.coef(select(fin, 1 - beta, 0.0, g_norm)))
        if group["adapt"]:
            trust = zero_norm_safe_ratio(w_norm, g_norm + wd * w_norm, group["eta"], group["eps"])
        else:
            trust = torch.ones_like(g_norm)
        lr_k = group["lr"] * trust
        w.addcmul_(m.sign(), P.coef(torch.where(fin, -lr_k, 0.0)))
        return trust, lr_k
