"""LAMB (You et al. 2020, Alg. 2) and its trust-clipped variant LAMBC (Fong et al. 2020).

The rule (docs/algorithms.md, "LAMB")::

    m = b1 * m + (1 - b1) * g ;  v = b2 * v + (1 - b2) * g^2
    r = (m / (1 - b1^(t+1))) / (sqrt(v / (1 - b2^(t+1))) + eps) + wd * w
    trust = ||w|| / ||r||          # adapted tensors; 1 otherwise; optional clip to [0, max_trust]
    w = w - lr_t * trust * r

``t + 1`` is the tensor's number of applied updates (``state["step"]``, int64; a step
skipped for a non-finite gradient does not count). The bias corrections ``1 - b^n`` are
computed as ``-expm1(n * log(b))`` in the compute dtype, free of cancellation
(docs/algorithms.md section 8). Zero-norm rule: trust = 1 where ``||w|| == 0`` or ``||r|| == 0``.
"""

from __future__ import annotations

import math

import torch

from .._validation import check, check_unit, is_real
from ._engine import LayerwiseOptimizer, select, zero_norm_safe_ratio

__all__ = ["LAMB"]


class LAMB(LayerwiseOptimizer):
    """Layer-wise Adaptive Moments for Batch training (You et al. 2020, Alg. 2).

    Args:
        lr: learning rate ``lr_t``.
        betas: ``(b1, b2)``, each in [0, 1) (default (0.9, 0.999)).
        eps: added to ``sqrt(v_hat)`` (default 1e-6), > 0: with ``eps = 0`` an element whose
            gradients were all exactly 0 would give ``0 / 0`` (docs/algorithms.md, section 3).
        weight_decay: coupled decay added to the Adam direction ``r`` (default 0).
        max_trust: clip the trust ratio to ``[0, max_trust]`` (default None: no clip;
            ``max_trust=1`` is LAMBC).
        adapt, path: as in :class:`~largebatch.optim.LARS`.

    State per tensor: ``step`` (updates applied to this tensor, as in ``torch.optim.Adam``),
    ``exp_avg`` (``m``), ``exp_avg_sq`` (``v``).
    """

    compilable = True
    _native_rule = "lamb"  # _native.cpp

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, max_trust: float | None = None, adapt: bool = True,
                 path: str | None = None, *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_trust=max_trust, adapt=adapt)
        super().__init__(params, defaults, path=path, maximize=maximize, foreach=foreach,
                         differentiable=differentiable)

    @classmethod
    def _check_hparams(cls, g):
        betas = g["betas"]
        check("betas", betas, isinstance(betas, (tuple, list)) and len(betas) == 2, "a pair (b1, b2)")
        check_unit("betas[0]", betas[0])
        check_unit("betas[1]", betas[1])
        eps = g["eps"]   # r = m_hat / (sqrt(v_hat) + eps): 0/0 where g has exact zeros if eps = 0
        check("eps", eps, is_real(eps) and eps > 0, "a finite number > 0 (eps = 0 divides 0 by 0 where the "
              "gradient has exact zeros; docs/algorithms.md, section 3)")
        mt = g["max_trust"]
        check("max_trust", mt, mt is None or (is_real(mt) and mt > 0), "None or a number > 0")

    def _init_state(self, p, group):
        z = lambda: torch.zeros_like(p, memory_format=torch.preserve_format)  # noqa: E731
        return {"step": torch.zeros((), dtype=torch.int64, device=p.device),
                "exp_avg": z(), "exp_avg_sq": z()}

    def _native_spec(self, group, states, dtype):
        from ._native import NativeSpec
        b1, b2 = (float(b) for b in group["betas"])
        mt = group["max_trust"]
        scalars = dict(b1=b1, b2=b2, log_b1=_log(b1), log_b2=_log(b2), has_max_trust=mt is not None,
                       max_trust=float(mt) if mt is not None else 0.0)
        return NativeSpec(scalars, state=("exp_avg", "exp_avg_sq", "step"))

    @classmethod
    def _n_norm_operands(cls, group):
        return 1 if group["adapt"] else 0

    def _norm_operands(self, group, w, g, st, P, dtype):
        # r of _update below for a finite g, out of place (sharded parameters: ||r|| is reduced
        # with ||w|| and ||g|| in the step's one collective, before the update)
        (b1, b2) = group["betas"]
        m = st["exp_avg"].mul(b1).add_(g, alpha=1 - b1)
        v = st["exp_avg_sq"].mul(b2).addcmul_(g, g, value=1 - b2)
        return [self._direction(group, w, m, v.sqrt_(), self._count(st, P, dtype, pending=True), P)]

    @staticmethod
    def _count(st, P, dtype, pending: bool):
        """``n``, the update number of the bias corrections: ``step + 1`` while this step's
        update is still to be counted (``pending``), else ``step``; at least 1 (a tensor never
        updated has ``m = v = 0``)."""
        n = P.stack(st["step"])
        return (n + 1 if pending else n.clamp(min=1)).to(dtype)

    @staticmethod
    def _direction(group, w, m, sqrt_v, n, P):
        """``r = (m / (1 - b1^n)) / (sqrt(v) / sqrt(1 - b2^n) + eps) + wd * w`` (docs/algorithms.md,
        section 3), written into ``sqrt_v`` (a temporary); ``1 - b^n = -expm1(n log b)``, without
        cancellation. The one spelling of LAMB's direction: the update and the sharded norms."""
        (b1, b2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
        bc1, bc2 = (-torch.expm1(n * _log(b)) for b in (b1, b2))
        r = sqrt_v.mul_(P.coef(torch.rsqrt(bc2))).add_(eps)
        r.reciprocal_().mul_(m).mul_(P.coef(1 / bc1))
        if wd != 0:
            r.add_(w, alpha=wd)
        return r

    def _update(self, group, w, g, st, w_norm, g_norm, fin, P):
        (b1, b2), lr = group["betas"], group["lr"]
        m, v = st["exp_avg"], st["exp_avg_sq"]
        # g is zero where the gradient is non-finite: only the decays need masking.
        m.mul_(P.coef(select(fin, b1, 1.0, g_norm))).add_(g, alpha=1 - b1)
        v.mul_(P.coef(select(fin, b2, 1.0, g_norm))).addcmul_(g, g, value=1 - b2)
        st["step"].add_(P.coef(fin.to(torch.int64)))
        # the one full-size temporary: sqrt(v), turned into r in place
        r = self._direction(group, w, m, v.sqrt(), self._count(st, P, g_norm.dtype, pending=False), P)
        if group["adapt"]:
            trust = zero_norm_safe_ratio(w_norm, P.norm(r))
            if group["max_trust"] is not None:
                trust = trust.clamp(max=group["max_trust"])
        else:
            trust = torch.ones_like(g_norm)
        lr_k = lr * trust
        w.addcmul_(r, P.coef(torch.where(fin, -lr_k, 0.0)))
        return trust, lr_k


def _log(b: float) -> float:
    """``log(b)`` for ``b`` in [0, 1): ``-inf`` at 0, so that ``-expm1(t * log(0)) = 1``."""
    return math.log(b) if b > 0 else -math.inf
