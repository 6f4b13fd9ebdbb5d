"""LARS (You, Gitman, Ginsburg 2017; seed 000 eq. 2, seed 004 eq. 3) and the engine piece
shared by the LARS family (LARS, TVLARS, CLARS): trust ratio first, then momentum on the
scaled step.

SPEC "LARS"::

    trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)      # adapted tensors; 1 otherwise
    v     = momentum * v + lr_t * trust * d               # d = g + wd * w, v starts at 0
    w     = w - v                                         # nesterov: w - (momentum * v + lr_t * trust * d)

Zero-norm rule: trust = 1 where ``||w|| == 0`` or ``||g|| + wd * ||w|| == 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._engine import LayerwiseOptimizer, check_nonneg, check_unit, zero_norm_safe_ratio

__all__ = ["LARS"]


class _TrustMomentum(LayerwiseOptimizer):
    """LARS family: ``v = mu * v + lr_t * f_t * trust * d``; ``w -= v`` (or the Nesterov form).

    Subclasses choose the time factor ``f_t`` (:meth:`_time_factor`, 1 for LARS) and the
    norm in the trust ratio's denominator (:meth:`_trust_norm`, ``||g||`` for LARS).
    """

    _nesterov_only = False

    def _validate_hparams(self, g):
        check_unit("momentum", g["momentum"])
        check_nonneg("eta", g["eta"])
        check_nonneg("eps", g["eps"])
        if g.get("nesterov") and g["momentum"] == 0:
            raise ValueError("nesterov=True requires momentum > 0")

    def _init_state(self, p, group):
        st = {}
        if group["momentum"] != 0:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _time_factor(self, group, st, P) -> Tensor | float:
        return 1.0

    def _trust_norm(self, group, w, g_norm, st, P) -> Tensor:
        return g_norm

    def _trust(self, group, w, w_norm, g_norm, st, P) -> Tensor:
        wd = group["weight_decay"]
        den = self._trust_norm(group, w, g_norm, st, P) + wd * w_norm
        trust = zero_norm_safe_ratio(w_norm, den, group["eta"], group["eps"])
        if group.get("trust_clip"):
            trust = trust.clamp(max=1.0)
        return trust

    def _update(self, group, w, g, st, w_norm, g_norm, fin, P):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        nesterov = self._nesterov_only or group["nesterov"]
        trust = self._trust(group, w, w_norm, g_norm, st, P) if group["adapt"] else torch.ones_like(g_norm)
        lr_k = lr * self._time_factor(group, st, P) * trust
        step = P.coef(torch.where(fin, -lr_k, 0.0))      # -lr_t f_t trust, 0 for skipped tensors
        d = g.add_(w, alpha=wd) if wd != 0 else g          # g is already a private (masked) copy
        if mu == 0:
            w.addcmul_(d, step)
            return trust, lr_k
        v = st["momentum_buffer"]                          # holds -v of SPEC: v <- mu v - lr_k d
        v.mul_(P.coef(torch.where(fin, mu, 1.0))).addcmul_(d, step)
        if nesterov:
            w.addcmul_(v, P.coef(torch.where(fin, mu, 0.0))).addcmul_(d, step)
        else:
            w.addcmul_(v, P.coef(torch.where(fin, 1.0, 0.0)))
        return trust, lr_k


class LARS(_TrustMomentum):
    """Layer-wise Adaptive Rate Scaling (SPEC "LARS"; You et al. 2017, seed 000 eq. 2).

    Args:
        params: parameters or param groups (see :func:`largebatch.optim.param_groups`).
        lr: learning rate ``lr_t`` (read from ``group["lr"]`` every step).
        momentum: heavy-ball momentum (default 0.9).
        eta: trust coefficient (default 0.001).
        weight_decay: coupled L2 (default 0).
        nesterov: Nesterov form ``w -= momentum * v + lr_t * trust * d``.
        eps: added to the trust ratio's denominator (default 0).
        trust_clip: LARC-style clip ``min(lr_t * trust, lr_t)`` (default False).
        adapt: apply the trust ratio to this group (default True).
        path: execution path, see :class:`~largebatch.optim._engine.LayerwiseOptimizer`.

    The stored ``momentum_buffer`` is ``-v`` (the step to add to ``w``).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, eta: float = 1e-3,
                 weight_decay: float = 0.0, nesterov: bool = False, eps: float = 0.0,
                 trust_clip: bool = False, adapt: bool = True, path: str | None = None):
        defaults = dict(lr=lr, momentum=momentum, eta=eta, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, trust_clip=trust_clip, adapt=adapt)
        super().__init__(params, defaults, path=path)
