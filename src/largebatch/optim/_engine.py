"""The engine shared by every largebatch optimizer.

Every layer-wise optimizer here is "a base direction + a layer-wise rule" (SPEC, notation):
the engine does everything else once:

* collects the parameters of a group that have a gradient (``grad is None`` is skipped,
  sparse gradients raise), creates their state lazily;
* computes the per-tensor norms ``||w||`` and ``||g||`` in one batched call;
* decides, per tensor and on the device, whether the gradient is finite: a tensor with a
  non-finite gradient is left untouched, weights and state alike (its coefficients become
  the identity and its gradient is replaced by zeros) and ``found_inf`` is raised;
* runs the algorithm's ``_update`` on one of two execution paths, tested equal:

  - ``"per_tensor"``: a Python loop, one tensor at a time (the readable reference);
  - ``"foreach"``: the same code on :class:`TensorList` objects, whose methods are
    ``torch._foreach_*`` ops over all tensors of a (device, dtype) bucket.

  An algorithm's ``_update`` is written once, with in-place ``Tensor`` methods
  (``mul_``, ``addcmul_``, ...) and with per-tensor scalars as 0-d tensors; ``P`` (the path)
  supplies the few operations whose spelling differs (norms, per-tensor coefficients).

There is no host-device synchronization inside ``step()``: per-tensor decisions (zero norm
rules, non-finite skips, clipping) are ``torch.where`` on device tensors, never a Python
``if`` on a tensor value. Python branches only look at hyper-parameters.

Diagnostics: with ``opt.track_stats = True`` the engine keeps, after each step, the norms
and the trust ratio / per-layer learning rate it applied (SPEC "Diagnostics") as device
tensors; :meth:`LayerwiseOptimizer.layer_stats` returns them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

__all__ = ["LayerwiseOptimizer", "TensorList", "PATHS"]

PATHS = ("per_tensor", "foreach", "compiled")


def _ts(x):
    return x.ts if isinstance(x, TensorList) else x


class TensorList:
    """A list of tensors that answers the in-place ``Tensor`` methods used by ``_update``,
    each as one ``torch._foreach_*`` call. Scalars may be Python numbers or a ``TensorList``
    of 0-d tensors (one per tensor, broadcast)."""

    __slots__ = ("ts",)

    def __init__(self, ts: Iterable[Tensor]):
        self.ts = list(ts)

    def __len__(self) -> int:
        return len(self.ts)

    def mul_(self, other) -> "TensorList":
        torch._foreach_mul_(self.ts, _ts(other))
        return self

    def add_(self, other, alpha: float = 1) -> "TensorList":
        if isinstance(other, TensorList):
            torch._foreach_add_(self.ts, other.ts, alpha=alpha)
        else:
            torch._foreach_add_(self.ts, other)
        return self

    def addcmul_(self, t1: "TensorList", t2, value: float = 1) -> "TensorList":
        torch._foreach_addcmul_(self.ts, t1.ts, _ts(t2), value=value)
        return self

    def reciprocal_(self) -> "TensorList":
        torch._foreach_reciprocal_(self.ts)
        return self

    def sqrt(self) -> "TensorList":
        return TensorList(torch._foreach_sqrt(self.ts))


class _PerTensor:
    """Reference path: ``_update`` sees one tensor at a time; per-tensor scalars are 0-d."""

    name = "per_tensor"

    @staticmethod
    def norm(x: Tensor) -> Tensor:
        return torch.linalg.vector_norm(x)

    @staticmethod
    def coef(v: Tensor) -> Tensor:
        return v

    @staticmethod
    def stack(x: Tensor) -> Tensor:
        return x

    @staticmethod
    def zero_unless(mask: Tensor, x: Tensor) -> Tensor:
        return torch.where(mask, x, 0)


class _Foreach:
    """Multi-tensor path: ``_update`` sees a :class:`TensorList`; per-tensor scalars are
    1-D vectors while computed and a ``TensorList`` of 0-d tensors when applied."""

    name = "foreach"

    @staticmethod
    def norm(x: TensorList) -> Tensor:
        return torch.stack(torch._foreach_norm(x.ts))

    @staticmethod
    def coef(v: Tensor) -> TensorList:
        return TensorList(v.unbind())

    @staticmethod
    def stack(x: TensorList) -> Tensor:
        return torch.stack(x.ts)

    @staticmethod
    def zero_unless(mask: Tensor, x: TensorList) -> TensorList:
        return TensorList(torch.where(m, t, 0) for m, t in zip(mask.unbind(), x.ts))


_PATH_IMPL = {"per_tensor": _PerTensor, "foreach": _Foreach}


def _check(name: str, value: Any, ok: bool, accepted: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: expected {accepted}")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_nonneg(name: str, x: Any) -> None:
    _check(name, x, _is_real(x) and x >= 0, "a finite number >= 0")


def check_unit(name: str, x: Any, closed: bool = False) -> None:
    ok = _is_real(x) and 0 <= x and (x <= 1 if closed else x < 1)
    _check(name, x, ok, "a number in [0, 1]" if closed else "a number in [0, 1)")


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define ``_defaults`` validation, ``_init_state`` and ``_update``.

    Group keys shared by all: ``lr``, ``weight_decay`` (coupled L2: ``d = g + wd * w``),
    ``adapt`` (apply the layer-wise rule to this group; excluded groups get the plain base
    update at ``lr`` -- see :func:`largebatch.optim.param_groups`).

    ``lr`` may be a float or a 0-d float tensor. A tensor on the parameters' device keeps
    ``step()`` free of host values (TVLARS/LAMB/LALC step counters already live there), so
    the step can be captured in a CUDA graph; LR schedulers update such a tensor in place.

    ``path``: ``None`` picks the fastest available path for the device (``"compiled"`` on
    CPU, see ``_compiled.py``; ``"foreach"`` elsewhere), ``"per_tensor"`` forces the
    reference loop.
    """

    #: group keys accepted besides the defaults (set by users, schedulers, or the engine)
    _extra_group_keys = frozenset({"params", "name", "initial_lr"})

    def __init__(self, params, defaults: dict[str, Any], path: str | None = None):
        if path is not None and path not in PATHS:
            raise ValueError(f"invalid path={path!r}: expected None or one of {PATHS}")
        self.path = path
        self.track_stats = False
        self._stats: list[dict[str, Any]] = []
        self.found_inf: Tensor | None = None
        defaults = {"adapt": True, **defaults}
        self._validate_group(defaults, where="")
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    def _validate_hparams(self, g: dict[str, Any]) -> None:
        """Subclasses: raise ``ValueError`` naming the argument and its accepted range."""
        raise NotImplementedError

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor):  # e.g. on the params' device, for CUDA-graph capture
            _check(f"lr{where}", lr, lr.dim() == 0 and lr.is_floating_point(), "a float or a 0-d float tensor")
            check_nonneg(f"lr{where}", float(lr))  # once, at construction: not in step()
        else:
            check_nonneg(f"lr{where}", lr)
        check_nonneg(f"weight_decay{where}", group["weight_decay"])
        _check(f"adapt{where}", group["adapt"], isinstance(group["adapt"], bool), "True or False")
        try:
            self._validate_hparams(group)
        except ValueError as e:
            raise ValueError(f"{e}{where}") from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        known = set(self.defaults) | self._extra_group_keys
        unknown = sorted(set(param_group) - known)
        if unknown:
            raise ValueError(
                f"unknown param-group key(s) {unknown} for {type(self).__name__}; "
                f"accepted keys: {sorted(known - {'params'})}"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group, where=f" (param group {len(self.param_groups) - 1})")

    # ------------------------------------------------------------------ algorithm hooks
    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """Return the initial state tensors of parameter ``p`` (created on first step)."""
        return {}

    def _update(self, group, w, g, st, w_norm, g_norm, fin, P) -> tuple[Tensor, Tensor]:
        """Update ``w`` (and the state ``st``) in place from the finite-masked gradient ``g``.

        ``w``, ``g`` and the values of ``st`` are tensors (per-tensor path) or
        :class:`TensorList` (foreach path). ``w_norm`` (``None`` when the group is not
        adapted), ``g_norm`` and ``fin`` (gradient finite) are 0-d / 1-D tensors.
        Returns the trust ratio and the per-layer learning rate applied (for diagnostics).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ engine
    def _path_for(self, device: torch.device) -> str:
        return self.path or default_path(device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._stats = []
        found_inf = None
        for group in self.param_groups:
            buckets: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        "(use a dense embedding, e.g. nn.Embedding(sparse=False))"
                    )
                buckets[(p.device, p.dtype)].append(p)
            for (device, _), params in buckets.items():
                fin = self._run(group, params, _PATH_IMPL[self._path_for(device)])
                bad = ~fin.all()
                found_inf = bad if found_inf is None else found_inf | bad.to(found_inf.device)
        self.found_inf = found_inf
        return loss

    def _states(self, group, params: list[Tensor]) -> list[dict[str, Tensor]]:
        out = []
        for p in params:
            st = self.state[p]
            if not st:
                st.update(self._init_state(p, group))
            out.append(st)
        return out

    def _run(self, group, params: list[Tensor], P) -> Tensor:
        grads = [p.grad for p in params]
        states = self._states(group, params)
        if P is Compiled:
            fin, trust, lr, wn, gn = Compiled.run(self, group, params, grads, states)
        elif P is _Foreach:
            w, g = TensorList(params), TensorList(grads)
            st = {k: TensorList(s[k] for s in states) for k in states[0]}
            fin, trust, lr, wn, gn = self._masked_update(group, w, g, st, P)
        else:
            rows = [
                self._masked_update(group, w, g, st, P)
                for w, g, st in zip(params, grads, states)
            ]
            fin, trust, lr, wn, gn = (
                None if col[0] is None else torch.stack(col) for col in zip(*rows)
            )
        if self.track_stats:
            n = len(params)
            nan = torch.full((n,), float("nan"), device=fin.device)
            self._stats.append({
                "params": params,
                "w_norm": nan if wn is None else wn.float(),
                "g_norm": gn.float(),
                "trust": torch.broadcast_to(trust, (n,)).float(),
                "lr": torch.broadcast_to(lr, (n,)).float(),
                "adapt": torch.full((n,), group["adapt"], device=fin.device),
            })
        return fin

    def _masked_update(self, group, w, g, st, P):
        g_norm = P.norm(g)
        fin = torch.isfinite(g_norm)
        w_norm = P.norm(w) if group["adapt"] else None
        trust, lr = self._update(group, w, P.zero_unless(fin, g), st, w_norm, g_norm, fin, P)
        return fin, trust, lr, w_norm, g_norm

    # ------------------------------------------------------------------ diagnostics
    def layer_stats(self) -> dict[str, Any]:
        """Per-tensor diagnostics of the last step (requires ``track_stats = True``).

        Returns ``{"params": [...], "w_norm", "g_norm", "trust", "lr": float tensors,
        "adapt": bool tensor}``, concatenated over groups, on the parameters' device (no host
        synchronization happens here; copy to host when you want to log).
        ``w_norm`` is NaN for tensors of non-adapted groups (not computed).
        """
        if not self.track_stats:
            raise RuntimeError("set `optimizer.track_stats = True` before stepping to record layer stats")
        if not self._stats:
            return {"params": [], **{k: torch.empty(0) for k in ("w_norm", "g_norm", "trust", "lr")},
                    "adapt": torch.empty(0, dtype=torch.bool)}
        out: dict[str, Any] = {"params": [p for s in self._stats for p in s["params"]]}
        for k in ("w_norm", "g_norm", "trust", "lr", "adapt"):
            parts = [s[k] for s in self._stats]
            dev = parts[0].device
            out[k] = torch.cat([t.to(dev) for t in parts])
        return out


def zero_norm_safe_ratio(num: Tensor, den: Tensor, scale: float = 1.0, eps: float = 0.0) -> Tensor:
    """``scale * num / (den + eps)``, or 1 where ``num == 0`` or ``den == 0`` (SPEC zero-norm
    rule), computed with ``torch.where`` (no host sync)."""
    ok = (num > 0) & (den > 0)
    return torch.where(ok, scale * num / (den + eps), torch.ones_like(num))


from ._compiled import Compiled, default_path  # noqa: E402  (the compiled path builds on the classes above)

_PATH_IMPL["compiled"] = Compiled
