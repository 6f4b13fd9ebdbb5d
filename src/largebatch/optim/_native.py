"""The ``"native"`` execution path: the CPU default for LARS, TVLARS, CLARS, LALC and LAMB.

One C++ call per (group, dtype) bucket updates every tensor of it (``_native.cpp``). Per
tensor, inside one OpenMP region, a first pass reads the tensor for its sums of squares
(``||w||``, ``||g||`` and, for LALC and LAMB, the norm of the update direction ``h`` / ``r``,
computed and dropped), the threads meet once, each computes the trust ratio and layer
learning rate from the same sums, and a second pass updates the slice of the tensor the
thread read in the first, which is still in its cache. A layer-wise step then costs about
one trip through memory, like ``SGD(fused=True)`` (issue 14: the ``compiled`` path's speed
depended on how inductor's loops met the CPU, 1.9x fused SGD on an AMD EPYC and 4x on an
Intel Xeon; memory traffic is what every CPU shares). Measured: docs/performance.md.

* Built on first use with the C++ compiler inductor uses (``$CXX``, else ``c++``/``g++``),
  ``-O3 -march=native -fopenmp -ffp-contract=off``, about 4 s; the library is kept in
  ``<cache>/native/`` (the folder of :func:`largebatch.optim._compiled.cache_path`; where that
  is read-only, ``$TMPDIR/largebatch-<uid>/native/``) under a hash of the source, the flags,
  the compiler and the CPU model, written atomically, so a later process (or another machine
  sharing the folder) loads the one built for its CPU.
* The arithmetic follows each class's ``_update`` operation by operation in the parameters'
  dtype (no fused multiply-adds the reference does not make); norms accumulate in the dtype
  over 256-element blocks and in double across blocks; the scalars (trust ratio, ``lr_k``,
  bias corrections) are computed in the dtype (SPEC "Precision"). Tested equal to the
  per-tensor reference in float64 at 1e-12 and in float32 (``tests/test_native.py``,
  ``tests/test_fast_paths.py``).
* The rule is the one of the class that declares ``_native_rule`` in its own body
  (``"lars"``, ``"lalc"``, ``"lamb"``): a subclass, which may change ``_update``, does not
  inherit it and takes the ``compiled`` path. Per-step inputs come through the class's own
  hooks: ``_lr_factor`` (TVLARS's ``phi(t)``) and ``_trust_norm`` (CLARS's ``n_k``).
* Tensors that are not dense (contiguous or channels-last) with their gradient and state in
  the same layout take the ``foreach`` path in one batch. An optimizer whose parameters hold
  fewer than ``_compiled.MIN_TOTAL`` elements in all takes ``foreach`` (small models never
  build the library); a larger one runs every bucket here, its biases and norm layers too.
* A GradScaler's ``grad_scale`` / ``found_inf`` (``_engine.py``, "Mixed precision") are read
  by the kernel: the unscaling fuses into both passes; no host sync (the tensors are on the CPU).
* No compiler, or ``LARGEBATCH_NO_COMPILE=1`` / ``LARGEBATCH_NO_NATIVE=1``: the ``compiled``
  path (which falls back to ``foreach``); a failed build warns once.
* Sharded (DTensor) parameters take the ``compiled`` path's two kernels (``_sharded.py``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from typing import Any

import torch
from torch import Tensor

from . import _compiled
from ._paths import Foreach, TensorList

__all__ = ["Native", "available", "rule_of", "library_path"]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=c++17",
         "-shared", "-fPIC")
#: compute dtypes the kernels are built for
DTYPES = {torch.float32: "f32", torch.float64: "f64"}

_FAILED = False
_LIB: Any = None
#: elements per block sum of the kernels (``_native.cpp``; read from the library)
BLOCK = 1024


def available() -> bool:
    """Whether the native path may be used (not disabled, no earlier build failure)."""
    off = any(os.environ.get(k, "") not in ("", "0") for k in ("LARGEBATCH_NO_NATIVE", "LARGEBATCH_NO_COMPILE"))
    return not _FAILED and not off


def rule_of(cls: type) -> str | None:
    """The native rule a class declares in its own body (``_native_rule``), or ``None``."""
    return cls.__dict__.get("_native_rule")


def default_path(device: torch.device) -> str | None:
    """``"native"`` where it applies to a class with a rule (a CPU, not inside an outer
    ``torch.compile``, which then traces the step itself), else ``None`` (the next path)."""
    if not torch.compiler.is_compiling() and device.type == "cpu" and available():
        return "native"
    return None


class _Args(ctypes.Structure):
    """``struct Args`` of ``_native.cpp``: every field is 8 bytes, in this order."""
    _fields_ = ([(k, ctypes.c_int64) for k in ("n", "nthreads")]
                + [(k, ctypes.c_void_p) for k in ("numel", "w", "g", "s0", "s1", "count", "lrf", "tn", "scale", "ok")]
                + [(k, ctypes.c_double) for k in ("lr", "mu", "wd", "eta", "eps", "damp", "b1", "b2", "log_b1",
                                                  "log_b2", "max_trust")]
                + [(k, ctypes.c_int64) for k in ("adapt", "nesterov", "clip", "has_max_trust")]
                + [(k, ctypes.c_void_p) for k in ("out", "block_offset", "scratch")])


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@functools.lru_cache(maxsize=None)
def library_path() -> str:
    """Where the library for this source, compiler, flags and CPU is (or will be) kept."""
    cxx = _compiler() or "c++"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        h.update(f.read())
    h.update("\0".join((cxx, version, *FLAGS, _compiled.cpu_model(), torch.backends.cpu.get_cpu_capability()))
             .encode())
    return os.path.join(os.path.dirname(_compiled.cache_path()), "native", f"kernels-{h.hexdigest()[:20]}.so")


def _build(path: str) -> None:
    """Compile ``SOURCE`` into ``path`` atomically (a temporary file in the same folder, then
    ``os.replace``: processes building at once each install a complete library)."""
    cxx = _compiler()
    if cxx is None:
        raise OSError("no C++ compiler found (set $CXX)")
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".kernels.", suffix=".so")
    os.close(fd)
    try:
        res = subprocess.run([cxx, *FLAGS, SOURCE, "-o", tmp], capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise OSError(f"{cxx} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _lib():
    """The loaded library (built on first use), or ``None`` after a failure (warned once)."""
    global _LIB, _FAILED
    if _LIB is None and not _FAILED:
        try:
            path = library_path()
            if not os.path.exists(path):
                try:
                    _build(path)
                except PermissionError:   # a read-only cache folder: this user's temporary one
                    user = getattr(os, "getuid", lambda: "user")()
                    path = os.path.join(tempfile.gettempdir(), f"largebatch-{user}", "native", os.path.basename(path))
                    if not os.path.exists(path):
                        _build(path)
            lib = ctypes.CDLL(path)
            if lib.largebatch_native_abi() != 2:
                raise OSError(f"{path}: unexpected ABI version")
            lib.largebatch_native_block.restype = ctypes.c_int64
            global BLOCK
            BLOCK = lib.largebatch_native_block()
            for rule in ("lars", "lalc", "lamb"):
                for suffix in DTYPES.values():
                    fn = getattr(lib, f"largebatch_{rule}_{suffix}")
                    fn.argtypes, fn.restype = [ctypes.POINTER(_Args)], None
            _LIB = lib
        except (OSError, subprocess.SubprocessError) as e:
            _FAILED = True
            warnings.warn(f"largebatch: the native optimizer path is unavailable ({e}); using the 'compiled' path",
                          RuntimeWarning, stacklevel=5)
    return _LIB


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive slots from ``data_ptr()``: contiguous,
    or channels-last (CPU convolutions are often trained in that format)."""
    return (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
            or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)))


def _fits(p: Tensor, g: Tensor, st: dict[str, Tensor]) -> bool:
    """Whether a tensor of a float32 / float64 CPU bucket can go through the kernel, which reads
    its weight, gradient and full-size state as flat arrays in the same element order: all
    dense with the same strides (the state has the weight's dtype)."""
    if not _dense(p):
        return False
    s = p.stride()
    return g.stride() == s and all(v.dim() == 0 or v.stride() == s for v in st.values())


def _ptrs(ts: list[Tensor]) -> Tensor:
    return torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)


def _addr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Native:
    """Engine path object (``P``) for ``"native"``: :meth:`run` replaces the engine's loop."""

    @staticmethod
    def run(opt, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
            states: list[dict[str, Tensor]], scale: Tensor | None = None, ok: Tensor | None = None):
        """Update ``params`` in place; returns ``fin, trust, lr, w_norm, g_norm`` stacked in
        ``params`` order (``w_norm`` is ``None`` for a non-adapted group), as
        ``LayerwiseOptimizer._masked_update`` does."""
        n = len(params)
        if not available() or params[0].dtype not in DTYPES or params[0].device.type != "cpu":
            return _compiled.Compiled.run(opt, group, params, grads, states, scale, ok)
        # an optimizer too small to pay for building the library (every test and demo model)
        # takes foreach; a large one runs every bucket here, its biases and norm layers too
        total = sum(p.numel() for g in opt.param_groups for p in g["params"])
        idx = [i for i in range(n) if _fits(params[i], grads[i], states[i])] if total >= _compiled.MIN_TOTAL else []
        lib = _lib() if idx else None
        if idx and lib is None:   # the build failed (warned): the compiled path
            return _compiled.Compiled.run(opt, group, params, grads, states, scale, ok)
        rows: list[Any] = [None] * n
        if idx:
            cols = _call(lib, opt, group, [params[i] for i in idx], [grads[i] for i in idx],
                         [states[i] for i in idx], scale, ok)
            if len(idx) == n:
                return cols
            for j, i in enumerate(idx):
                rows[i] = tuple(None if c is None else c[j] for c in cols)
        rest = [i for i in range(n) if rows[i] is None]
        cols = opt._masked_update(group, TensorList(params[i] for i in rest), TensorList(grads[i] for i in rest),
                                  {k: TensorList(states[i][k] for i in rest) for k in states[rest[0]]},
                                  Foreach, scale, ok)
        if not idx:
            return cols
        for j, i in enumerate(rest):
            rows[i] = tuple(None if c is None else c[j] for c in cols)
        return tuple(None if col[0] is None else torch.stack(col) for col in zip(*rows))


def _call(lib, opt, group, params, grads, states, scale, ok):
    """One kernel call on tensors that all fit (:func:`_fits`)."""
    rule, dt = rule_of(type(opt)), params[0].dtype
    n = len(params)
    st = {k: TensorList(s[k] for s in states) for k in states[0]}
    a = _Args()
    a.n, a.nthreads = n, torch.get_num_threads()
    keep = [torch.tensor([p.numel() for p in params], dtype=torch.int64), _ptrs(params), _ptrs(grads)]
    a.numel, a.w, a.g = (t.data_ptr() for t in keep)
    lr = group["lr"]
    a.lr = float(lr)                       # a 0-d tensor on the CPU: read, no device sync
    a.wd, a.eps = float(group["weight_decay"]), float(group["eps"])
    a.adapt = bool(group["adapt"])
    after = []
    if rule == "lars":
        a.mu, a.eta = float(group["momentum"]), float(group["eta"])
        a.nesterov = bool(type(opt)._nesterov_only or group["nesterov"])
        a.clip = bool(group.get("trust_clip"))
        f = opt._lr_factor(group, st, Foreach, dt)
        if isinstance(f, Tensor):          # TVLARS: phi(t) per tensor, in the compute dtype
            keep.append(f.to(dt).contiguous())
            a.lrf = keep[-1].data_ptr()
        else:
            a.lr = a.lr * f
        from .lars import _TrustMomentum
        if a.adapt and type(opt)._trust_norm is not _TrustMomentum._trust_norm:   # CLARS: n_k
            keep.append(opt._trust_norm(group, None, torch.empty((), dtype=dt), st, Foreach).to(dt).contiguous())
            a.tn = keep[-1].data_ptr()
        if a.mu != 0:
            keep.append(_ptrs(st["velocity"].ts))
            a.s0 = keep[-1].data_ptr()
        if "optimizer_steps" in st:        # TVLARS: t counts every step (tvlars.py)
            after.append(st["optimizer_steps"].ts)
    elif rule == "lalc":
        a.mu, a.eta, a.damp = float(group["momentum"]), float(group["eta"]), float(group["dampening"])
        a.nesterov = bool(group["nesterov"])
        if a.mu != 0:
            keep += [_ptrs(st["momentum_buffer"].ts), _ptrs(st["step"].ts)]
            a.s0, a.count = keep[-2].data_ptr(), keep[-1].data_ptr()
    elif rule == "lamb":
        a.b1, a.b2 = (float(b) for b in group["betas"])
        a.log_b1, a.log_b2 = (math.log(b) if b > 0 else -math.inf for b in (a.b1, a.b2))
        mt = group["max_trust"]
        a.has_max_trust, a.max_trust = mt is not None, float(mt) if mt is not None else 0.0
        keep += [_ptrs(st["exp_avg"].ts), _ptrs(st["exp_avg_sq"].ts), _ptrs(st["step"].ts)]
        a.s0, a.s1, a.count = (t.data_ptr() for t in keep[-3:])
    else:
        raise AssertionError(f"unknown native rule {rule!r}")
    if scale is not None:
        keep.append(scale.to(dt).contiguous())
        a.scale = keep[-1].data_ptr()
    if ok is not None:
        keep.append(ok.to(torch.bool).contiguous())
        a.ok = keep[-1].data_ptr()
    out = torch.empty((n, 5), dtype=dt)
    blocks = [(p.numel() + BLOCK - 1) // BLOCK for p in params]
    offsets = [0]
    for b in blocks[:-1]:
        offsets.append(offsets[-1] + b)
    keep.append(torch.tensor(offsets, dtype=torch.int64))
    scratch = torch.empty(3 * (offsets[-1] + blocks[-1]), dtype=torch.float64)
    a.out, a.block_offset, a.scratch = out.data_ptr(), keep[-1].data_ptr(), scratch.data_ptr()
    getattr(lib, f"largebatch_{rule}_{DTYPES[dt]}")(ctypes.byref(a))
    for counters in after:
        torch._foreach_add_(counters, 1)
    return out[:, 0] != 0, out[:, 1], out[:, 2], out[:, 3] if a.adapt else None, out[:, 4]
