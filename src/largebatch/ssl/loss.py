"""The Barlow Twins loss (Zbontar et al. 2021, eqs. 1-2; docs/algorithms.md section 11) on the global batch."""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_nonneg
from .distributed import all_reduce_sum, batch_moments

__all__ = ["barlow_twins_loss", "off_diagonal"]


def off_diagonal(c: Tensor) -> Tensor:
    """The ``D*(D-1)`` off-diagonal entries of a square matrix, as a flat view (reference implementation's trick)."""
    d = c.shape[0]
    return c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.0051, group=None, eps: float = 1e-5) -> Tensor:
    """Barlow Twins redundancy-reduction loss of two ``N x D`` embedding batches (docs/algorithms.md section 11; Zbontar et al. eq. 1)::

        zn   = (z - mean_batch(z)) / sqrt(var_batch(z) + eps)     # per dimension, biased variance
        C    = zn1^T zn2 / N                                        # eq. 2, D x D
        loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2

    Under ``torch.distributed`` (initialized, ``group`` of more than one process) ``N`` is the
    *global* batch: the mean and variance are global and the partial sums ``zn1^T zn2`` are
    all-reduced, with autograd through the collectives. Every rank returns the same value; each
    rank's gradient is ``world_size x`` its share, so averaging parameter gradients over ranks
    (DDP, :func:`largebatch.ssl.distributed.average_gradients`) gives exactly the one-process
    gradient on the global batch. Half-precision embeddings are computed in float32 (outside autocast).
    """
    check_nonneg("lambd", lambd)
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"barlow_twins_loss: z1 and z2 must be N x D tensors of one shape, "
                         f"got {tuple(z1.shape)} and {tuple(z2.shape)}")
    with torch.autocast(z1.device.type, enabled=False):
        z = torch.stack((z1, z2))
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()
        mean, var, n = batch_moments(z, (1,), group)   # one collective for both views' sums
        zn1, zn2 = (z - mean) * torch.rsqrt(var + eps)
        c = all_reduce_sum(zn1.T @ zn2, group) / n
        on_diag = (1 - torch.diagonal(c)).square().sum()
        return on_diag + lambd * off_diagonal(c).square().sum()
