"""Measure the gradient explosion rate at initialization (LALC paper, Fig. 1 and Theorems 1-2).

Definitions used throughout (``g^n = dL/dx^n`` is the gradient w.r.t. the output ``x^n`` of
the ``n``-th normalized block, counted from the input, ``N`` = the block nearest the output):

* ``Var(g^n)`` is ``sum_i Var_batch(g^n_i)``: the unbiased variance over the batch of every
  coordinate ``i`` of the block output (a unit of an MLP, a ``(channel, pixel)`` of a conv
  net, a ``(token, feature)`` of a transformer), summed over coordinates. This is the
  ``sum_i Var(g_i)`` of Theorem 1 (eq. 3), whose ``Var(x_i)`` weights are 1 after BN with
  ``gamma = 1``. The weighted form ``sum_i Var(x_i) Var(g_i)`` is recorded as well.
* the explosion rate (Fig. 1) of block ``n`` is ``sqrt(Var(g^n) / Var(g^N))``.
* the per-block variance factor is ``Var(g^n) / Var(g^{n+1})``; it is estimated robustly
  as ``exp(-slope)`` of a least-squares line through ``log Var(g^n)`` over the middle
  blocks (the first and last ``trim`` fraction are dropped: the stem sees raw data and the
  last block sees the loss directly). This equals the geometric mean of the consecutive
  ratios when the line fits exactly.

The loss is ``sum(R * x^N)`` with ``R ~ N(0, 1)`` drawn independently of the input, so the
upstream gradient is uncorrelated with the input as Theorem 1 assumes (``loss="ce"`` uses a
linear head and cross-entropy with random labels instead).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from . import architectures as A
from . import theory


@contextmanager
def record_blocks(model: nn.Module, types=A.NORM_TYPES, exclude: tuple[str, ...] = ()):
    """Record output and output-gradient of every normalization module call, in forward order.

    Yields a list that fills with ``{"name", "inp", "out", "grad"}`` dicts (tensors detached,
    ``grad`` set during backward). Works for any ``nn.Module``, e.g. torchvision models.
    """
    records: list[dict] = []
    handles = []

    def make_hook(name):
        def hook(module, inputs, out):
            rec = {"name": name, "inp": inputs[0].detach(), "out": out.detach(), "grad": None}
            records.append(rec)
            if out.requires_grad:
                out.register_hook(lambda g, rec=rec: rec.__setitem__("grad", g.detach()))
        return hook

    for name, m in A.norm_modules(model, types):
        if any(e in name for e in exclude):
            continue
        handles.append(m.register_forward_hook(make_hook(name)))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def block_stats(out: torch.Tensor, grad: torch.Tensor) -> dict:
    """Per-block statistics from a block output and its gradient (batch dimension first)."""
    b = out.shape[0]
    if b < 2:
        raise ValueError(f"batch size must be >= 2 to estimate variances, got {b}")
    x = out.reshape(b, -1).double()
    g = grad.reshape(b, -1).double()
    vx = x.var(0)
    vg = g.var(0)
    return {
        "var_g": float(vg.sum()), "var_g_mean": float(vg.mean()),
        "var_x_mean": float(vx.mean()), "weighted": float((vx * vg).sum()),
    }


def measure_gradients(model: nn.Module, x: torch.Tensor, loss: str = "projection", seed: int = 0,
                      num_classes: int = 10, exclude: tuple[str, ...] = ()) -> list[dict]:
    """One forward/backward pass in train mode; returns :func:`block_stats` per normalized block."""
    if loss not in ("projection", "ce"):
        raise ValueError(f"loss must be 'projection' or 'ce', got {loss!r}")
    gen = torch.Generator().manual_seed(10_000 + seed)
    model.train()
    with record_blocks(model, exclude=exclude) as recs:
        y = model(x)
        if loss == "projection":
            r = torch.randn(y.shape, generator=gen, dtype=y.dtype)
            obj = (r * y).sum()
        else:
            feat = y.flatten(2).mean(2) if y.dim() > 2 and y.dim() != 3 else (y.mean(1) if y.dim() == 3 else y)
            head = nn.Linear(feat.shape[1], num_classes)
            labels = torch.randint(num_classes, (y.shape[0],), generator=gen)
            obj = nn.functional.cross_entropy(head(feat), labels, reduction="sum")
        obj.backward()
    out = []
    for r in recs:
        if r["grad"] is None:
            continue
        st = block_stats(r["out"], r["grad"])
        st["name"] = r["name"]
        out.append(st)
    if not out:
        raise ValueError("model has no normalization layer on the gradient path")
    return out


def rates(var_g) -> np.ndarray:
    """Fig. 1 explosion rate ``sqrt(Var(g^n) / Var(g^N))`` per block (input side first)."""
    v = np.asarray(var_g, dtype=np.float64)
    return np.sqrt(v / v[-1])


def per_block_factor(var_g, trim: float = 0.25) -> float:
    """Robust per-block factor ``Var(g^n)/Var(g^{n+1})``: ``exp(-slope)`` of ``log Var(g^n)``
    vs ``n`` over the blocks left after dropping ``trim`` of them at each end."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    v = np.log(np.asarray(var_g, dtype=np.float64))
    n = len(v)
    k = int(math.floor(trim * n))
    idx = np.arange(k, n - k)
    if len(idx) < 2:
        raise ValueError(f"need at least 2 blocks after trimming, got {len(idx)} of {n}")
    slope = np.polyfit(idx, v[idx], 1)[0]
    return float(math.exp(-slope))


def measure_architecture(arch: str, act: str = "relu", depth: int = 20, width: int = 512,
                         batch: int = 1024, seeds=(0, 1, 2), loss: str = "projection",
                         trim: float = 0.25, image_size: int = 16, in_dim: int = 64,
                         dtype=torch.float32) -> dict:
    """Fig. 1 measurement for one architecture/activation, over several seeds.

    Returns the per-seed ``Var(g^n)`` curves, the mean and std (over seeds) of the rates and
    of the per-block factor, and the theoretical factor where one applies.
    """
    if batch < 2:
        raise ValueError(f"batch must be >= 2, got {batch}")
    if not seeds:
        raise ValueError("seeds must be a non-empty sequence")
    curves, factors, names = [], [], None
    exclude = ("shortcut",) if arch == "resnet-bn" else ()
    for s in seeds:
        torch.manual_seed(s)
        model, shape = A.build(arch, depth, width, act, in_dim=in_dim, image_size=image_size)
        model = model.to(dtype)
        gen = torch.Generator().manual_seed(s)
        x = torch.randn((batch, *shape), generator=gen, dtype=dtype)
        st = measure_gradients(model, x, loss=loss, seed=s, exclude=exclude)
        v = [b["var_g"] for b in st]
        names = [b["name"] for b in st]
        curves.append(v)
        factors.append(per_block_factor(v, trim))
    r = np.array([rates(c) for c in curves])
    factors = np.array(factors)
    return {
        "arch": arch, "act": act, "depth": depth, "width": width, "batch": batch,
        "seeds": list(seeds), "loss": loss, "trim": trim, "blocks": names,
        "var_g": [list(map(float, c)) for c in curves],
        "rate_mean": r.mean(0).tolist(), "rate_std": r.std(0).tolist(),
        "factor_mean": float(factors.mean()), "factor_std": float(factors.std()),
        "factors": factors.tolist(),
        "factor_theory": theory_factor(arch, act),
    }


def theory_factor(arch: str, act: str) -> float | None:
    """Reference per-block factor: ``E[f'^2]/Var f`` (Thm. 1 generalized) for ``mlp-bn``
    (dropout: 1), ``1`` for ``mlp-ln``, Theorem 1's ``pi/(pi-1)`` as a reference for the other
    BN + ReLU nets (whose spatial correlations and residual paths the theory does not model)."""
    if arch == "mlp-ln":
        return 1.0
    if arch == "mlp-bn":
        if act == "dropout":
            return 1.0
        fn = A.make_activation(act)
        return theory.activation_factor(lambda z: fn(z))
    if arch.endswith("-bn") and act == "relu":
        return theory.THM1_FACTOR
    return None


def _seeded_block(seed: int, d_in: int, d_out: int):
    """``(generator, Linear(d_in, d_out), BatchNorm1d(d_out))`` in float64, seeded."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return gen, nn.Linear(d_in, d_out, bias=False).double(), nn.BatchNorm1d(d_out).double().train()


def single_block_correlated(d_in: int = 256, d_out: int = 512, batch: int = 16384, seed: int = 0) -> dict:
    """Theorem 2's construction: one block ``BN(W ReLU(b t))`` with ``b ~ N(0,1)`` per sample,
    fixed ``t``, and an upstream gradient drawn independently of the input.

    Returns the measured ratio ``sum_i Var(x_i^n) Var(g_i^n) / sum_j Var(x_j^{n+1}) Var(g_j^{n+1})``,
    the large-batch value for this draw of ``W`` (:func:`theory.thm2_conditional_factor`),
    the paper's bound ``pi/(pi+2)`` and the corrected Jensen bound ``pi/(pi-1)``.
    """
    gen, lin, bn = _seeded_block(seed, d_in, d_out)
    t = torch.randn(d_in, generator=gen, dtype=torch.float64)
    b = torch.randn(batch, 1, generator=gen, dtype=torch.float64)
    x = (b * t).requires_grad_(True)
    y = bn(lin(torch.relu(x)))
    y.retain_grad()
    up = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (up * y).sum().backward()
    vx, vg = x.detach().var(0), x.grad.var(0)
    vy, vgy = y.detach().var(0), y.grad.var(0)
    measured = float((vx * vg).sum() / (vy * vgy).sum())
    w = lin.weight.detach().numpy()
    tn = t.numpy()
    prenorm = theory.thm2_prenorm_var(w, tn)
    return {
        "d_in": d_in, "d_out": d_out, "batch": batch, "seed": seed,
        "measured": measured,
        "conditional": theory.thm2_conditional_factor(w, tn, eps=bn.eps),
        "conditional_no_eps": theory.thm2_conditional_factor(w, tn),
        "paper_bound": theory.THM2_PAPER_FACTOR,
        "corrected_bound": theory.THM2_CORRECTED_FACTOR,
        "prenorm_var_mean": float(prenorm.mean()),
        "prenorm_var_expected": theory.thm2_expected_prenorm_var(float((w ** 2).mean()), tn),
        "prenorm_var_min_over_mean": float(prenorm.min() / prenorm.mean()),
    }


def single_block_independent(mu: float = 0.0, sigma: float = 1.0, d_in: int = 512, d_out: int = 512,
                             batch: int = 8192, seed: int = 0) -> dict:
    """One block ``BN(W ReLU(x))`` with independent ``x_i ~ N(mu, sigma^2)`` and an independent
    upstream gradient: measured weighted ratio vs :func:`theory.relu_block_factor`
    (Theorem 1 at ``mu = 0``, Corollary 2 as ``sigma/mu -> 0``)."""
    gen, lin, bn = _seeded_block(seed, d_in, d_out)
    x = (mu + sigma * torch.randn(batch, d_in, generator=gen, dtype=torch.float64)).requires_grad_(True)
    y = bn(lin(torch.relu(x)))
    y.retain_grad()
    (torch.randn(y.shape, generator=gen, dtype=torch.float64) * y).sum().backward()
    measured = float((x.detach().var(0) * x.grad.var(0)).sum() / (y.detach().var(0) * y.grad.var(0)).sum())
    return {"mu": mu, "sigma": sigma, "measured": measured,
            "theory": theory.relu_block_factor(np.full(d_in, mu), sigma)}
