"""L2 norms free of overflow and underflow (docs/algorithms.md, section 8), shared by the
optimizers' execution paths (``optim/_paths.py``, ``optim/_compiled.py``) and the DTensor
norms of diagnostics (``_dtensor.py``).

The plain norm (one pass, accumulated in the tensor's dtype) is kept where it is a normal
number well inside the dtype's range; where it is not (``inf`` from squares above the range,
or below :data:`_SAFE_LOW`, where squares may have underflowed, exact zeros included) the norm
is recomputed as ``2^e * ||x / 2^e||`` with ``2^e`` the power of two of ``max |x|`` (BLAS
``nrm2``'s scaling; the division is exact). On the CPU only those tensors are recomputed (a
value of a CPU tensor is read: no device sync); on other devices and inside ``torch.compile``
the recomputation is a ``torch.where`` (float32 and narrower on CUDA accumulate in float64
instead: one pass). Non-finite input keeps a non-finite norm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["norms"]

_INF = float("inf")
#: plain norms at least this large lost nothing to underflowed squares (the lost mass is
#: below ``numel * tiny``, relative ``eps`` for tensors of up to 2^40 elements); smaller
#: ones, exact zeros included, are recomputed scaled
_SAFE_LOW = {torch.float64: 2.0 ** -130, torch.float32: 2.0 ** -31, torch.float16: 2.0 ** -5,
             torch.bfloat16: 2.0 ** -31}


def _scaled_norms(ts: list[Tensor]) -> Tensor:
    """``2^e * ||x / 2^e||`` per tensor, ``2^e`` the power of two of ``max |x|`` (clamped so
    that ``2^-e`` is finite: subnormal maxima are scaled by the largest power the dtype has);
    ``inf`` / NaN maxima give ``inf`` / NaN; empty tensors 0."""
    ts = [t if t.numel() else t.new_zeros(1) for t in ts]
    amax = torch.stack(torch._foreach_norm(ts, _INF))
    top = math.frexp(torch.finfo(amax.dtype).max)[1] - 2    # 2^top and 2^-top are finite
    _, e = torch.frexp(amax)
    e = e.clamp(min=-top, max=top)
    down = torch.ldexp(torch.ones_like(amax), -e)
    n = torch.stack(torch._foreach_norm(torch._foreach_mul(ts, list(down.unbind()))))
    return torch.where(torch.isfinite(amax), torch.ldexp(n, e), amax)


def norms(ts: list[Tensor]) -> Tensor:
    """The L2 norm of each tensor of ``ts`` (one dtype and device), 1-D in that dtype, free of
    overflow and underflow for finite input (module docstring)."""
    x0 = ts[0]
    low = _SAFE_LOW.get(x0.dtype, 0.0)
    if x0.device.type == "cuda" and x0.dtype != torch.float64 and not torch.compiler.is_compiling():
        return torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float64)).to(x0.dtype)
    n = torch.stack(torch._foreach_norm(ts))
    bad = ~(n >= low) | (n == _INF)
    if x0.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bad.any():            # a CPU tensor's value: no device sync
            return n
        idx = bad.nonzero().flatten().tolist()
        return n.index_put((bad.nonzero().flatten(),), _scaled_norms([ts[i] for i in idx]))
    return torch.where(bad, _scaled_norms(ts), n)
