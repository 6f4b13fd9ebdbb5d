"""The gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018, App. A).

``G`` is the true gradient and ``Sigma`` the per-sample gradient covariance; the norm of a batch
gradient of ``B`` samples has the expectation ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``. Two measured
squared norms at batch sizes ``B_small < B_big`` therefore give unbiased estimates of both terms
(:func:`unbiased_estimates`, the paper's App. A)::

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Each is noisy, so the numerator and the denominator are smoothed separately by exponential moving
averages (:class:`NoiseScaleEMA`) and ``B_simple`` is their ratio. Everything is per parameter
tensor; the whole-model value uses the sums of the per-tensor numerators and denominators (the
squared norm of the whole gradient is the sum of the tensors' squared norms), so the per-layer
values and the whole-model value follow one definition.

Where ``|G_small|^2`` comes from (the meters, one per step; docs/batch-size.md):

* :class:`MicroBatchNorms`: the micro-batches of gradient accumulation in one process
  (``B_small`` = micro-batch, ``B_big`` = step batch);
* :class:`DDPLocalNorms`: under DDP, each rank's local gradient, read by a communication hook just
  before the all-reduce (``B_small`` = rows per rank, ``B_big`` = global batch);
* :class:`PerSampleNorms`: exact per-sample gradient norms (:mod:`largebatch.persample`), i.e.
  ``B_small = 1``: ``tr(Sigma)`` is then the unbiased sample variance
  ``(sum_i |g_i|^2 - B |g|^2) / (B - 1)``.

``|G_big|^2`` is the squared norm of the step's gradient (``.grad`` after the backward passes, the
all-reduced one under DDP). A meter's :meth:`~_Meter.measure` returns both per tensor as one device
tensor, without a host sync; ``|G_small|^2`` is rank-local (:func:`average_over_ranks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["unbiased_estimates", "NoiseScaleEMA", "NoiseScale", "MicroBatchNorms", "DDPLocalNorms",
           "PerSampleNorms", "average_over_ranks", "measure_per_sample", "squared_norms"]


# ----------------------------------------------------------------------------- the estimates
def unbiased_estimates(small_sq: Tensor, big_sq: Tensor, b_small: float, b_big: float) -> tuple[Tensor, Tensor]:
    """``(tr(Sigma), |G|^2)`` estimated from ``|G_small|^2`` and ``|G_big|^2`` measured at batch
    sizes ``b_small < b_big`` (McCandlish et al. 2018, App. A). Elementwise (per tensor); both
    estimates are unbiased and may be negative for a single step."""
    if not (b_small > 0 and b_big > b_small):
        raise ValueError(f"batch sizes: need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    gsq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return trace, gsq


@dataclass
class NoiseScale:
    """Per-tensor ``tr(Sigma)`` and ``|G|^2`` (host floats) and the noise scales that follow."""
    names: list[str]
    trace: list[float]
    gsq: list[float]

    @property
    def layers(self) -> dict[str, float]:
        """``{name: tr(Sigma_k) / |G_k|^2}`` per tensor."""
        return {n: _ratio(t, g) for n, t, g in zip(self.names, self.trace, self.gsq)}

    @property
    def value(self) -> float:
        """Whole model: ``sum_k tr(Sigma_k) / sum_k |G_k|^2``."""
        return _ratio(math.fsum(self.trace), math.fsum(self.gsq))


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


class NoiseScaleEMA:
    """Exponential moving averages of ``tr(Sigma)`` and ``|G|^2`` per tensor, bias-corrected like
    Adam's moments (the correction cancels in the ratio ``B_simple``). ``update`` works on device
    tensors without a host sync; ``state_dict`` round-trips through a checkpoint."""

    def __init__(self, decay: float = 0.99):
        if not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0.0 <= decay < 1.0):
            raise ValueError(f"decay: must be a number in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.t = 0
        self._trace: Tensor | None = None
        self._gsq: Tensor | None = None

    def update(self, trace: Tensor, gsq: Tensor) -> None:
        if self._trace is None:
            self._trace, self._gsq = torch.zeros_like(trace), torch.zeros_like(gsq)
        self._trace.mul_(self.decay).add_(trace, alpha=1.0 - self.decay)
        self._gsq.mul_(self.decay).add_(gsq, alpha=1.0 - self.decay)
        self.t += 1

    def _corrected(self, v: Tensor | None) -> Tensor:
        if v is None:
            raise ValueError("NoiseScaleEMA: no step recorded yet")
        return v / (1.0 - self.decay ** self.t)

    @property
    def trace(self) -> Tensor:
        return self._corrected(self._trace)

    @property
    def gsq(self) -> Tensor:
        return self._corrected(self._gsq)

    def value(self) -> Tensor:
        """Whole-model ``B_simple`` (a 0-d tensor)."""
        return self.trace.sum() / self.gsq.sum()

    def layer_values(self) -> Tensor:
        return self.trace / self.gsq

    def result(self, names: Sequence[str]) -> NoiseScale:
        return NoiseScale(list(names), self.trace.tolist(), self.gsq.tolist())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "t": self.t,
                "trace": None if self._trace is None else self._trace.tolist(),
                "gsq": None if self._gsq is None else self._gsq.tolist()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.decay, self.t = float(state["decay"]), int(state["t"])
        self._trace = None if state["trace"] is None else torch.tensor(state["trace"], dtype=torch.float64,
                                                                       device=device)
        self._gsq = None if state["gsq"] is None else torch.tensor(state["gsq"], dtype=torch.float64, device=device)


# ----------------------------------------------------------------------------- the meters
def squared_norms(tensors: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """``[|t|^2 for t in tensors]`` as one float64 tensor on ``like``'s device (0 for ``None``)."""
    present = [i for i, t in enumerate(tensors) if t is not None]
    if len(present) == len(tensors) and present:
        return torch.stack(torch._foreach_norm([t.detach() for t in tensors])).to(torch.float64).square()
    out = torch.zeros(len(tensors), dtype=torch.float64, device=like.device)
    if present:
        norms = torch._foreach_norm([tensors[i].detach() for i in present])
        out[present] = torch.stack(norms).to(torch.float64).square()
    return out


class _Meter:
    """One step's ``(|G_small|^2, |G_big|^2)`` per tensor of ``params``; ``b_small``, ``b_big``."""

    b_small: float
    b_big: float

    def __init__(self, params: Iterable[Tensor], names: Sequence[str] | None = None):
        self.params = list(params)
        if not self.params:
            raise ValueError("params: no parameter to measure")
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(self.params))]
        if len(self.names) != len(self.params):
            raise ValueError(f"names: expected {len(self.params)} names, got {len(self.names)}")
        self._zero = torch.zeros((), dtype=torch.float64, device=self.params[0].device)

    def big_sq(self) -> Tensor:
        return squared_norms([p.grad for p in self.params], self._zero)

    def small_sq(self) -> Tensor:
        raise NotImplementedError

    def measure(self) -> Tensor:
        """``[2, P]`` float64 on the device: rank-local ``|G_small|^2`` and ``|G_big|^2`` of the step
        whose gradients are in ``.grad``; resets the step's state. Call after the backward passes
        and before the optimizer step."""
        return torch.stack([self.small_sq(), self.big_sq()])

    def remove(self) -> None:
        """Detach whatever the meter attached."""


class MicroBatchNorms(_Meter):
    """Gradient accumulation in one process: call :meth:`micro_batch_done` after each micro-batch's
    backward. ``weight`` turns the micro-batch's contribution to ``.grad`` into its mean gradient:
    for ``(sum of losses / step_rows).backward()`` it is ``step_rows / micro_rows``. Costs one norm
    per tensor per micro-batch, and after each but the first one subtraction (in place), and after
    each but the last one copy of the gradients (a buffer kept between micro-batches)."""

    def __init__(self, params: Iterable[Tensor], names: Sequence[str] | None = None, *, b_small: int, b_big: int):
        super().__init__(params, names)
        if not (0 < b_small < b_big):
            raise ValueError(f"micro-batches: need 0 < micro-batch ({b_small}) < step batch ({b_big})")
        self.b_small, self.b_big = b_small, b_big
        self._prev: list[Tensor] | None = None
        self._sum = torch.zeros(len(self.params), dtype=torch.float64, device=self._zero.device)
        self._n = 0

    @torch.no_grad()
    def micro_batch_done(self, weight: float = 1.0, last: bool = False) -> None:
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self._prev is None:  # the first micro-batch: .grad is its contribution
            self._sum += squared_norms(grads, self._zero) * (weight * weight)
            if not last:
                self._prev = [g.clone() for g in grads]
        else:  # in place: prev - grad is minus this micro-batch's contribution
            torch._foreach_sub_(self._prev, grads)
            self._sum += squared_norms(self._prev, self._zero) * (weight * weight)
            if last:
                self._prev = None
            else:
                torch._foreach_copy_(self._prev, grads)
        self._n += 1

    def small_sq(self) -> Tensor:
        if self._n < 2:
            raise RuntimeError("MicroBatchNorms: fewer than two micro-batches in this step")
        out = self._sum / self._n
        self._sum = torch.zeros_like(self._sum)
        self._n, self._prev = 0, None
        return out


class DDPLocalNorms(_Meter):
    """Under DDP: each rank's local gradient, read by a communication hook on the bucket just before
    the all-reduce (PyTorch's default all-reduce hook then runs unchanged). The hook adds one norm
    per tensor; the rank average of ``|G_small|^2`` is taken later (:func:`average_over_ranks`).
    Assumes the backward loss gives each rank the mean gradient of its rows (DDP then averages)."""

    def __init__(self, ddp_model: nn.Module, params: Iterable[Tensor], names: Sequence[str] | None = None, *,
                 b_small: int, b_big: int, process_group=None):
        super().__init__(params, names)
        if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
            raise TypeError(f"ddp_model: expected a DistributedDataParallel module, got {type(ddp_model).__name__}")
        if not (0 < b_small < b_big):
            raise ValueError(f"ranks: need 0 < rows per rank ({b_small}) < global batch ({b_big})")
        self.b_small, self.b_big = b_small, b_big
        self.process_group = process_group
        self._pos = {id(p): i for i, p in enumerate(self.params)}
        self._idx: dict[tuple[int, ...], tuple[list[int], Tensor]] = {}
        self._local = torch.zeros(len(self.params), dtype=torch.float64, device=self._zero.device)
        ddp_model.register_comm_hook(self, DDPLocalNorms._hook)

    @staticmethod
    def _hook(state: "DDPLocalNorms", bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        key = tuple(id(p) for p in bucket.parameters())
        if key not in state._idx:  # positions of the measured tensors of this bucket (host-side selection)
            keep = [i for i, k in enumerate(key) if k in state._pos]
            state._idx[key] = (keep, torch.tensor([state._pos[key[i]] for i in keep], device=state._local.device))
        keep, idx = state._idx[key]
        if keep:
            grads = bucket.gradients()
            norms = torch._foreach_norm([grads[i] for i in keep])
            state._local.index_add_(0, idx, torch.stack(norms).to(torch.float64).square())
        return allreduce_hook(state.process_group, bucket)

    def small_sq(self) -> Tensor:
        out = self._local.clone()
        self._local.zero_()
        return out


class PerSampleNorms(_Meter):
    """Exact per-sample gradient norms (``B_small = 1``) through :class:`~largebatch.persample.PerSampleGradNorms`
    hooks. The backward loss must be ``loss_scale * sum_i f_i`` (set :attr:`loss_scale`, e.g.
    ``1 / step_rows`` for a mean over the step); ``b_big`` is the batch of ``.grad`` (global under DDP)."""

    def __init__(self, model: nn.Module, *, b_big: int, params: Iterable[Tensor] | None = None,
                 loss_scale: float = 1.0):
        from .persample import PerSampleGradNorms

        self.tracker = PerSampleGradNorms(model, loss_reduction="sum", loss_scale=loss_scale, params=params)
        super().__init__(self.tracker.params, self.tracker.names)
        if b_big < 2:
            raise ValueError(f"per-sample noise scale: the batch must have at least 2 samples, got {b_big}")
        self.b_small, self.b_big = 1, b_big

    @property
    def loss_scale(self):
        return self.tracker.loss_scale

    @loss_scale.setter
    def loss_scale(self, v) -> None:
        self.tracker.loss_scale = v

    def small_sq(self) -> Tensor:
        st = self.tracker.collect(sync=False)
        return (st.sum_sq / st.count).to(torch.float64)

    def remove(self) -> None:
        self.tracker.remove()


def average_over_ranks(small_sq: Tensor) -> Tensor:
    """The mean over ranks of rank-local ``|G_small|^2`` values (in place; one all-reduce, a
    no-op in one process). Any shape: a whole epoch of steps is reduced at once."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(small_sq)
        small_sq /= dist.get_world_size()
    return small_sq


# ----------------------------------------------------------------------------- on given batches
def measure_per_sample(model: nn.Module, batches: Iterable, loss_fn: Callable[..., Tensor],
                       params: Iterable[Tensor] | None = None) -> NoiseScale:
    """``B_simple`` of ``model`` as it is, from exact per-sample gradient norms: the per-batch
    unbiased estimates averaged over ``batches`` (pairs ``(inputs, targets)``, at least 2 samples
    each). ``loss_fn(outputs, targets)`` returns the *sum* of per-sample losses. Leaves ``.grad``
    untouched (``torch.autograd.grad``) and the model's mode as it is."""
    meter = PerSampleNorms(model, b_big=2, params=params)
    try:
        tr_sum = gsq_sum = None
        n = 0
        for inputs, targets in batches:
            b = targets.shape[0]
            out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            loss = loss_fn(out, targets) / b
            meter.loss_scale = 1.0 / b
            grads = torch.autograd.grad(loss, meter.params, allow_unused=True)
            big = squared_norms(list(grads), meter._zero)
            small = meter.small_sq()
            tr, gsq = unbiased_estimates(small, big, 1, b)
            tr_sum = tr if tr_sum is None else tr_sum + tr
            gsq_sum = gsq if gsq_sum is None else gsq_sum + gsq
            n += 1
        if n == 0:
            raise ValueError("batches: no batch given")
        return NoiseScale(meter.names, (tr_sum / n).tolist(), (gsq_sum / n).tolist())
    finally:
        meter.remove()
