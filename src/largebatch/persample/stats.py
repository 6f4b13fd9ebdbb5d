"""What the tracker hands out: per-tensor sums of per-sample norms, and what follows from them.

For each tracked tensor ``w`` (all device tensors, one entry per tensor):

* ``sum_norm = sum_{i in J} ||grad_w f_i||``  and ``sum_sq = sum_{i in J} ||grad_w f_i||^2``
  over the measured samples ``J`` (all of them, or the first ``persample_subset`` per rank);
* ``count = |J|``;
* ``grad_weight``: the factor ``c`` with ``w.grad == c * mean_i grad_w f_i`` over *all*
  samples of the step (the loss scale the gradient carries; see :meth:`variance_factor`).

``mean_norm()`` is CLARS's ``n_k`` (docs/algorithms.md, "CLARS"; CLARS paper eq. 5) and
``variance_factor()`` is the gradient-variance factor of the CLARS paper Fig. 2,
``M_k = mean_i ||grad f_i||^2 / ||mean_i grad f_i||^2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .._dtensor import dtensor_type, global_sq_norms

__all__ = ["PerSampleStats"]


@dataclass
class PerSampleStats:
    params: list[Tensor]
    names: list[str]
    sum_norm: Tensor
    sum_sq: Tensor
    count: Tensor
    grad_weight: Tensor
    local_count: list[int]  # this rank's measured samples per tensor (host ints, no sync)

    def index(self) -> dict[int, int]:
        """``id(param) -> position`` in the tensors above."""
        return {id(p): i for i, p in enumerate(self.params)}

    def mean_norm(self) -> Tensor:
        """``n_k = (1/|J|) sum_{i in J} ||grad_w f_i||`` per tensor (NaN where ``|J| = 0``)."""
        return self.sum_norm / self.count

    def mean_sq_norm(self) -> Tensor:
        """``(1/|J|) sum_{i in J} ||grad_w f_i||^2`` per tensor (NaN where ``|J| = 0``)."""
        return self.sum_sq / self.count

    def variance_factor(self, grads: Sequence[Tensor | None] | None = None) -> Tensor:
        """Seed 004 Fig. 2: ``M_k = mean_i ||grad_w f_i||^2 / ||mean_i grad_w f_i||^2``.

        ``mean_i grad_w f_i`` is taken from ``grads`` (default: each tensor's ``.grad``)
        divided by ``grad_weight``, which the tracker accumulated from the declared loss
        scale: exact when every micro-batch of the step used the same per-sample scale
        (``loss_scale / batch`` for ``"mean"``, ``loss_scale`` for ``"sum"``) and ``.grad``
        was zero before the step's first backward. With DDP or FSDP2 the gradient is assumed
        to be averaged over ranks (their default); DTensor gradients (FSDP2, tensor
        parallelism) enter with the norms of the full tensors (one collective for all). With
        ``persample_subset`` the numerator uses the subset and the denominator the whole batch
        (the paper's approximation).
        NaN where a tensor has no gradient or no measured sample.
        """
        if grads is None:
            grads = [p.grad for p in self.params]
        if len(grads) != len(self.params):
            raise ValueError(f"grads: expected {len(self.params)} tensors, got {len(grads)}")
        dev = self.sum_sq.device
        DT = dtensor_type()  # sharded gradients (FSDP2, tensor parallelism): full norms, one collective
        sharded = [i for i, g in enumerate(grads) if DT is not None and isinstance(g, DT)]
        full = dict(zip(sharded, global_sq_norms([grads[i].detach() for i in sharded]))) if sharded else {}
        sq = torch.stack([
            torch.full((), float("nan"), device=dev, dtype=self.sum_sq.dtype) if g is None
            else full[i].to(device=dev, dtype=self.sum_sq.dtype) if i in full
            else torch.linalg.vector_norm(g.detach().to(self.sum_sq.dtype)).pow(2).to(dev)
            for i, g in enumerate(grads)
        ]) if grads else self.sum_sq.new_zeros(0)
        return self.mean_sq_norm() * self.grad_weight.pow(2) / sq
