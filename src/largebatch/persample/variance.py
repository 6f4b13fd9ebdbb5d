"""Gradient-variance factor of the CLARS paper (Fig. 2), measured with the per-sample machinery.

``M_k = mean_i ||grad_k f_i||^2 / ||mean_i grad_k f_i||^2`` per parameter tensor ``k``
(docs/algorithms.md, "Diagnostics"). During training it is available from any tracker's statistics
(:meth:`PerSampleStats.variance_factor`); :func:`gradient_variance` measures it on given
batches without touching ``.grad`` (it uses ``torch.autograd.grad``).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .tracker import PerSampleGradNorms

__all__ = ["gradient_variance"]


def gradient_variance(model: nn.Module, batches: Iterable, loss_fn: Callable[..., Tensor],
                      **tracker_kwargs) -> dict[str, float]:
    """``{param_name: M_k}`` over all samples of ``batches`` (pairs ``(inputs, targets)``;
    a tuple ``inputs`` is unpacked into the model's arguments).

    ``loss_fn(model(inputs), targets)`` must return the *sum* of per-sample losses (e.g.
    ``nn.CrossEntropyLoss(reduction="sum")``). The model's mode (train/eval) is left as it
    is; in train mode, BatchNorm makes each sample's term its additive contribution to the
    batch gradient (docs/algorithms.md, "CLARS").
    """
    tracker = PerSampleGradNorms(model, loss_reduction="sum", **tracker_kwargs)
    try:
        total = None
        for inputs, targets in batches:
            out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            loss = loss_fn(out, targets)
            grads = torch.autograd.grad(loss, tracker.params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(tracker.params, grads)]
            total = grads if total is None else [t + g for t, g in zip(total, grads)]
        if total is None:
            raise ValueError("batches: no batch given")
        stats = tracker.collect()
        m = stats.variance_factor(total).tolist()
    finally:
        tracker.remove()
    return dict(zip(stats.names, m))
