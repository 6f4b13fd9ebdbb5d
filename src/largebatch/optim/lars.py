"""LARS (You, Gitman, Ginsburg 2017; seed 000 eq. 2, seed 004 eq. 3) and the engine piece
shared by the LARS family (LARS, TVLARS, CLARS): trust ratio first, then momentum on the
scaled step.

The rule (docs/algorithms.md, "LARS")::

    trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)      # adapted tensors; 1 otherwise
    v     = momentum * v + lr_t * trust * d               # d = g + wd * w, v starts at 0
    w     = w - v                                         # nesterov: w - (momentum * v + lr_t * trust * d)

Zero-norm rule: trust = 1 where ``||w|| == 0`` or ``||g|| + wd * ||w|| == 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check, check_nonneg, check_unit
from ._engine import LayerwiseOptimizer, select, zero_norm_safe_ratio

__all__ = ["LARS"]


class _TrustMomentum(LayerwiseOptimizer):
    """LARS family: ``v = mu * v + lr_k * d`` with ``lr_k = lr_t * f_t * trust``; ``w -= v``
    (heavy ball) or ``w -= mu * v + lr_k * d`` (Nesterov).

    State: ``velocity`` is ``v`` (the learning rate is inside it, unlike
    ``torch.optim.SGD``'s ``momentum_buffer``); the ``b`` of the TVLARS and CLARS papers is
    ``-velocity``. Subclasses choose the time factor ``f_t`` (:meth:`_lr_factor`, 1 for
    LARS) and the norm in the trust ratio's denominator (:meth:`_trust_norm`, ``||g||``).
    """

    _nesterov_only = False

    @classmethod
    def _check_hparams(cls, g):
        check_unit("momentum", g["momentum"])
        check_nonneg("eta", g["eta"])
        check_nonneg("eps", g["eps"])
        if g.get("nesterov") and g["momentum"] == 0:
            check("nesterov", True, False, "False when momentum = 0 (Nesterov needs momentum > 0)")

    def _init_state(self, p, group):
        st = {}
        if group["momentum"] != 0:
            st["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _native_spec(self, group, states, dtype):
        from ._native import NativeSpec
        from ._paths import Foreach, TensorList

        st = {k: TensorList(s[k] for s in states) for k in states[0]}
        scalars = dict(mu=float(group["momentum"]), eta=float(group["eta"]),
                       nesterov=bool(self._nesterov_only or group["nesterov"]), clip=bool(group.get("trust_clip")))
        inputs = {}
        f = self._lr_factor(group, st, Foreach, dtype)
        if isinstance(f, Tensor):            # TVLARS: phi(t) per tensor, in the compute dtype
            inputs["lrf"] = f
        else:
            scalars["lr"] = float(group["lr"]) * f
        if group["adapt"]:
            tn = self._native_trust_norm(group, st, dtype)
            if tn is not None:
                inputs["tn"] = tn
        return NativeSpec(scalars, inputs, ("velocity",) if scalars["mu"] != 0 else ())

    def _native_trust_norm(self, group, st, dtype) -> Tensor | None:
        """The norm in the trust ratio's denominator when it is not ``||g||`` (CLARS's
        ``n_k``), one per tensor, for the native kernel; ``None``: ``||g||``."""
        return None

    def _lr_factor(self, group, st, P, dtype: torch.dtype) -> Tensor | float:
        """``f_t``, the factor of ``lr_t`` before the trust ratio, in ``dtype`` (the compute
        dtype) when a tensor (reads the state, never writes it)."""
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
        lr_k = lr * self._lr_factor(group, st, P, g_norm.dtype) * trust
        step = P.coef(torch.where(fin, -lr_k, 0.0))      # -lr_t f_t trust, 0 for skipped tensors
        d = g.add_(w, alpha=wd) if wd != 0 else g          # g is already a private (masked) copy
        if mu == 0:
            w.addcmul_(d, step)
            return trust, lr_k
        v = st["velocity"]                                 # v <- mu v + lr_k d
        v.mul_(P.coef(select(fin, mu, 1.0, g_norm))).addcmul_(d, P.coef(torch.where(fin, lr_k, 0.0)))
        if nesterov:
            w.addcmul_(v, P.coef(select(fin, -mu, 0.0, g_norm))).addcmul_(d, step)
        else:
            w.addcmul_(v, P.coef(select(fin, -1.0, 0.0, g_norm)))
        return trust, lr_k


class LARS(_TrustMomentum):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017, seed 000 eq. 2; docs/algorithms.md).

    Args:
        params: parameters or param groups (see :func:`largebatch.optim.param_groups`).
        lr: learning rate ``lr_t`` (read from ``group["lr"]`` every step).
        momentum: heavy-ball momentum (default 0.9).
        eta: trust coefficient (default 0.001).
        weight_decay: coupled L2 (default 0).
        nesterov: Nesterov form ``w -= momentum * v + lr_t * trust * d``.
        eps: added to the trust ratio's denominator (default 0).
        trust_clip: clip the trust ratio at 1, i.e. a per-layer LR ``min(lr_t * trust, lr_t)``
            (default False; not APEX LARC's ``min(trust, lr_t)``).
        adapt: apply the trust ratio to this group (default True).
        path: execution path, see :class:`~largebatch.optim.LayerwiseOptimizer`.
        maximize: ascend the objective (``torch.optim``'s switch; every optimizer here).
        foreach: ``torch.optim``'s switch: True is ``path="foreach"``, False ``"per_tensor"``.
        differentiable: only False (True is refused, saying why).

    State per tensor: ``velocity`` (``v``, with the learning rate inside).
    """

    compilable = True
    _native_rule = "lars"  # _native.cpp

    def __init__(self, params, lr: float, momentum: float = 0.9, eta: float = 1e-3,
                 weight_decay: float = 0.0, nesterov: bool = False, eps: float = 0.0,
                 trust_clip: bool = False, adapt: bool = True, path: str | None = None, *,
                 maximize: bool = False, foreach: bool | None = None, differentiable: bool = False):
        defaults = dict(lr=lr, momentum=momentum, eta=eta, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, trust_clip=trust_clip, adapt=adapt)
        super().__init__(params, defaults, path=path, maximize=maximize, foreach=foreach,
                         differentiable=differentiable)
