"""Independent float64 references of the update rules of docs/algorithms.md, one function per rule.

Written straight from docs/algorithms.md with plain Python control flow, no code shared with
``largebatch.optim``. Each ``step`` maps ``{name: w}`` and ``{name: g}`` (float64) to new
weights, keeping its own state.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def _norm(x):
    """The L2 norm, scaled by the largest magnitude first: exact for finite float64 data of any
    magnitude (a plain sum of squares overflows beyond 1e154 and underflows below 1e-154)."""
    m = float(x.abs().max()) if x.numel() else 0.0
    if m == 0 or not math.isfinite(m):
        return float(torch.linalg.vector_norm(x))
    return m * float(torch.linalg.vector_norm(x / m))


def _lars_trust(w, g, adapt, wd, eta, eps):
    """The LARS/TVLARS ratio (docs/algorithms.md sections 2, 4) with the zero-norm rule; 1 for excluded tensors."""
    if not adapt:
        return 1.0
    wn, gn = _norm(w), _norm(g)
    if wn > 0 and gn + wd * wn > 0:
        return eta * wn / (gn + wd * wn + eps)
    return 1.0


class Reference:
    """``algo`` in {"lars", "tvlars", "lamb", "lalc"}; ``groups``: name -> (adapt, wd)."""

    def __init__(self, algo, weights, groups, **hp):
        self.algo, self.groups, self.hp = algo, groups, hp
        self.w = {k: v.detach().double().clone() for k, v in weights.items()}
        self.state = {k: {} for k in weights}
        self.t = 0  # optimizer steps so far (docs/algorithms.md section 4: the first step uses t = 0)

    def step(self, grads, lr, skip=()):
        """One step; tensors named in ``skip`` (non-finite gradient) are left untouched."""
        for k, g in grads.items():
            if k in skip:
                continue
            adapt, wd = self.groups[k]
            self.w[k] = getattr(self, "_" + self.algo)(self.w[k], g.double(), self.state[k], lr, adapt, wd)
        self.t += 1

    # docs/algorithms.md section 2
    def _lars(self, w, g, st, lr, adapt, wd):
        hp = self.hp
        mu, eta, eps = hp.get("momentum", 0.9), hp.get("eta", 1e-3), hp.get("eps", 0.0)
        d = g + wd * w
        trust = _lars_trust(w, g, adapt, wd, eta, eps)
        if adapt and hp.get("trust_clip"):
            trust = min(trust, 1.0)
        v = mu * st.get("v", torch.zeros_like(w)) + lr * trust * d
        st["v"] = v
        if hp.get("nesterov"):
            return w - (mu * v + lr * trust * d)
        return w - v

    # docs/algorithms.md section 4
    def _tvlars(self, w, g, st, lr, adapt, wd):
        hp = self.hp
        mu, eta, eps = hp.get("momentum", 0.9), hp.get("eta", 1e-3), hp.get("eps", 0.0)
        lam, alpha, delay, gmin = hp.get("lam", 1e-4), hp.get("alpha", 1.0), hp.get("delay", 0), hp.get("gamma_min", 0.0)
        phi = 1.0 / (alpha + math.exp(lam * (self.t - delay))) + gmin
        d = g + wd * w
        trust = _lars_trust(w, g, adapt, wd, eta, eps)
        gamma = lr * phi * trust
        b = mu * st.get("b", torch.zeros_like(w)) - gamma * d
        st["b"] = b
        return w + mu * b - gamma * d

    # docs/algorithms.md section 3
    def _lamb(self, w, g, st, lr, adapt, wd):
        hp = self.hp
        b1, b2 = hp.get("betas", (0.9, 0.999))
        eps, max_trust = hp.get("eps", 1e-6), hp.get("max_trust")
        t = st.get("t", 0)
        m = b1 * st.get("m", torch.zeros_like(w)) + (1 - b1) * g
        v = b2 * st.get("v", torch.zeros_like(w)) + (1 - b2) * g * g
        st.update(m=m, v=v, t=t + 1)
        # 1 - b^(t+1) exactly (in rationals), then rounded once: no cancellation
        bc1, bc2 = (float(1 - Fraction(b) ** (t + 1)) for b in (b1, b2))
        r = (m / bc1) / (torch.sqrt(v / bc2) + eps) + wd * w
        trust = 1.0
        if adapt:
            wn, rn = _norm(w), _norm(r)
            if wn > 0 and rn > 0:
                trust = wn / rn
            if max_trust is not None:
                trust = min(max(trust, 0.0), max_trust)
        return w - lr * trust * r

    # docs/algorithms.md section 5
    def _lalc(self, w, g, st, lr, adapt, wd):
        hp = self.hp
        mu, eta, eps = hp.get("momentum", 0.9), hp.get("eta", 0.01), hp.get("eps", 1e-8)
        damp, nesterov = hp.get("dampening", 0.0), hp.get("nesterov", False)
        d = g + wd * w
        if mu != 0:
            buf = d.clone() if "buf" not in st else mu * st["buf"] + (1 - damp) * d
            st["buf"] = buf
            h = d + mu * buf if nesterov else buf
        else:
            h = d
        lr_k = lr
        if adapt:
            wn, hn = _norm(w), _norm(h)
            if wn * hn > 0:
                lr_k = min(lr, eta * wn / (hn + eps))
        st.setdefault("lr_k", []).append(lr_k)
        return w - lr_k * h
