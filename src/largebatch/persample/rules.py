"""Per-layer rules: exact squared per-sample gradient norms from what the hooks see.

A rule gets the module, the module's input ``x`` (whole micro-batch, batch dimension 0),
the gradient ``d`` of the backward loss w.r.t. the module's output, the number ``n`` of
leading samples to measure, the names of the parameters wanted and a memory budget. It
returns ``{param_name: Tensor[n]}`` with ``||c_i||^2`` where ``c_i`` is sample ``i``'s
additive contribution to that parameter's gradient (``sum_i c_i`` is exactly the gradient
autograd accumulates). The loss scale is applied by the tracker, not here.

Methods, per layer (``L`` = positions per sample: sequence length or output pixels):

* ``Linear`` on ``[B, in]``: ghost norm ``||a_i||^2 * ||d_i||^2`` (exact: the per-sample
  gradient is the outer product ``d_i a_i^T``).
* ``Linear`` on ``[B, ..., in]`` and ``Conv1d/2d/3d``: the per-sample gradient is
  ``G_i = D_i U_i^T`` (``U_i``: inputs or unfolded patches, ``D_i``: output gradients).
  Either materialize ``G_i`` (cost ``out * in * L`` per sample; for convolutions one grouped
  ``convolution_backward`` with ``groups = chunk * groups`` gives all ``G_i`` of a chunk at
  once, without unfolding) or use the Gram identity
  ``||G_i||^2 = sum_{s,t} (u_s . u_t)(d_s . d_t)`` (cost ``L^2 (in + out)``), whichever
  needs fewer multiply-adds. Work is done in chunks of samples so that the temporary
  tensors of one chunk stay under ``budget`` bytes (at least one sample per chunk).
* ``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``: the affine gradients of
  sample ``i`` are ``sum_{non-batch, non-channel dims} d_i * x_hat_i`` and ``sum d_i``, with
  ``x_hat`` recomputed from the input and the statistics the layer normalized with (batch
  statistics in training mode: then ``c_i`` is the sample's additive contribution, docs/algorithms.md
  "CLARS").
* ``Embedding``: ``||G_i||^2 = sum_{s,t} [idx_s == idx_t] (d_s . d_t)`` (rows hit twice add
  up), honouring ``padding_idx`` and ``scale_grad_by_freq``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["rule_for", "SUPPORTED", "UnsupportedLayerError"]


class UnsupportedLayerError(TypeError):
    """A module owns trainable parameters but no exact per-sample rule exists for it."""


def _f(t: Tensor) -> Tensor:
    """Compute in float32 at least (half-precision activations under autocast)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _chunks(n: int, per_sample_bytes: float, budget: int):
    size = max(1, int(budget // max(per_sample_bytes, 1)))
    for s in range(0, n, size):
        yield s, min(n, s + size)


def _outer_sqnorm(d: Tensor, a: Tensor, budget: int) -> Tensor:
    """``||sum_t d[i,t] a[i,t]^T||_F^2`` for each ``i``; ``d: [n, T, p]``, ``a: [n, T, q]``."""
    n, T, p = d.shape
    q = a.shape[2]
    if T == 1:
        return a[:, 0].pow(2).sum(1) * d[:, 0].pow(2).sum(1)
    es = 4
    out = []
    if T * T * (p + q) < T * p * q:  # Gram identity
        for s, e in _chunks(n, es * 2 * T * T, budget):
            aa = torch.bmm(a[s:e], a[s:e].transpose(1, 2))
            dd = torch.bmm(d[s:e], d[s:e].transpose(1, 2))
            out.append(torch.linalg.vecdot(aa.reshape(e - s, -1), dd.reshape(e - s, -1)).clamp_min(0))
    else:  # materialize one chunk of per-sample gradients at a time
        for s, e in _chunks(n, es * p * q, budget):
            out.append(torch.linalg.vector_norm(torch.bmm(d[s:e].transpose(1, 2), a[s:e]).flatten(1), dim=1).square())
    return torch.cat(out)


def _need_batch(module: nn.Module, x: Tensor, min_dim: int) -> None:
    if x.dim() < min_dim:
        raise ValueError(
            f"{type(module).__name__}: input of shape {tuple(x.shape)} has no batch dimension; "
            "per-sample norms need batched inputs with the batch in dimension 0"
        )


# ---------------------------------------------------------------------------- Linear
def linear_rule(m: nn.Linear, x, d, n, want, budget):
    _need_batch(m, x, 2)
    a = _f(x[:n]).reshape(n, -1, m.in_features)
    g = _f(d[:n]).reshape(n, -1, m.out_features)
    out = {}
    if "weight" in want:
        out["weight"] = _outer_sqnorm(g, a, budget)
    if "bias" in want:
        out["bias"] = g.sum(1).pow(2).sum(1)
    return out


# ---------------------------------------------------------------------------- Conv
def _explicit_padding(m: nn.modules.conv._ConvNd, x: Tensor):
    """Return (input padded as the layer pads it, numeric padding left for the conv)."""
    nd = x.dim() - 2
    if m.padding_mode != "zeros":
        return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), (0,) * nd
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return x, (0,) * nd
        pads = []  # "same": total = dilation * (k - 1), extra on the right (as PyTorch does)
        for k, dil in zip(reversed(m.kernel_size), reversed(m.dilation)):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * nd
    return x, tuple(m.padding)


def conv_rule(m: nn.modules.conv._ConvNd, x, d, n, want, budget):
    nd = len(m.kernel_size)
    _need_batch(m, x, nd + 2)
    d = _f(d[:n])
    out = {}
    if "bias" in want:
        out["bias"] = d.flatten(2).sum(2).pow(2).sum(1)
    if "weight" not in want:
        return out
    x, padding = _explicit_padding(m, _f(x[:n]))
    g, cin, cout = m.groups, m.in_channels, m.out_channels
    kk = math.prod(m.kernel_size)
    L = math.prod(d.shape[2:])
    es = 4
    mat_cost = cout * (cin // g) * kk * L
    gram_cost = L * L * (cin * kk + cout)
    res = []
    if nd <= 2 and gram_cost < mat_cost:
        k2 = tuple(m.kernel_size) if nd == 2 else (1, m.kernel_size[0])
        dil = tuple(m.dilation) if nd == 2 else (1, m.dilation[0])
        st = tuple(m.stride) if nd == 2 else (1, m.stride[0])
        pad = tuple(padding) if nd == 2 else (0, padding[0])
        x4 = x if nd == 2 else x.unsqueeze(2)
        per = es * (cin * kk * L + 2 * g * L * L)
        for s, e in _chunks(n, per, budget):
            c = e - s
            u = F.unfold(x4[s:e], k2, dilation=dil, padding=pad, stride=st)
            u = u.reshape(c, g, (cin // g) * kk, L)
            dg = d[s:e].reshape(c, g, cout // g, L)
            uu = u.transpose(2, 3) @ u
            dd = dg.transpose(2, 3) @ dg
            res.append(torch.linalg.vecdot(uu.reshape(c, -1), dd.reshape(c, -1)).clamp_min(0))
    else:
        per = es * cout * (cin // g) * kk * 2
        for s, e in _chunks(n, per, budget):
            c = e - s
            xs = x[s:e].reshape(1, c * cin, *x.shape[2:])
            ds = d[s:e].reshape(1, c * cout, *d.shape[2:])
            wsize = (c * cout, cin // g, *m.kernel_size)
            w = ds.new_empty(1).expand(wsize)
            gw = torch.ops.aten.convolution_backward(
                ds, xs, w, None, list(m.stride), list(padding), list(m.dilation),
                False, [0] * nd, c * g, [False, True, False])[1]
            res.append(torch.linalg.vector_norm(gw.reshape(c, -1), dim=1).square())
    out["weight"] = torch.cat(res)
    return out


# ---------------------------------------------------------------------------- normalization
def _sum(t: Tensor, dims: tuple) -> Tensor:
    return t.sum(dims) if dims else t  # (t.sum(()) would sum over everything)


def _affine_from_xhat(xhat_fn, d, n, reduce_dims, want, budget, row_bytes):
    out = {}
    if "weight" in want:
        parts = []
        for s, e in _chunks(n, row_bytes * 2, budget):
            parts.append(_sum(d[s:e] * xhat_fn(s, e), reduce_dims).flatten(1).pow(2).sum(1))
        out["weight"] = torch.cat(parts)
    if "bias" in want:
        out["bias"] = _sum(d[:n], reduce_dims).flatten(1).pow(2).sum(1)
    return out


def batchnorm_rule(m: nn.modules.batchnorm._BatchNorm, x, d, n, want, budget):
    _need_batch(m, x, 2)
    x, d = _f(x), _f(d)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if m.training or (m.running_mean is None and m.running_var is None):
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    else:
        mean, var = m.running_mean.view(shape).to(x.dtype), m.running_var.view(shape).to(x.dtype)
    invstd = torch.rsqrt(var + m.eps)
    red = tuple(range(2, x.dim()))
    row = x[0].numel() * x.element_size()
    return _affine_from_xhat(lambda s, e: (x[s:e] - mean) * invstd, d, n, red, want, budget, row)


def _last_dims_norm_rule(m, x, d, n, want, budget, normalize):
    """LayerNorm / RMSNorm: ``x_hat = normalize(x rows)`` over the last ``len(normalized_shape)`` dims."""
    k = len(m.normalized_shape)
    _need_batch(m, x, k + 1)
    x, d = _f(x), _f(d)
    red = tuple(range(1, x.dim() - k))
    row = x[0].numel() * x.element_size()
    return _affine_from_xhat(lambda s, e: normalize(x[s:e]), d, n, red, want, budget, row)


def layernorm_rule(m: nn.LayerNorm, x, d, n, want, budget):
    return _last_dims_norm_rule(m, x, d, n, want, budget,
                                lambda xs: F.layer_norm(xs, m.normalized_shape, None, None, m.eps))


def rmsnorm_rule(m, x, d, n, want, budget):
    return _last_dims_norm_rule(m, x, d, n, want, budget, lambda xs: F.rms_norm(xs, m.normalized_shape, None, m.eps))


def groupnorm_rule(m: nn.GroupNorm, x, d, n, want, budget):
    _need_batch(m, x, 2)
    x, d = _f(x), _f(d)
    red = tuple(range(2, x.dim()))
    row = x[0].numel() * x.element_size()
    fn = lambda s, e: F.group_norm(x[s:e], m.num_groups, None, None, m.eps)  # noqa: E731
    return _affine_from_xhat(fn, d, n, red, want, budget, row)


# ---------------------------------------------------------------------------- Embedding
def embedding_rule(m: nn.Embedding, x, d, n, want, budget):
    _need_batch(m, x, 1)
    idx_all = x
    idx = x[:n].reshape(n, -1)
    g = _f(d[:n]).reshape(n, idx.shape[1], m.embedding_dim)
    if m.padding_idx is not None:
        g = g * (idx != m.padding_idx).unsqueeze(-1).to(g.dtype)
    if m.scale_grad_by_freq:  # counts over the whole micro-batch, as autograd uses them
        counts = torch.zeros(m.num_embeddings, device=g.device, dtype=g.dtype)
        counts.index_add_(0, idx_all.reshape(-1), torch.ones_like(idx_all.reshape(-1), dtype=g.dtype))
        g = g / counts[idx].unsqueeze(-1)
    T = idx.shape[1]
    if T == 1:
        return {"weight": g[:, 0].pow(2).sum(1)}
    parts = []
    for s, e in _chunks(n, 4 * 2 * T * T, budget):
        same = (idx[s:e].unsqueeze(2) == idx[s:e].unsqueeze(1)).to(g.dtype)
        gg = torch.bmm(g[s:e], g[s:e].transpose(1, 2))
        parts.append((gg * same).sum((1, 2)).clamp_min(0))
    return {"weight": torch.cat(parts)}


# ---------------------------------------------------------------------------- registry
Rule = Callable[..., dict]

_UNSUPPORTED_SUBCLASSES: tuple[type, ...] = (
    nn.SyncBatchNorm,  # normalizes with statistics of all ranks: x_hat cannot be rebuilt locally
    nn.modules.conv._ConvTransposeNd,
)

SUPPORTED: list[tuple[type, Rule]] = [
    (nn.Linear, linear_rule),
    (nn.modules.conv._ConvNd, conv_rule),
    (nn.modules.batchnorm._BatchNorm, batchnorm_rule),
    (nn.LayerNorm, layernorm_rule),
    (nn.GroupNorm, groupnorm_rule),
    (nn.Embedding, embedding_rule),
]
if hasattr(nn, "RMSNorm"):
    SUPPORTED.append((nn.RMSNorm, rmsnorm_rule))


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s own parameters, or ``None`` if there is none."""
    if isinstance(module, _UNSUPPORTED_SUBCLASSES):
        return None
    for cls, rule in SUPPORTED:
        if isinstance(module, cls):
            return rule
    return None
