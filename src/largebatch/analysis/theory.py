"""Closed forms and theoretical per-block factors of the LALC paper ("Training instability and
disharmony between ReLU and batch normalization").

* Proposition 1 (eq. 1-2): mean and variance of ``ReLU(N(mu, sigma^2))``.
* Theorem 1 (eq. 3): per-block factor ``pi/(pi-1)`` of ``sum_i Var(x_i) Var(g_i)`` for
  ``x^{n+1} = BN(W ReLU(x^n))`` with independent zero-centred Gaussian inputs.
* Corollary 2 (eq. 5): factor ``1`` in the pseudo-linear limit ``sigma/mu -> 0``.
* Theorem 2 (eq. 6): the paper's value ``pi/(pi+2)`` for perfectly correlated inputs
  ``x^n = b t``. Its proof (eq. 24) drops the term ``-sqrt(2/pi) E[mu (P+N)]`` (it is not 0,
  because ``mu = (P+N)/sqrt(2 pi)``) and writes ``1/2 + 1/(2 pi)`` as ``(pi+2)/(2 pi)``.
  Redoing eq. 23-24 gives ``E[sigma_hat_j^2] = (pi-1)/(2 pi) sigma_w^2 sum t^2`` and the
  same Jensen bound ``pi/(pi-1)`` as Theorem 1; see :func:`thm2_expected_prenorm_var` and
  docs/explosion.md. Both numbers are exported; the tests measure against both.

The generalisation used for other activations (Fig. 1b) follows the proof of Theorem 1
(eq. 16-19) with ``ReLU`` replaced by ``f``: the forward variance shrinks by ``Var f(z)``
while the backward variance is multiplied by ``E[f'(z)^2]``, so the per-block factor is
``E[f'(z)^2] / Var f(z)`` for ``z ~ N(0, 1)`` (equality case of Jensen's inequality).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy.special import ndtr

THM1_FACTOR = math.pi / (math.pi - 1.0)
"""Theorem 1, eq. 3: per-block variance factor for BN + ReLU, independent inputs (~1.4669)."""
COR2_FACTOR = 1.0
"""Corollary 2, eq. 5: pseudo-linear limit."""
THM2_PAPER_FACTOR = math.pi / (math.pi + 2.0)
"""Theorem 2 as printed (eq. 6), ~0.6110. See the module docstring for why it is not reached."""
THM2_CORRECTED_FACTOR = math.pi / (math.pi - 1.0)
"""Jensen bound of Theorem 2's construction after correcting eq. 24 (equals Theorem 1's)."""


def _check_sigma(sigma) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64)
    if np.any(~np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"sigma must be finite and > 0, got {sigma!r}")
    return s


def relu_gaussian_mean(mu, sigma):
    """Proposition 1, eq. 1: ``E[max(Y, 0)]`` for ``Y ~ N(mu, sigma^2)`` (elementwise)."""
    mu = np.asarray(mu, dtype=np.float64)
    s = _check_sigma(sigma)
    z = mu / s
    return mu * (1.0 - ndtr(-z)) + s / math.sqrt(2 * math.pi) * np.exp(-0.5 * z * z)


def relu_gaussian_var(mu, sigma):
    """Proposition 1, eq. 2: ``Var[max(Y, 0)]`` for ``Y ~ N(mu, sigma^2)`` (elementwise)."""
    mu = np.asarray(mu, dtype=np.float64)
    s = _check_sigma(sigma)
    z = mu / s
    pdf_term = s / math.sqrt(2 * math.pi) * np.exp(-0.5 * z * z)
    second = (s * s + mu * mu) * (1.0 - ndtr(-z)) + mu * pdf_term
    return second - relu_gaussian_mean(mu, s) ** 2


def relu_gaussian_monte_carlo(mu: float, sigma: float, n: int = 4_000_000, seed: int = 0):
    """Monte Carlo estimate of ``(E, Var)`` of ``ReLU(N(mu, sigma^2))`` with ``n`` samples."""
    _check_sigma(sigma)
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(mu, sigma, size=n), 0.0)
    return float(x.mean()), float(x.var(ddof=1))


def prop1_grid(mus, sigmas, n: int = 4_000_000, seed: int = 0) -> list[dict]:
    """Proposition 1 vs Monte Carlo on a grid: one row per ``(mu, sigma)`` with relative errors."""
    rows = []
    for i, mu in enumerate(mus):
        for j, sigma in enumerate(sigmas):
            m_mc, v_mc = relu_gaussian_monte_carlo(mu, sigma, n=n, seed=seed + 1000 * i + j)
            m_th = float(relu_gaussian_mean(mu, sigma))
            v_th = float(relu_gaussian_var(mu, sigma))
            rows.append({
                "mu": float(mu), "sigma": float(sigma),
                "mean_theory": m_th, "mean_mc": m_mc, "mean_rel_err": abs(m_mc - m_th) / abs(m_th),
                "var_theory": v_th, "var_mc": v_mc, "var_rel_err": abs(v_mc - v_th) / abs(v_th),
            })
    return rows


def relu_block_factor(mu, sigma) -> float:
    """Jensen-equality per-block factor of ``BN(W ReLU(x))`` for independent ``x_i ~ N(mu_i, sigma_i^2)``.

    Following eq. 14-19 with Proposition 1 for the forward variance and ``P(x_i > 0) =
    Phi(mu_i/sigma_i)`` for the fraction of the gradient that passes the ReLU::

        sum_i sigma_i^2 Phi(mu_i/sigma_i) / sum_k Var(ReLU(x_k))

    ``mu = 0`` gives Theorem 1's ``pi/(pi-1)``; ``sigma/mu -> 0`` gives Corollary 2's ``1``.
    """
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    s = np.broadcast_to(_check_sigma(sigma), mu.shape)
    passed = np.sum(s * s * ndtr(mu / s))
    fwd = np.sum(relu_gaussian_var(mu, s))
    if fwd <= 0:
        raise ValueError("every input is blocked by the ReLU (forward variance 0)")
    return float(passed / fwd)


def activation_factor(fn: Callable, n_grid: int = 400_001, limit: float = 12.0) -> float:
    """Per-block factor ``E[f'(z)^2] / Var f(z)``, ``z ~ N(0,1)``, for a deterministic activation.

    ``fn`` maps a torch tensor to a torch tensor elementwise; ``f'`` comes from autograd.
    The Gaussian expectations use the trapezoid rule on ``[-limit, limit]``.
    """
    import torch

    z = torch.linspace(-limit, limit, n_grid, dtype=torch.float64, requires_grad=True)
    y = fn(z)
    (dy,) = torch.autograd.grad(y.sum(), z)
    zz = z.detach().numpy()
    w = np.exp(-0.5 * zz * zz) / math.sqrt(2 * math.pi)
    yv, dv = y.detach().numpy(), dy.numpy()
    ey = np.trapezoid(w * yv, zz)
    vy = np.trapezoid(w * yv * yv, zz) - ey * ey
    ed2 = np.trapezoid(w * dv * dv, zz)
    if vy <= 0:
        raise ValueError("activation has zero output variance under N(0,1)")
    return float(ed2 / vy)


def thm2_prenorm_var(weight: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Eq. 23: batch variance of ``hat x_j = sum_i W_ij ReLU(b t_i)``, ``b ~ N(0,1)``.

    ``weight`` has PyTorch layout ``(d_out, d_in)``. With ``P_j = sum_i W_ij ReLU(t_i)`` and
    ``N_j = sum_i W_ij ReLU(-t_i)``: ``Var = (P_j^2 + N_j^2)/2 - (P_j + N_j)^2/(2 pi)``.
    """
    w = np.asarray(weight, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    p = w @ np.maximum(t, 0.0)
    q = w @ np.maximum(-t, 0.0)
    return 0.5 * (p * p + q * q) - (p + q) ** 2 / (2 * math.pi)


def thm2_expected_prenorm_var(sigma_w2: float, t: np.ndarray) -> float:
    """Corrected eq. 24: ``E_W[Var hat x_j] = (pi-1)/(2 pi) sigma_w^2 sum_i t_i^2``.

    (The paper prints ``(1/2 + 1/(2 pi))``: it sets ``E[mu (P+N)] = 0``, but
    ``mu = (P+N)/sqrt(2 pi)`` so that term is ``-(1/pi) sigma_w^2 sum t^2``.)
    """
    return (math.pi - 1) / (2 * math.pi) * sigma_w2 * float(np.sum(np.asarray(t) ** 2))


def thm2_conditional_factor(weight: np.ndarray, t: np.ndarray, eps: float = 0.0) -> float:
    """Large-batch value of Theorem 2's ratio for one fixed draw of ``W`` and ``t`` (BN gamma=1).

    Eq. 16 without Jensen's step: ``Var(g_i) = 1/2 sum_j Var(g_j) W_ij^2 / sigma_hat_j^2`` for
    i.i.d. upstream gradients, so the ratio ``sum_i t_i^2 Var(g_i) / sum_j Var(g_j)`` is
    ``1/(2 d_out) sum_j (sum_i t_i^2 W_ij^2) / sigma_hat_j^2``. ``sigma_hat_j^2`` is a
    2-degree-of-freedom quadratic form in Gaussians, so ``E_W[1/sigma_hat_j^2]`` diverges
    (logarithmically): this value is heavy-tailed over draws and grows with ``d_out``.
    ``eps`` is BatchNorm's variance epsilon (``1/(sigma_hat^2 + eps)``), which caps that tail.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    w = np.asarray(weight, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    var = thm2_prenorm_var(w, t)
    num = (w * w) @ (t * t)
    return float(np.sum(num / (var + eps)) / (2 * w.shape[0]))
