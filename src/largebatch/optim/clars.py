"""CLARS, complete layer-wise adaptive rate scaling (Huo, Gu, Huang 2021; seed 004 eq. 4-5,
Alg. 1).

The rule (docs/algorithms.md, "CLARS")::

    n_k   = (1/|J|) sum_{i in J} ||grad_w f_i(w)||          # mean per-sample gradient norm
    trust = eta * ||w|| / (n_k + wd * ||w|| + eps)           # adapted tensors; 1 otherwise
    gamma = lr_t * trust
    b     = momentum * b - gamma * d                         # d = g + wd * w, b starts at 0
    w     = w + momentum * b - gamma * d                     # mNAG (eq. 4), as in TVLARS

``f_i`` is sample ``i``'s own loss, so ``n_k >= ||g||`` and CLARS's trust ratio is LARS's
times ``||mean_i grad f_i|| / mean_i ||grad f_i|| <= 1`` (eq. 5). ``n_k`` comes from
:class:`largebatch.persample.PerSampleGradNorms`, which measures it exactly inside the
ordinary ``loss.backward()`` (no extra passes); with BatchNorm in training mode the
per-sample term is the sample's additive contribution to the batch gradient. Under FSDP2 and
tensor parallelism ``n_k`` is the mean norm of the *full* per-sample gradients over all ranks'
samples (docs/algorithms.md, section 13). Zero-norm rule:
trust = 1 where ``||w|| == 0`` or ``n_k + wd * ||w|| == 0``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..persample import PerSampleGradNorms, PerSampleStats
from ._engine import _state_like, compute_dtype
from .lars import _TrustMomentum

__all__ = ["CLARS"]


class CLARS(_TrustMomentum):
    """CLARS on the LARS-family engine: LARS's trust ratio with the mean per-sample gradient
    norm ``n_k`` in place of ``||g||``, and the mNAG (Nesterov) update.

    Usage::

        opt = CLARS(param_groups(model, weight_decay=5e-4), lr=..., model=model)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()   # per-sample norms measured here
            opt.step()                                # consumes them (all-reduced under DDP)

    Args:
        params: parameters or param groups (see :func:`largebatch.optim.param_groups`).
        lr: learning rate ``lr_t`` (read from ``group["lr"]`` every step).
        momentum: Nesterov momentum of mNAG (default 0.9; 0 disables momentum).
        eta: trust coefficient (default 0.01, seed 004).
        weight_decay: coupled L2 (default 0).
        eps: added to the trust ratio's denominator (default 0).
        adapt: apply the trust ratio to this group (default True).
        model: attach to this model now (same as calling :meth:`attach`).
        persample_subset: measure ``n_k`` on the first ``m`` samples per rank and step (the
            paper's ``|J|``); ``None`` (default) uses the whole batch.
        loss_reduction: ``"mean"`` (default) or ``"sum"``: how the loss passed to
            ``backward`` reduces over the batch (see :class:`~largebatch.persample.PerSampleGradNorms`).
        loss_scale: any further constant the loss was multiplied by, e.g. ``1/k`` for ``k``
            accumulated micro-batches (settable later as ``opt.persample.loss_scale``).
        unscale_persample: under ``torch.amp.GradScaler``, divide the per-sample norms by the
            scaler's ``grad_scale`` inside the step, as the gradients are (default True;
            settable later as ``opt.unscale_persample``): ``loss_scale`` then leaves the
            scaler's scale out (``1/k``, no ``scaler.get_scale()`` host sync), and a scaler in a
            loop that knows nothing of CLARS (Lightning's ``16-mixed``) needs no setting. With
            False (the tracker's contract) ``loss_scale`` includes the scaler's scale: needed
            where the scaler passes no scale (``scaler.unscale_(opt)``, ``amp_unscale_in_step
            = False``).
        maximize, foreach, differentiable: as ``torch.optim`` (see :class:`~largebatch.optim.LARS`).
        path: execution path, see :class:`~largebatch.optim.LayerwiseOptimizer`.

    Only adapted tensors need ``n_k``, so only they are tracked (excluded tensors, by
    default biases and normalization parameters, cost nothing). ``step()`` raises
    ``RuntimeError`` if no model is attached or if an adapted tensor with a gradient has no
    per-sample statistics since the last step. After a step, ``opt.last_persample`` holds
    the statistics it used (``mean_norm()`` is ``n_k``; ``variance_factor()`` is seed 004's
    ``M_k`` while ``.grad`` is still set). State per tensor: ``velocity`` (``-b`` of the
    paper, see :class:`~largebatch.optim.LARS`); ``n_k`` is an input of the step, not state
    (it is not written into checkpoints).

    Mixed precision (``_engine.py``, "Mixed precision"): ``GradScaler.step(opt)`` calls
    ``step()`` with ``grad_scale`` and ``found_inf`` set; the gradients are unscaled inside the
    step, and with ``unscale_persample=True`` so are the per-sample norms (``n_k`` and
    ``last_persample``, whose ``grad_weight`` then matches ``.grad`` as it stays: scaled).
    After an explicit ``scaler.unscale_(opt)`` (gradient clipping) the scaler passes no
    ``grad_scale``: the per-sample norms cannot be unscaled in the step, so there ``loss_scale``
    must include the scale and ``unscale_persample`` be False (``step()`` raises otherwise).
    ``add_param_group`` rebuilds a tracker this optimizer built, over all adapted tensors. A
    step at ``lr = 0`` without statistics (``torch.distributed.checkpoint``'s initialisation)
    only creates state (docs/optimizers.md, "Checkpoints and copies").
    """

    _nesterov_only = True
    compilable = True
    _native_rule = "lars"  # _native.cpp

    def __init__(self, params, lr: float, momentum: float = 0.9, eta: float = 1e-2,
                 weight_decay: float = 0.0, eps: float = 0.0, adapt: bool = True, *,
                 model: nn.Module | None = None, persample_subset: int | None = None,
                 loss_reduction: str = "mean", loss_scale: float | Tensor = 1.0,
                 unscale_persample: bool = True, path: str | None = None, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False):
        defaults = dict(lr=lr, momentum=momentum, eta=eta, weight_decay=weight_decay, eps=eps, adapt=adapt)
        super().__init__(params, defaults, path=path, maximize=maximize, foreach=foreach,
                         differentiable=differentiable)
        self.unscale_persample = unscale_persample
        self.persample: PerSampleGradNorms | None = None
        self.last_persample: PerSampleStats | None = None
        self._n_k: dict[Tensor, Tensor] = {}  # this step's n_k per adapted tensor, set by step()
        self._attached: tuple[nn.Module, dict[str, Any]] | None = None
        if model is not None:
            self.attach(model, persample_subset=persample_subset, loss_reduction=loss_reduction,
                        loss_scale=loss_scale)
        elif persample_subset is not None or loss_reduction != "mean" or not (
                isinstance(loss_scale, (int, float)) and loss_scale == 1.0):
            raise ValueError("persample_subset / loss_reduction / loss_scale need model=... (or pass them to attach())")

    def attach(self, model: nn.Module | PerSampleGradNorms, **tracker_kwargs: Any) -> PerSampleGradNorms:
        """Measure per-sample norms of this optimizer's adapted tensors in ``model``'s backward.

        ``model`` may also be a ready :class:`PerSampleGradNorms` (then no keyword
        arguments). Replaces (and detaches) a previous attachment. Returns the tracker.
        """
        if self.persample is not None:
            self.persample.remove()
            self.persample = None
        self._attached = None
        if isinstance(model, PerSampleGradNorms):
            if tracker_kwargs:
                raise ValueError("attach(tracker) takes no keyword arguments")
            self.persample = model
        else:
            adapted = [p for g in self.param_groups if g["adapt"] for p in g["params"] if p.requires_grad]
            partitioned = _partitioned(self, model)
            if not adapted and not partitioned:
                raise ValueError("CLARS has no adapted parameter to measure (every group has adapt=False)")
            if partitioned:
                # ZeroRedundancyOptimizer: each rank's CLARS holds a part of the model, but the
                # statistics are all-reduced over the ranks, so every rank measures the same
                # tensors: all trainable ones it has a rule for (the others get none)
                tracker_kwargs = {"unsupported": "skip", **tracker_kwargs}
                self.persample = PerSampleGradNorms(model, **tracker_kwargs)
            else:
                self.persample = PerSampleGradNorms(model, params=adapted, **tracker_kwargs)
            self._attached = (model, tracker_kwargs)
        return self.persample

    def _group_added(self, group):
        """A group added after construction (``add_param_group``): its adapted tensors need
        per-sample statistics, so a tracker this optimizer built is rebuilt over all adapted
        tensors (statistics measured since the last step are dropped: add groups between steps)."""
        attached = getattr(self, "_attached", None)
        if not group["adapt"] or getattr(self, "persample", None) is None:
            return
        if attached is None:
            raise ValueError("CLARS.add_param_group with adapted tensors: the attached tracker was built outside "
                             "this optimizer and cannot measure them; attach a tracker over all adapted tensors "
                             "(opt.attach(...)) or add the group with adapt=False")
        model, kwargs = attached
        kwargs = {**kwargs, "loss_scale": self.persample.loss_scale}
        self.attach(model, **kwargs)

    def detach(self) -> None:
        """Remove the hooks (``step()`` then raises until :meth:`attach` is called again)."""
        if self.persample is not None:
            self.persample.remove()
            self.persample = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._call_closure(closure)
        if self.persample is None:
            raise RuntimeError("CLARS needs per-sample gradient norms: create it with model=... or call "
                               "opt.attach(model) before the backward pass")
        stats = self.persample.collect()
        if self.unscale_persample:
            stats = self._unscaled(stats)
        pos = stats.index()
        n_k = stats.mean_norm()
        inputs, missing, missing_params = {}, [], []
        for g in self.param_groups:
            if not g["adapt"]:
                continue
            for p in g["params"]:
                if p.grad is None:
                    continue
                j = pos.get(id(p))
                if j is None or stats.local_count[j] == 0:
                    missing_params.append(p)
                    missing.append(stats.names[j] if j is not None else f"{g.get('name', 'group')} {tuple(p.shape)}")
                else:
                    inputs[p] = n_k[j].to(compute_dtype(p.dtype))  # docs/algorithms.md section 8
        if missing and all(float(g["lr"]) == 0 for g in self.param_groups if g["adapt"]):
            return self._step_without_statistics(missing_params, loss)   # (a read on the error path only)
        if missing:
            raise RuntimeError(
                f"CLARS step without per-sample statistics for {len(missing)} adapted tensor(s) "
                f"(e.g. {missing[:3]}): run the backward pass through the attached model between "
                "two steps, and attach to the model that owns these parameters")
        self.last_persample = stats
        self._n_k = inputs
        try:
            super().step()
        finally:
            self._n_k = {}
        return loss

    def _step_without_statistics(self, params: list[Tensor], loss):
        """A step at ``lr = 0`` with gradients but without per-sample statistics for some
        adapted tensors (``torch.distributed.checkpoint``'s initialisation sets zero gradients
        and ``lr = 0`` and calls ``step()`` with no backward): no ``n_k`` exists, and at
        ``lr = 0`` CLARS moves nothing whatever ``n_k`` is, so these tensors only get their
        state created (as a step creates it) and the rest takes its step. At ``lr > 0`` a step
        without statistics raises (docs/clars.md)."""
        for group in self.param_groups:
            for p in group["params"]:
                if any(p is q for q in params) and not self.state[p]:
                    self.state[p].update(self._init_state(_state_like(p), group))
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            self.last_persample = None
            super().step()
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        return loss

    def _unscaled(self, stats: PerSampleStats) -> PerSampleStats:
        """``stats`` with the GradScaler's ``grad_scale`` taken out (device ops, no sync): norms
        divided by it, ``grad_weight`` multiplied (``.grad`` keeps the scale)."""
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            if getattr(self, "_amp_found_inf", None) is not None:
                raise RuntimeError(
                    "CLARS(unscale_persample=True) after scaler.unscale_(opt): the scaler passes no grad_scale, "
                    "so the per-sample norms cannot be unscaled in step(); set unscale_persample=False and "
                    "opt.persample.loss_scale = scaler.get_scale() * <your loss factor> before the backward")
            return stats
        s = torch.as_tensor(scale).to(device=stats.sum_norm.device, dtype=stats.sum_norm.dtype, non_blocking=True)
        return dataclasses.replace(stats, sum_norm=stats.sum_norm / s, sum_sq=stats.sum_sq / (s * s),
                                   grad_weight=stats.grad_weight * s)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``, and drop the per-sample statistics measured since
        the last step: they belong to the gradient being cleared. (A loop that skips a step
        without calling :meth:`step`, which is where statistics are consumed, would otherwise
        add them to the next step's; ``GradScaler`` calls ``step()`` with ``found_inf`` set.)
        ``model.zero_grad()`` does not do this: call the optimizer's."""
        super().zero_grad(set_to_none)
        if self.persample is not None:
            self.persample.reset()

    def _step_inputs(self, group, params):
        # n_k of this step (docs/algorithms.md, "CLARS"), read by _trust_norm through `st`,
        # so that _update reads only (group, w, g, st) and runs on every path
        if not group["adapt"]:
            return {}
        return {"persample_norm": [self._n_k[p] for p in params]}

    def _native_trust_norm(self, group, st, dtype):
        from ._paths import Foreach
        return self._trust_norm(group, None, torch.empty((), dtype=dtype), st, Foreach)

    def _trust_norm(self, group, w, g_norm, st, P) -> Tensor:
        return P.stack(st["persample_norm"]).to(g_norm.dtype)


def _partitioned(opt: CLARS, model: nn.Module) -> bool:
    """Whether ``opt`` holds only part of ``model``'s trainable parameters in a multi-process run
    (``ZeroRedundancyOptimizer`` gives each rank's optimizer one partition)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    mine = {id(p) for g in opt.param_groups for p in g["params"]}
    return any(id(p) not in mine for p in model.parameters() if p.requires_grad)
