"""Global-batch statistics under data parallelism (docs/algorithms.md section 11: N processes equal one process).

Gradient convention (the one of ``torch.nn.SyncBatchNorm`` and ``torch.distributed.nn``): every
rank computes the same global quantity, and a sum over ranks (``all_reduce_sum``) back-propagates
the *sum* of the ranks' incoming gradients. Each rank's backward therefore yields
``world_size x`` its own share of the one-process gradient, and *averaging* the parameter
gradients over ranks (DDP, or :func:`average_gradients`) gives the one-process gradient exactly.

``GlobalBatchNorm`` is a SyncBatchNorm for every device and backend (``torch.nn.SyncBatchNorm``
refuses CPU tensors, so it cannot run under Gloo); with one process it is ``nn.BatchNorm``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["world_size", "all_reduce_sum", "batch_moments", "GlobalBatchNorm", "convert_global_batchnorm",
           "average_gradients"]


def world_size(group=None) -> int:
    """Processes in ``group`` (the default group when None); 1 without an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(t: Tensor, group=None) -> Tensor:
    """Differentiable sum over ranks (backward: the sum of the ranks' gradients); identity for one process."""
    if world_size(group) == 1:
        return t
    return dist_fn.all_reduce(t, op=dist.ReduceOp.SUM, group=group if group is not None else dist.group.WORLD)


def batch_moments(x: Tensor, dims: tuple[int, ...], group=None) -> tuple[Tensor, Tensor, Tensor | float]:
    """Mean, biased variance (``keepdim``) and count of ``x`` over ``dims`` and over all ranks.

    Two passes like BatchNorm (sum, then centred squares), each one all-reduce; ranks may hold
    different numbers of rows.
    """
    n_local = math.prod(x.shape[d] for d in dims)
    s = x.sum(dims, keepdim=True)
    if world_size(group) == 1:
        n: Tensor | float = float(n_local)
        mean = s / n
    else:
        packed = all_reduce_sum(torch.cat([s.reshape(-1), s.new_full((1,), float(n_local))]), group)
        n = packed[-1].detach()
        mean = packed[:-1].view_as(s) / n
    var = all_reduce_sum((x - mean).square().sum(dims, keepdim=True), group) / n
    return mean, var, n


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch (all ranks) in training mode, for 2-D or more inputs on any device.

    Same parameters, buffers and running-statistics rule as ``nn.BatchNorm{1,2,3}d`` (running
    variance unbiased with the global count); eval mode uses the running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var, n = batch_moments(x, (0, *range(2, x.dim())), self.process_group)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, n)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor | float) -> None:
        self.num_batches_tracked.add_(1)
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.reshape(-1).to(self.running_mean.dtype), m)
        bessel = n / (n - 1).clamp_min(1) if isinstance(n, Tensor) else n / max(n - 1, 1)
        unbiased = var.reshape(-1) * bessel
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)


def convert_global_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm (and SyncBatchNorm) in ``module`` by :class:`GlobalBatchNorm`, keeping
    parameters and buffers (like ``nn.SyncBatchNorm.convert_sync_batchnorm``). Returns the module."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        ref = module.weight if module.affine else module.running_mean
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, process_group, **factory)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_global_batchnorm(child, process_group))
    return module


@torch.no_grad()
def average_gradients(params, group=None) -> None:
    """Average ``.grad`` over ranks in one all-reduce (what DDP does); no-op for one process.

    Use it when the model is not wrapped in DDP, e.g. after :func:`largebatch.ssl.accumulate.cached_backward`.
    """
    world = world_size(group)
    if world == 1:
        return
    buckets: dict[tuple, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
