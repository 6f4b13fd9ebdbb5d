"""Hooks that accumulate per-sample gradient norms during the ordinary ``loss.backward()``.

A forward hook on every module that owns tracked parameters keeps a reference to the
module's input (the tensor autograd saves anyway, so no copy) and registers a hook on the
module's output tensor. When autograd computes the gradient w.r.t. that output, the hook
hands input and output gradient to the layer's rule (:mod:`.rules`), which returns each
sample's squared norm; the tracker rescales them by the declared loss scale and adds
``sum ||.||``, ``sum ||.||^2`` and the sample count to device accumulators. Nothing reads a
device value on the host. :meth:`PerSampleGradNorms.collect` all-reduces the accumulators
(one collective) and returns a :class:`~.stats.PerSampleStats`.

Sharded models (docs/algorithms.md, section 13): FSDP2 computes with unsharded parameters
and plain activations, so the hooks see each sample's full per-sample gradient as under DDP.
Under tensor parallelism the layer's input and output gradient are DTensors; the rules run
on them and DTensor sums the shards' partial squared norms of each sample (:func:`_full`).
The forward hooks are registered first in line (``prepend=True``), to see the layer's own
output before other hooks (tensor parallelism's) replace it.

Scale: with ``loss_reduction="mean"`` the backward loss is ``loss_scale * (1/b) sum_i f_i``
for a micro-batch of ``b`` samples, so the hooks see ``loss_scale / b`` times each sample's
gradient; with ``"sum"`` it is ``loss_scale * sum_i f_i``. The usual accumulation pattern
``(loss / k).backward()`` is ``loss_reduction="mean", loss_scale=1/k``; an AMP
``GradScaler`` multiplies ``loss_scale`` by its scale.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from .._dtensor import dtensor_type
from .rules import SUPPORTED, UnsupportedLayerError, rule_for
from .stats import PerSampleStats

__all__ = ["PerSampleGradNorms"]

_REDUCTIONS = ("mean", "sum")


def _full(v: Tensor, x: Tensor, grad: Tensor) -> Tensor:
    """A rule's per-sample values as a plain tensor. Under tensor parallelism the module's
    input and output gradient are DTensors and so is ``v``: DTensor dispatch has summed the
    shards' partial squared norms of each sample where needed (``Partial``), so
    ``full_tensor()`` gives the squared norms of the full per-sample gradients (one
    collective per layer and backward when the layer's activations are sharded). FSDP2
    computes with unsharded parameters and plain activations: nothing to do."""
    DT = dtensor_type()
    if DT is None:
        return v
    if isinstance(x, DT) != isinstance(grad, DT):
        raise TypeError("per-sample norms: a layer's input and output gradient must both be DTensors or both "
                        f"plain tensors, got {type(x).__name__} and {type(grad).__name__}")
    return v.full_tensor() if isinstance(v, DT) else v


class _Entry:
    __slots__ = ("module", "name", "rule", "pnames", "start", "used")

    def __init__(self, module, name, rule, pnames, start):
        self.module, self.name, self.rule, self.pnames, self.start = module, name, rule, pnames, start
        self.used = 0  # samples measured since the last collect (for persample_subset)


class _ForwardHook:
    """The forward hook of tracked module ``i``: an object, not a closure, so that a model
    with a tracker attached (and an optimizer holding both) survives ``copy.deepcopy`` and
    ``pickle``: the copy's hooks feed the copy's tracker."""

    __slots__ = ("tracker", "i")

    def __init__(self, tracker: "PerSampleGradNorms", i: int):
        self.tracker, self.i = tracker, i

    def __call__(self, module, inputs, output):
        self.tracker._forward(self.i, module, inputs, output)


class PerSampleGradNorms:
    """Attach to ``model``; every ``backward`` then accumulates per-sample gradient norms.

    Args:
        model: the model (batch in dimension 0 of every layer's input).
        loss_reduction: ``"mean"`` (hooks see ``1/b`` of each sample's gradient) or ``"sum"``.
        loss_scale: any further constant the loss was multiplied by before ``backward``
            (e.g. ``1/accumulation_steps``); a Python number or a 0-d tensor.
        persample_subset: measure only the first ``m`` samples seen by each rank between two
            :meth:`collect` calls (the paper's ``|J|``); ``None`` measures all.
        params: track only these parameters (default: every trainable one).
        unsupported: ``"error"`` (default) raises :class:`UnsupportedLayerError` naming a
            module that owns tracked parameters and has no rule; ``"skip"`` leaves those
            parameters untracked (they then have no statistics).
        max_chunk_bytes: bound on the temporary memory of one rule call (per-sample
            gradients of one chunk of samples, Gram matrices). Convolutions on CPU use
            smaller, cache-sized chunks (:func:`.rules.conv_weight_sqnorms`).
        process_group: DDP process group for :meth:`collect` (default: the world).

    Use it as a context manager or call :meth:`remove` to detach the hooks.
    """

    def __init__(self, model: nn.Module, *, loss_reduction: str = "mean", loss_scale: float | Tensor = 1.0,
                 persample_subset: int | None = None, params: Iterable[Tensor] | None = None,
                 unsupported: str = "error", max_chunk_bytes: int = 64 * 2**20, process_group=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"invalid loss_reduction={loss_reduction!r}: expected one of {_REDUCTIONS}")
        if persample_subset is not None and (isinstance(persample_subset, bool) or not isinstance(persample_subset, int)
                                             or persample_subset < 1):
            raise ValueError(f"invalid persample_subset={persample_subset!r}: expected None or an int >= 1")
        if unsupported not in ("error", "skip"):
            raise ValueError(f"invalid unsupported={unsupported!r}: expected 'error' or 'skip'")
        if not isinstance(max_chunk_bytes, int) or isinstance(max_chunk_bytes, bool) or max_chunk_bytes < 1:
            raise ValueError(f"invalid max_chunk_bytes={max_chunk_bytes!r}: expected an int >= 1")
        self.loss_reduction = loss_reduction
        self.loss_scale = loss_scale
        self._check_scale()
        self.persample_subset = persample_subset
        self.max_chunk_bytes = max_chunk_bytes
        self.process_group = process_group
        self.enabled = True

        wanted = None if params is None else {id(p) for p in params}
        self.params: list[Tensor] = []
        self.names: list[str] = []
        self._entries: list[_Entry] = []
        self.skipped: list[str] = []
        owner: dict[int, str] = {}
        for mname, mod in model.named_modules():
            own = [(n, p) for n, p in mod.named_parameters(recurse=False)
                   if p.requires_grad and (wanted is None or id(p) in wanted)]
            if not own:
                continue
            full = [f"{mname}.{n}" if mname else n for n, _ in own]
            for f, (_, p) in zip(full, own):
                if p.is_complex():  # the rules square real numbers (docs/algorithms.md section 8: refuse)
                    raise TypeError(f"parameter {f!r} is complex: per-sample gradient norms of complex "
                                    "parameters are not supported (leave it out with params=...)")
                if id(p) in owner:
                    raise ValueError(f"parameter {f!r} is the same tensor as {owner[id(p)]!r} (weight tying): "
                                     "the per-sample gradient of a shared tensor is not supported")
                owner[id(p)] = f
            rule = rule_for(mod)
            if rule is None:
                if unsupported == "skip":
                    self.skipped += full
                    continue
                kinds = ", ".join(c.__name__ for c, _ in SUPPORTED)
                raise UnsupportedLayerError(
                    f"module {mname or '<root>'!r} ({type(mod).__name__}) owns trainable parameter(s) "
                    f"{[n for n, _ in own]} but has no exact per-sample rule (supported: {kinds}; "
                    "not SyncBatchNorm or transposed convolutions). Exclude these parameters "
                    "(params=...) or pass unsupported='skip' to leave them untracked.")
            self._entries.append(_Entry(mod, mname, rule, [n for n, _ in own], len(self.params)))
            self.params += [p for _, p in own]
            self.names += full
        if wanted is not None:
            missing = wanted - set(owner)
            if missing:
                raise ValueError(f"params: {len(missing)} tensor(s) are not trainable parameters of the model")
        if not self.params:
            raise ValueError("no trainable parameter to track in the model")
        devs = {p.device for p in self.params}
        if len(devs) > 1:
            raise ValueError(f"all tracked parameters must be on one device, found {sorted(map(str, devs))}")
        self.device = devs.pop()
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        P = len(self.params)
        # rows: sum of norms, sum of squared norms, count, grad weight
        self._acc = torch.zeros(4, P, device=self.device, dtype=dtype)
        self.local_count = [0] * P
        self._called: set[int] = set()
        self._handles = [model.register_forward_pre_hook(self._new_forward)]
        for i, e in enumerate(self._entries):
            # prepend: see the module's own output, before hooks that replace it (tensor parallelism
            # turns a DTensor output into its local shard in a forward hook)
            self._handles.append(e.module.register_forward_hook(self._make_forward_hook(i), prepend=True))

    # ------------------------------------------------------------------ hooks
    def _check_scale(self):
        s = self.loss_scale
        if isinstance(s, Tensor):
            if s.numel() != 1:
                raise ValueError(f"loss_scale: expected a number or a 0-d tensor, got shape {tuple(s.shape)}")
        elif isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"invalid loss_scale={s!r}: expected a finite number > 0 (or a 0-d tensor)")

    def _new_forward(self, module, args):
        self._called.clear()

    def _make_forward_hook(self, i: int):
        return _ForwardHook(self, i)

    def _forward(self, i: int, module, inputs, output):
        entry = self._entries[i]
        if not self.enabled or not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
            return
        if i in self._called:
            raise RuntimeError(
                f"module {entry.name!r} ({type(module).__name__}) ran twice in one forward pass: "
                "the per-sample gradient of a reused module is the sum of its uses and is not "
                "supported (give each use its own module)")
        self._called.add(i)
        holder = [inputs[0]]
        output.register_hook(lambda grad: self._backward(entry, holder, grad))

    @torch.no_grad()
    def _backward(self, entry: _Entry, holder: list, grad: Tensor):
        x = holder[0]
        holder[0] = None  # release the input reference as soon as it is used
        if x is None or not self.enabled:
            return None
        b = x.shape[0] if x.dim() > 0 else 1
        s = self.loss_scale / b if self.loss_reduction == "mean" else self.loss_scale
        j0, k = entry.start, len(entry.pnames)
        self._acc[3, j0:j0 + k] += s * b if not isinstance(s, Tensor) else (s * b).to(self._acc)
        n = b
        if self.persample_subset is not None:
            n = max(0, min(b, self.persample_subset - entry.used))
        if n == 0:
            return None
        sq = entry.rule(entry.module, x, grad, n, set(entry.pnames), self.max_chunk_bytes)
        sq = torch.stack([_full(sq[p], x, grad) for p in entry.pnames]).to(self._acc.dtype)  # [k, n]
        inv = 1.0 / s if not isinstance(s, Tensor) else (1.0 / s).to(self._acc)
        self._acc[0, j0:j0 + k] += sq.sqrt().sum(1) * inv
        self._acc[1, j0:j0 + k] += sq.sum(1) * (inv * inv)
        self._acc[2, j0:j0 + k] += n
        entry.used += n
        for j in range(j0, j0 + k):
            self.local_count[j] += n
        return None

    # ------------------------------------------------------------------ API
    def reset(self) -> None:
        """Drop everything accumulated since the last :meth:`collect`."""
        self._acc.zero_()
        self.local_count = [0] * len(self.params)
        for e in self._entries:
            e.used = 0

    def collect(self, reset: bool = True, sync: bool = True) -> PerSampleStats:
        """Statistics accumulated since the last collect (over micro-batches and, with
        ``sync`` and an initialized process group, over ranks: one ``all_reduce``)."""
        buf = self._acc.clone()
        local = list(self.local_count)
        dist = torch.distributed
        if sync and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size(self.process_group)
            if world > 1:
                dist.all_reduce(buf, group=self.process_group)
                buf[3] /= world  # DDP averages gradients over ranks
        if reset:
            self.reset()
        return PerSampleStats(params=list(self.params), names=list(self.names), sum_norm=buf[0],
                              sum_sq=buf[1], count=buf[2], grad_weight=buf[3], local_count=local)

    def remove(self) -> None:
        """Detach all hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "PerSampleGradNorms":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
