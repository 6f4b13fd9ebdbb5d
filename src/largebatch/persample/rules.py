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
* ``Linear`` on ``[B, ..., in]``: the per-sample gradient is ``G_i = D_i A_i^T`` (``A_i``:
  inputs, ``D_i``: output gradients). Either materialize ``G_i`` (cost ``out * in * L`` per
  sample) or use the Gram identity ``||G_i||^2 = sum_{s,t} (a_s . a_t)(d_s . d_t)`` (cost
  ``L^2 (in + out)``), whichever needs fewer multiply-adds.
* ``Conv1d/2d/3d``: materialize ``G_i`` (one grouped ``convolution_backward`` per chunk of
  samples) or a Gram identity over the input's Gram matrix and shifted windows (no
  unfolding), chosen per layer by a cost model from shapes: :func:`conv_weight_sqnorms`.
* All rules work in chunks of samples so that the temporary tensors of one chunk stay
  under ``budget`` bytes (at least one sample per chunk); convolutions on CPU also keep a
  chunk's working set cache-sized.
* ``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``: the affine gradients of
  sample ``i`` are ``sum_{non-batch, non-channel dims} d_i * x_hat_i`` and ``sum d_i``, with
  ``x_hat`` recomputed from the input and the statistics the layer normalized with (batch
  statistics in training mode: then ``c_i`` is the sample's additive contribution, docs/algorithms.md
  "CLARS").
* ``Embedding``: ``||G_i||^2 = sum_{s,t} [idx_s == idx_t] (d_s . d_t)`` (rows hit twice add
  up), honouring ``padding_idx`` and ``scale_grad_by_freq``.
"""

from __future__ import annotations

import itertools
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
CONV_ROUTES = ("grouped", "gram", "matmul")

# Cost model (see conv_weight_sqnorms): multiply-adds that cost as much as writing or
# reading one element in a memory-bound step (a stored per-sample gradient, a block added up).
_MEM_WEIGHT = 16

# On CPU a chunk's working set is kept near a core's L2 cache size (per intra-op thread),
# whatever max_chunk_bytes allows (see conv_weight_sqnorms).
_CPU_CHUNK_BYTES = 2 * 2**20


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


class ConvPlan:
    """Shapes, shifted windows and route costs of one convolution for one input shape.

    The input (already padded as the layer pads it, the numeric padding still to apply) is
    cropped to the extent the convolution reads, rounded up to whole strides, and split into
    its ``S = prod(stride)`` stride phases (a view when the stride is 1). In a phase image,
    with row-major flat positions, the inputs that kernel position ``a`` meets are the
    *contiguous* window ``[f_a, f_a + Lv)`` of phase ``p_a``, once the output gradient is
    zero-padded in its trailing spatial dims to the phase image's size (``Lv >= L`` positions;
    what a window sees at padded positions is multiplied by zero).
    """

    def __init__(self, m: nn.modules.conv._ConvNd, in_shape, out_shape, padding):
        nd = len(m.kernel_size)
        k, st, dil = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
        self.nd, self.st = nd, st
        self.g, self.cin, self.cout = m.groups, m.in_channels, m.out_channels
        O, I = tuple(out_shape[2:]), tuple(in_shape[2:])
        self.L, self.K = math.prod(O), math.prod(k)
        Q = [-(-((o - 1) * s + (kk - 1) * dl + 1) // s) for o, s, kk, dl in zip(O, st, k, dil)]  # phase image
        flat = [math.prod(Q[j + 1:]) for j in range(nd)]  # flat strides in a phase image
        self.Lv = O[0] * flat[0]
        self.offs = []  # (phase, flat shift) per kernel position
        for a in itertools.product(*(range(kk) for kk in k)):
            t = [ai * dl for ai, dl in zip(a, dil)]
            p = 0
            for tj, s in zip(t, st):
                p = p * s + tj % s
            self.offs.append((p, sum((tj // s) * f for tj, s, f in zip(t, st, flat))))
        need = max(f for _, f in self.offs) + self.Lv  # the last window ends inside the image:
        Q[0] += max(0, -(-(need - math.prod(Q)) // flat[0]))  # add zero rows if needed
        self.Q, self.S, self.Lq = Q, math.prod(st), math.prod(Q)
        self.pads = []  # F.pad order (last dim first); negative: crop what is never read
        for j in reversed(range(nd)):
            self.pads += [padding[j], Q[j] * st[j] - I[j] - padding[j]]
        self.out_pads = []
        for j in reversed(range(1, nd)):
            self.out_pads += [0, Q[j] - O[j]]
        rows: dict[int, list[int]] = {}
        for p, f in self.offs:
            r = rows.setdefault(p, [f, f])
            r[0], r[1] = min(r[0], f), max(r[1], f)
        self.rows = {p: (r0, r1 + self.Lv) for p, (r0, r1) in rows.items()}  # of each phase, for "gram"

    def phases(self, x: Tensor) -> Tensor:
        """``[S, c * groups, C_in / groups, Lq]``: the stride phases of the padded, cropped chunk."""
        c, nd = x.shape[0], self.nd
        xe = F.pad(x, self.pads)
        if self.S == 1:
            return xe.reshape(1, c * self.g, self.cin // self.g, self.Lq)
        shape = [c, self.cin]
        for q, s in zip(self.Q, self.st):
            shape += [q, s]
        perm = [3 + 2 * j for j in range(nd)] + [0, 1] + [2 + 2 * j for j in range(nd)]
        return xe.view(shape).permute(perm).reshape(self.S, c * self.g, self.cin // self.g, self.Lq)

    def out_grad(self, d: Tensor) -> Tensor:
        """``[c * groups, C_out / groups, Lv]``: the chunk's output gradient, trailing dims zero-padded."""
        if any(self.out_pads):
            d = F.pad(d, self.out_pads)
        return d.reshape(d.shape[0] * self.g, self.cout // self.g, self.Lv)

    def costs(self) -> dict[str, float]:
        """Multiply-add equivalents per sample of materializing ``G_i`` and of the Gram route."""
        g, cin, cout, K, Lv, W = self.g, self.cin, self.cout, self.K, self.Lv, _MEM_WEIGHT
        rows = sum((r1 - r0) ** 2 for r0, r1 in self.rows.values())
        return {"materialize": K * cout * (cin // g) * (self.L + 2 * W),
                "gram": cin * rows + cout * Lv * Lv + W * g * (rows + (2 * K + 3) * Lv * Lv)}

    def route(self) -> str:
        """The route :func:`conv_weight_sqnorms` takes: ``"gram"`` if it costs less, else ``"grouped"``."""
        c = self.costs()
        return "gram" if c["gram"] < c["materialize"] else "grouped"


def conv_plan(m: nn.modules.conv._ConvNd, x: Tensor, d: Tensor) -> tuple[ConvPlan, Tensor, tuple]:
    """``(plan, input padded as the layer pads it, numeric padding)`` for input ``x`` and output gradient ``d``."""
    xp, padding = _explicit_padding(m, x)
    return ConvPlan(m, xp.shape, d.shape, padding), xp, padding


def _conv_grouped(m, plan: ConvPlan, x: Tensor, d: Tensor, padding, budget: int) -> Tensor:
    nd = len(m.kernel_size)
    g, cin, cout = m.groups, m.in_channels, m.out_channels
    per = x.element_size() * (plan.K * cout * (cin // g) + x[0].numel() + d[0].numel())
    res = []
    for s, e in _chunks(x.shape[0], per, budget):
        c = e - s
        xs = x[s:e].reshape(1, c * cin, *x.shape[2:])
        ds = d[s:e].reshape(1, c * cout, *d.shape[2:])
        w = ds.new_empty(1).expand(c * cout, cin // g, *m.kernel_size)
        gw = torch.ops.aten.convolution_backward(
            ds, xs, w, None, list(m.stride), list(padding), list(m.dilation),
            False, [0] * nd, c * g, [False, True, False])[1]
        res.append(torch.linalg.vector_norm(gw.reshape(c, -1), dim=1).square())
    return torch.cat(res)


def _conv_gram(plan: ConvPlan, x: Tensor, d: Tensor, budget: int) -> Tensor:
    g, Lv = plan.g, plan.Lv
    rmax = max(r1 - r0 for r0, r1 in plan.rows.values())
    per = x.element_size() * (g * (rmax * rmax + 2 * Lv * Lv) + 2 * plan.cin * plan.Lq * plan.S + plan.cout * Lv)
    res = []
    for s, e in _chunks(x.shape[0], per, budget):
        c = e - s
        X, D = plan.phases(x[s:e]), plan.out_grad(d[s:e])
        uu = None  # sum over kernel positions of the windows' blocks of the input Gram matrices
        for p, (r0, r1) in plan.rows.items():
            xr = X[p, :, :, r0:r1]
            P = torch.bmm(xr.transpose(1, 2), xr)
            for q, f in plan.offs:
                if q == p:
                    blk = P[:, f - r0:f - r0 + Lv, f - r0:f - r0 + Lv]
                    uu = blk.clone() if uu is None else uu.add_(blk)
            del P
        dd = torch.bmm(D.transpose(1, 2), D)
        # <uu_i, dd_i> as a batched matrix-vector product: one pass, no product temporary
        res.append(torch.bmm(uu.view(c, 1, -1), dd.view(c, -1, 1)).view(c).clamp_min(0))
    return torch.cat(res)


def _conv_matmul(plan: ConvPlan, x: Tensor, d: Tensor, budget: int) -> Tensor:
    g, K, Lv = plan.g, plan.K, plan.Lv
    co, ci = plan.cout // g, plan.cin // g
    per = x.element_size() * (K * plan.cout * ci + 2 * plan.cin * plan.Lq * plan.S + plan.cout * Lv)
    res = []
    for s, e in _chunks(x.shape[0], per, budget):
        c = e - s
        X, D = plan.phases(x[s:e]), plan.out_grad(d[s:e])
        G = D.new_empty(K, c * g, co, ci)
        for i, (p, f) in enumerate(plan.offs):
            torch.bmm(D, X[p, :, :, f:f + Lv].transpose(1, 2), out=G[i])
        res.append(torch.linalg.vector_norm(G.view(K, c, -1), dim=2).square().sum(0))
    return torch.cat(res)


def conv_weight_sqnorms(m: nn.modules.conv._ConvNd, x: Tensor, d: Tensor, budget: int = 64 * 2**20,
                        route: str | None = None) -> Tensor:
    """``||grad_W f_i||^2`` of each sample of a convolution, exactly, for input ``x`` and output
    gradient ``d`` (``[n, C, *spatial]`` each; float32 or float64; any stride, padding
    incl. ``"same"`` and reflect/circular, dilation, groups, 1-3 spatial dims).

    Sample ``i``'s weight gradient is ``G_i[o, (c, a)] = sum_s D_i[o, s] X_i[c, s*stride + a*dil]``
    (``s``: ``L`` output positions, ``a``: ``K = prod(kernel)`` kernel positions). Routes
    (``route``; all exact, tested against brute force):

    * ``"grouped"``: materialize ``G_i`` for a chunk of samples with one grouped
      ``convolution_backward`` (``groups = chunk * groups``), then its norm. Cost per sample
      ``K C_out C_in/g L`` multiply-adds and ``K C_out C_in/g`` stored elements.
    * ``"gram"``: ``||G_i||^2 = sum_a <D_i^T D_i, P_i[window_a, window_a]>`` with
      ``P_i = X_i^T X_i`` the Gram matrix of the *input* over one stride phase
      (:class:`ConvPlan`: kernel position ``a`` sees a contiguous window of a phase). Cost:
      ``C_in R^2`` (``R`` rows of the phase the windows cover, ~ input positions) ``+ C_out Lv^2``
      multiply-adds, and ``K g Lv^2`` elements added up. The Gram identity over unfolded
      patches (``L^2 (C_in K + C_out)``, what this rule did before) puts ``K`` on the
      multiply-adds; here it sits on additions: 3-9x fewer multiply-adds for 3x3 kernels.
    * ``"matmul"`` (never chosen; kept for comparison): materialize ``G_i`` with ``K`` batched
      matmuls of the output gradient with the shifted windows (no unfold copy). Same
      multiply-adds as ``"grouped"``, but on the CPU measured (AMD EPYC, Zen 5) ``torch.bmm``
      (MKL, ~45 GMAC/s per core) runs at about half the speed of oneDNN's convolution kernels
      (~80), and it was 1.2-2.2x slower than ``"grouped"`` where materializing is chosen.

    ``route=None`` picks by a cost model from shapes only (deterministic, no timing):
    ``"gram"`` when ``cost_gram < cost_materialize`` with ``cost = multiply-adds +
    _MEM_WEIGHT * stored/read elements`` (:meth:`ConvPlan.costs`; ``_MEM_WEIGHT = 16``
    multiply-adds per element of a memory-bound step), else ``"grouped"``. On CIFAR
    ResNet-18 this takes ``"grouped"`` for the 32x32 and 16x16 stages and ``"gram"`` for the
    8x8 and 4x4 stages and the strided 16->8 convolutions: the faster of the two for each of
    its 11 distinct convolutions in the measurement below. Per-sample costs (M) materialize vs gram,
    and measured ms (``benchmarks/persample_overhead.py --layers --threads 1 --clock cpu``:
    batch 128, float32, one thread, min of 7 interleaved rounds on a busy 2-core AMD EPYC;
    "plain": the batch weight gradient that backward computes anyway; "64M": 64 MiB chunks
    and the Gram identity over ``F.unfold`` patches, the rule before):

    =========================  ===========  =====  ===========  ===========  =======  ====  ======
    layer (count)              cost M       plain  grouped 64M  unfold-gram  grouped  gram  matmul
    =========================  ===========  =====  ===========  ===========  =======  ====  ======
    64-64 3x3, 32x32 (4)       38.9 / 581    65.1         77.9         2250     76.5   813   132
    128-128 3x3, 16x16 (3)     42.5 / 53.8   46.2        123.5          335     67.1  89.1   131
    256-256 3x3, 8x8 (3)       56.6 / 6.6    49.7          516         79.8      135  19.3   151
    512-512 3x3, 4x4 (3)        113 / 1.3    63.1         1914         15.9      249   8.1   277
    =========================  ===========  =====  ===========  ===========  =======  ====  ======

    Whole network (all 20 convolutions): plain weight gradients 859 ms; per-sample norms by
    the rule before 1086 ms, by this one 691 ms.

    Chunks: at most ``budget`` bytes of a chunk's temporaries and inputs (at least one
    sample). On CPU also at most ``_CPU_CHUNK_BYTES`` (2 MiB) per intra-op thread, about a
    core's L2 cache (1-6 samples at ResNet-18's shapes): oneDNN's grouped weight gradient
    then ran 1.8x faster at 16x16 (table) and up to 1.8x at 32x32 in other runs, the Gram
    route up to 1.3x faster than on 64 MiB chunks.
    """
    plan, xp, padding = conv_plan(m, x, d)
    route = plan.route() if route is None else route
    if x.device.type == "cpu":
        budget = min(budget, _CPU_CHUNK_BYTES * max(1, torch.get_num_threads()))
    if route == "grouped":
        return _conv_grouped(m, plan, xp, d, padding, budget)
    if route == "gram":
        return _conv_gram(plan, xp, d, budget)
    if route == "matmul":
        return _conv_matmul(plan, xp, d, budget)
    raise ValueError(f"route: expected one of {CONV_ROUTES} or None, got {route!r}")


def conv_rule(m: nn.modules.conv._ConvNd, x, d, n, want, budget):
    nd = len(m.kernel_size)
    _need_batch(m, x, nd + 2)
    d = _f(d[:n])
    out = {}
    if "bias" in want:
        out["bias"] = d.flatten(2).sum(2).pow(2).sum(1)
    if "weight" in want:
        out["weight"] = conv_weight_sqnorms(m, _f(x[:n]), d, budget)
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
    invstd = torch.rsqrt(var + m.eps).view(1, -1)
    C = x.shape[1]
    out = {}
    if "weight" in want:
        # sum_pos d * x_hat = invstd * <d, x - mean> per (sample, channel): one temporary (the
        # centred chunk) and a batched dot product, instead of x_hat and d * x_hat
        parts = []
        for s, e in _chunks(n, x[0].numel() * x.element_size(), budget):
            c = e - s
            xc = x[s:e] - mean
            if x.dim() == 2:  # [B, C]: one value per channel
                dots = d[s:e] * xc
            else:
                dots = torch.bmm(d[s:e].reshape(c * C, 1, -1), xc.reshape(c * C, -1, 1)).view(c, C)
            parts.append((dots * invstd).pow(2).sum(1))
        out["weight"] = torch.cat(parts)
    if "bias" in want:
        out["bias"] = d[:n].reshape(n, C, -1).sum(2).pow(2).sum(1)
    return out


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
