"""TVLARS, time-varying LARS (Do et al.; seed 000 Alg. 1 and eq. 8-9, seed 001 Alg. 1).

The rule (docs/algorithms.md, "TVLARS")::

    phi(t) = 1 / (alpha + exp(lam * (t - delay))) + gamma_min        # eq. 8
    trust  = eta * ||w|| / (||g|| + wd * ||w|| + eps)                # adapted tensors; 1 otherwise
    gamma  = lr_t * phi(t) * trust
    b      = momentum * b - gamma * d                                # b starts at 0
    w      = w + momentum * b - gamma * d                            # mNAG (seed 001 Alg. 1)

This is the Nesterov form of seed 001 Alg. 1 written with a velocity; seed 000 Alg. 1's
``mu (m_{t+1} - w_t)`` is a typo that removes momentum and is not implemented. ``phi``
multiplies every tensor's learning rate, excluded tensors included; ``t`` counts this
optimizer's steps from 0 (stored per tensor as ``state["optimizer_steps"]``, skipped steps
included, so it survives ``state_dict``); ``delay`` is in optimizer steps.

Differences from the authors' public code (which the project does not follow): it clamps
both norms to at most 10, hard-codes ``alpha=0.1``, evaluates ``phi`` at ``t + 1``, drops
``delay`` and ``gamma_min``, divides by ``||g + wd * w||``, drops ``phi`` where the zero-norm
fallback applies, uses heavy-ball momentum, trains 1-D tensors with plain SGD at the raw
``lr`` and defaults to ``lam=1e-3`` (docs/algorithms.md, "TVLARS").
"""

from __future__ import annotations

import torch

from ..schedules import _check_phi, phi
from .lars import _TrustMomentum

__all__ = ["TVLARS"]


class TVLARS(_TrustMomentum):
    """Time-varying LARS: LARS with Nesterov momentum whose learning rate is multiplied by
    the decaying factor ``phi(t)`` of eq. 8 instead of a warm-up (run it with a constant
    ``lr``; see :func:`largebatch.schedules.tvlars_phi` for ``phi`` on its own).

    Args:
        lr: target learning rate (Table 1 uses 1..19 with ``eta=1e-3``).
        momentum: Nesterov momentum ``mu`` (default 0.9; 0 disables momentum).
        eta: trust coefficient (default 0.001).
        lam: decay rate ``lambda`` of eq. 8 (default 1e-4; Barlow Twins uses 1e-5), >= 0.
        alpha: scaling ``alpha`` of eq. 8 (default 1.0); ``alpha + exp(-lam * delay) > 0`` so
            that ``phi`` has no pole (``alpha > -1`` when ``delay = 0``).
        delay: ``d_e`` in optimizer steps (default 0), >= 0.
        gamma_min: lower bound added to ``phi`` (default 0), >= 0.
        weight_decay, eps, adapt, path: as in :class:`~largebatch.optim.LARS`.

    State per tensor: ``velocity`` (``-b`` of the paper, see :class:`~largebatch.optim.LARS`)
    and ``optimizer_steps`` (``t``: this optimizer's steps so far, skipped ones included).
    """

    _nesterov_only = True
    compilable = True
    _native_rule = "lars"  # _native.cpp

    def __init__(self, params, lr: float, momentum: float = 0.9, eta: float = 1e-3,
                 lam: float = 1e-4, alpha: float = 1.0, delay: float = 0, gamma_min: float = 0.0,
                 weight_decay: float = 0.0, eps: float = 0.0, adapt: bool = True,
                 path: str | None = None, *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False):
        defaults = dict(lr=lr, momentum=momentum, eta=eta, lam=lam, alpha=alpha, delay=delay,
                        gamma_min=gamma_min, weight_decay=weight_decay, eps=eps, adapt=adapt)
        super().__init__(params, defaults, path=path, maximize=maximize, foreach=foreach,
                         differentiable=differentiable)

    @classmethod
    def _check_hparams(cls, g):
        super()._check_hparams(g)
        _check_phi(g["lam"], g["alpha"], g["delay"], g["gamma_min"])

    def _init_state(self, p, group):
        st = super()._init_state(p, group)
        st["optimizer_steps"] = torch.zeros((), dtype=torch.int64, device=p.device)  # exact
        return st

    def _lr_factor(self, group, st, P, dtype):
        t = P.stack(st["optimizer_steps"]).to(dtype)     # phi(t) in the compute dtype (docs/algorithms.md section 8)
        return phi(t, group["lam"], group["alpha"], group["delay"], group["gamma_min"])

    def _update(self, group, w, g, st, w_norm, g_norm, fin, P):
        out = super()._update(group, w, g, st, w_norm, g_norm, fin, P)
        st["optimizer_steps"].add_(1)  # t counts optimizer steps, skipped ones included
        return out

    def _native_spec(self, group, states, dtype):
        spec = super()._native_spec(group, states, dtype)
        counters = [st["optimizer_steps"] for st in states]
        spec.after = lambda: torch._foreach_add_(counters, 1)   # as _update: every step counts
        return spec

    def lr_multiplier(self, group, t):
        return phi(float(t), group["lam"], group["alpha"], group["delay"], group["gamma_min"])
