"""Exact large-batch Barlow Twins steps through embedding caching (docs/ssl.md).

The loss is not a mean of per-sample terms (the cross-correlation couples the whole batch), so
summing micro-batch gradients of micro-batch losses is a different objective. Embedding caching
(as in Gao et al. 2021, "Scaling deep contrastive learning batch size under memory limited
setup") computes the full-batch gradient with micro-batch memory:

1. no-grad forward of every micro-batch -> ``z1, z2`` of the whole batch;
2. the loss and ``dL/dz`` on the whole batch (``z`` detached, ``requires_grad``);
3. per micro-batch, a forward with graph and ``torch.autograd.backward(z_mb, dL/dz_mb)``;
   parameter gradients accumulate to ``dL/dtheta`` of the whole batch.

The two forwards of a micro-batch must compute the same ``z``: the RNG state (dropout) is
restored before step 3, and the module's buffers (BatchNorm running statistics) are restored
after step 1, so they are updated once per micro-batch, by step 3. Without BatchNorm the result
equals one big batch (to rounding). **With BatchNorm it does not:** each micro-batch is
normalized with its own statistics ("ghost batch normalization" of micro-batch size), so the
step equals a big-batch step whose BatchNorm layers see the micro-batches separately, and the
running statistics get one update per micro-batch (as with plain accumulation). Under data
parallelism the cross-rank sums of the loss are in step 2; average the parameter gradients
afterwards (:func:`largebatch.ssl.distributed.average_gradients`; do not wrap the model in DDP,
whose hooks would fire at every micro-batch). With synchronized BatchNorm every rank must run the
same number of micro-batches (equal shards), since each forward is a collective.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["cached_backward"]


def _rng_devices(t: Tensor) -> list[int]:
    return [t.device.index if t.device.index is not None else torch.cuda.current_device()] if t.is_cuda else []


def cached_backward(model: nn.Module, v1: Tensor, v2: Tensor, micro_batch_size: int) -> Tensor:
    """Accumulate into ``.grad`` the gradient of ``model(v1, v2)`` (a :class:`~largebatch.ssl.model.BarlowTwins`:
    ``embed`` and ``loss``) on the whole batch, ``micro_batch_size`` images per forward. Returns the
    loss, detached. A micro-batch at least the batch is one plain forward and backward.
    """
    if not (isinstance(micro_batch_size, int) and micro_batch_size > 0):
        raise ValueError(f"micro_batch_size: expected a positive int, got {micro_batch_size!r}")
    n = v1.shape[0]
    if v2.shape[0] != n:
        raise ValueError(f"cached_backward: the views have {n} and {v2.shape[0]} images")
    if micro_batch_size >= n:
        loss = model(v1, v2)
        loss.backward()
        return loss.detach()
    chunks = list(zip(v1.split(micro_batch_size), v2.split(micro_batch_size)))
    buffers = [b.detach().clone() for b in model.buffers()]
    with torch.random.fork_rng(devices=_rng_devices(v1)):         # step 3 replays step 1's random numbers
        with torch.no_grad():
            z = [(model.embed(a), model.embed(b)) for a, b in chunks]
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    z1 = torch.cat([a for a, _ in z]).requires_grad_()
    z2 = torch.cat([b for _, b in z]).requires_grad_()
    loss = model.loss(z1, z2)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    for (a, b), d1, d2 in zip(chunks, g1.split(micro_batch_size), g2.split(micro_batch_size)):
        torch.autograd.backward((model.embed(a), model.embed(b)), (d1, d2))
    return loss.detach()
