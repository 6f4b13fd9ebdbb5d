"""The eager execution paths: how an algorithm's ``_update`` sees its tensors.

An ``_update`` is written once, with in-place ``Tensor`` methods (``mul_``, ``addcmul_``,
``div_``, ...) and per-tensor scalars as 0-d tensors. The path object ``P`` it receives
supplies the few operations whose spelling differs between paths:

* ``P.norm(x)``: the L2 norm of each tensor (0-d, or a 1-D vector over the bucket);
* ``P.coef(v)``: a per-tensor scalar ready to multiply tensors;
* ``P.stack(x)``: 0-d state tensors (step counters) as a vector over the bucket;
* ``P.zero_unless(mask, x)``: ``x`` where ``mask`` holds, zeros elsewhere;

Norms never overflow or underflow for finite input (docs/algorithms.md, section 8):
:func:`largebatch._norms.norms` recomputes scaled the norms where one pass is not safe.

``PerTensor`` (the readable reference) hands ``_update`` one tensor at a time; ``Foreach``
hands it :class:`TensorList` objects, whose methods are ``torch._foreach_*`` calls over
every tensor of a (device, dtype) bucket. The compiled path (``_compiled.py``) runs the
per-tensor spelling inside ``torch.compile``; the native path (``_native.py``) is each
package rule spelled once more, in C++, tested equal to this one.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from .._norms import norms

__all__ = ["TensorList", "PerTensor", "Foreach", "Replay", "norms"]


def _ts(x):
    return x.ts if isinstance(x, TensorList) else x


class TensorList:
    """A list of tensors answering ``Tensor``'s arithmetic methods, each as one
    ``torch._foreach_*`` call over the list. Arguments may be Python numbers, other
    ``TensorList`` objects, or a ``TensorList`` of 0-d tensors (one per tensor, from
    ``P.coef``). The in-place methods (``add_``, ``mul_``, ``addcdiv_``, ``sqrt_`` ...)
    return ``self``; the others (``add``, ``div``, ``sqrt`` ...) a new ``TensorList``.
    The set is the one of ``torch._foreach_*`` (see ``_BINARY``, ``_UNARY`` below), so an
    Adam-family rule (``lerp_``, ``addcdiv_``, ``div_``, ``maximum_``) needs no edit here.
    """

    __slots__ = ("ts",)

    def __init__(self, ts: Iterable[Tensor]):
        self.ts = list(ts)

    def add_(self, other, alpha: float = 1) -> "TensorList":
        if isinstance(other, TensorList):
            torch._foreach_add_(self.ts, other.ts, alpha=alpha)
        else:  # a number: Tensor.add_(number, alpha) adds alpha * number
            torch._foreach_add_(self.ts, other * alpha)
        return self

    def add(self, other, alpha: float = 1) -> "TensorList":
        if isinstance(other, TensorList):
            return TensorList(torch._foreach_add(self.ts, other.ts, alpha=alpha))
        return TensorList(torch._foreach_add(self.ts, other * alpha))

    def copy_(self, src: "TensorList") -> "TensorList":
        torch._foreach_copy_(self.ts, src.ts)
        return self

    def zero_(self) -> "TensorList":
        torch._foreach_zero_(self.ts)
        return self


def _binary(name: str):
    inplace, outplace = getattr(torch, f"_foreach_{name}_"), getattr(torch, f"_foreach_{name}")

    def method_(self, *args, **kwargs):
        inplace(self.ts, *map(_ts, args), **kwargs)
        return self

    def method(self, *args, **kwargs):
        return TensorList(outplace(self.ts, *map(_ts, args), **kwargs))

    return method_, method


#: ``Tensor`` methods that take tensors or scalars (``x.mul_(c)``, ``x.addcdiv_(a, b, value=v)``)
_BINARY = ("sub", "mul", "div", "addcmul", "addcdiv", "lerp", "maximum", "minimum",
           "clamp_min", "clamp_max", "pow")
#: ``Tensor`` methods without arguments (``x.sqrt()``, ``x.reciprocal_()``)
_UNARY = ("sqrt", "rsqrt", "reciprocal", "neg", "abs", "exp", "log", "sign")

for _name in _BINARY + _UNARY:
    _m_, _m = _binary(_name)
    _m_.__name__, _m.__name__ = f"{_name}_", _name
    setattr(TensorList, f"{_name}_", _m_)
    setattr(TensorList, _name, _m)
del _name, _m_, _m


def _stacked(rows) -> tuple:
    """Per-tensor output rows ``(fin, trust, lr, w_norm, g_norm)`` as columns (``None`` stays)."""
    return tuple(None if col[0] is None else torch.stack(col) for col in zip(*rows))


class PerTensor:
    """Reference path: ``_update`` sees one tensor at a time; per-tensor scalars are 0-d.

    Every path object offers the same three entry points, used by the engine and the sharded
    flow alike: ``run`` (one step of a bucket; returns ``fin, trust, lr, w_norm, g_norm`` in
    ``params`` order), ``local_norms`` (``[n, k]``, sharded parameters' phase 1) and
    ``run_given`` (the step with the reduced norms). ``fuses_scale``: whether a GradScaler's
    scale is applied inside both sharded phases (kernels) or divided out once beforehand."""

    fuses_scale = False

    @staticmethod
    def run(opt, group, params, grads, states, scale=None, ok=None):
        return _stacked([opt._masked_update(group, w, g, st, PerTensor, scale, ok)
                         for w, g, st in zip(params, grads, states)])

    @staticmethod
    def local_norms(opt, group, params, grads, states, scale=None) -> Tensor:
        return torch.stack([opt._local_norms(group, w, g, st, PerTensor, scale)
                            for w, g, st in zip(params, grads, states)])

    @staticmethod
    def run_given(opt, group, params, grads, states, norms: Tensor, scale=None, ok=None):
        return _stacked([opt._given_update(group, w, g, st, norms[i], PerTensor, scale, ok)
                         for i, (w, g, st) in enumerate(zip(params, grads, states))])

    @staticmethod
    def norm(x: Tensor) -> Tensor:
        return norms([x])[0]

    @staticmethod
    def coef(v: Tensor) -> Tensor:
        return v

    @staticmethod
    def stack(x: Tensor) -> Tensor:
        return x

    @staticmethod
    def zero_unless(mask: Tensor, x: Tensor) -> Tensor:
        return torch.where(mask, x, 0)



def _lists(params, grads, states):
    return TensorList(params), TensorList(grads), {k: TensorList(s[k] for s in states) for k in states[0]}


class Foreach:
    """Multi-tensor path: ``_update`` sees a :class:`TensorList`; per-tensor scalars are
    1-D vectors while computed and a ``TensorList`` of 0-d tensors when applied. Entry points
    as :class:`PerTensor`'s."""

    fuses_scale = False

    @staticmethod
    def run(opt, group, params, grads, states, scale=None, ok=None):
        return opt._masked_update(group, *_lists(params, grads, states), Foreach, scale, ok)

    @staticmethod
    def local_norms(opt, group, params, grads, states, scale=None) -> Tensor:
        return opt._local_norms(group, *_lists(params, grads, states), Foreach, scale)

    @staticmethod
    def run_given(opt, group, params, grads, states, norms: Tensor, scale=None, ok=None):
        return opt._given_update(group, *_lists(params, grads, states), norms, Foreach, scale, ok)

    @staticmethod
    def norm(x: TensorList) -> Tensor:
        return norms(x.ts)

    @staticmethod
    def coef(v: Tensor) -> TensorList:
        return TensorList(v.unbind())

    @staticmethod
    def stack(x: TensorList) -> Tensor:
        return torch.stack(x.ts)

    @staticmethod
    def zero_unless(mask: Tensor, x: TensorList) -> TensorList:
        return TensorList(torch.where(m, t, 0) for m, t in zip(mask.unbind(), x.ts))



class Replay:
    """``P`` for an ``_update`` whose norms were computed beforehand (sharded parameters:
    ``_sharded.py`` all-reduces them before any update). ``norm(x)`` returns the next of the
    given norms (``[..., e]``, in the order ``_update`` asks for them, see
    ``LayerwiseOptimizer._norm_operands``) and ignores ``x``; the rest is ``base``'s."""

    def __init__(self, base, norms: Tensor):
        self.base = base
        self._queue = list(norms.unbind(-1))

    def norm(self, x) -> Tensor:
        if not self._queue:
            raise RuntimeError(
                "_update asked for more norms through P.norm than the class declares for sharded (DTensor) "
                "parameters: define _n_norm_operands and _norm_operands (see LAMB; docs/algorithms.md, section 13)")
        return self._queue.pop(0)

    def coef(self, v):
        return self.base.coef(v)

    def stack(self, x):
        return self.base.stack(x)

    def zero_unless(self, mask, x):
        return self.base.zero_unless(mask, x)

    def done(self) -> None:
        if self._queue:
            raise RuntimeError("_update used fewer norms through P.norm than _n_norm_operands declares")
