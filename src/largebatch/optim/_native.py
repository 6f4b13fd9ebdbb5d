"""The ``"native"`` execution path: the CPU default for LARS, TVLARS, CLARS, LALC and LAMB.

One C++ call per (group, dtype) bucket updates every tensor of it (``_native.cpp``). Per
tensor, inside one OpenMP region, a first pass reads the tensor for its sums of squares
(``||w||``, ``||g||`` and, for LALC and LAMB, the norm of the update direction ``h`` / ``r``,
computed and dropped), the threads meet once, each computes the trust ratio and layer
learning rate from the same sums, and a second pass updates the slice of the tensor the
thread read in the first, which is still in its cache. A layer-wise step then costs about
one trip through memory, like ``SGD(fused=True)`` (docs/performance.md: the ``compiled`` path's speed
depended on how inductor's loops met the CPU, 1.9x fused SGD on an AMD EPYC and 4x on an
Intel Xeon; memory traffic is what every CPU shares). Measured: docs/performance.md.

* Built on first use with the C++ compiler inductor uses (``$CXX``, else ``c++``/``g++``),
  ``-O3 -march=native -fopenmp -ffp-contract=off``, about 4 s; the library is kept in
  ``<cache>/native/`` (:func:`largebatch.optim._compiled.cache_dir`; where that
  is read-only, ``$TMPDIR/largebatch-<uid>/native/``) under a hash of the source, the flags,
  the compiler and the CPU model, written atomically, so a later process (or another machine
  sharing the folder) loads the one built for its CPU.
* The arithmetic follows each class's ``_update`` operation by operation in the parameters'
  dtype (no fused multiply-adds the reference does not make); norms accumulate in the dtype
  in 16 lanes over blocks of 1024 elements and in double across blocks (a float32 block whose
  sum may have over- or underflowed is redone in double); the scalars (trust ratio, ``lr_k``,
  bias corrections) are computed in the dtype (docs/algorithms.md section 8). Tested equal to the
  per-tensor reference in float64 at 1e-12 and in float32 (``tests/test_native.py``,
  ``tests/test_fast_paths.py``).
* The rule is the one of the class that declares ``_native_rule`` in its own body
  (``"lars"``, ``"lalc"``, ``"lamb"``): a subclass, which may change ``_update``, does not
  inherit it and takes the ``compiled`` path. The class declares its kernel arguments once,
  in ``_native_spec`` (a :class:`NativeSpec`: its hyper-parameters, per-tensor inputs such as
  TVLARS's ``phi(t)`` and CLARS's ``n_k``, the state keys the kernel reads, and what follows
  the kernel, TVLARS's step counter); this module only moves them into ``struct Args``.
* Tensors that are not dense (contiguous or channels-last) with their gradient and state in
  the same layout take the ``foreach`` path in one batch. An optimizer whose parameters hold
  fewer than ``_compiled.MIN_TOTAL`` elements in all takes ``foreach`` (small models never
  build the library); a larger one runs every bucket here, its biases and norm layers too.
* A GradScaler's ``grad_scale`` / ``found_inf`` (``_engine.py``, "Mixed precision") are read
  by the kernel: the unscaling fuses into both passes; no host sync (the tensors are on the CPU).
* No compiler, or ``LARGEBATCH_NO_COMPILE=1`` / ``LARGEBATCH_NO_NATIVE=1``: the ``compiled``
  path (which falls back to ``foreach``); a failed build warns once.
* Sharded (DTensor) parameters (``_sharded.py``): the kernel's pass 1 alone gives the local
  norms (:meth:`Native.local_norms`); after the step's one all-reduce, the kernel
  without pass 1 applies the update with the reduced norms (:meth:`Native.run_given`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
import warnings
from typing import Any

import torch
from torch import Tensor

from . import _compiled
from ._compiled import _lists
from ._paths import Foreach

__all__ = ["Native", "NativeSpec", "available", "rule_of", "library_path"]

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


def applies(device: torch.device) -> bool:
    """Whether a class with a rule defaults to the native path on ``device``: a CPU, the path
    available, and not inside an outer ``torch.compile`` (which then traces the step itself)."""
    return not torch.compiler.is_compiling() and device.type == "cpu" and available()


class NativeSpec:
    """What a class with a native rule hands its kernel (``LayerwiseOptimizer._native_spec``):
    ``scalars`` (fields of ``struct Args``: ``mu``, ``eta``, ``b1``, ... and ``lr`` where the
    class folds a factor into it), ``inputs`` (per-tensor 1-D tensors: ``lrf``, ``tn``),
    ``state`` (the state keys read as ``s0``, ``s1``, ``count``; ``None`` for none) and
    ``after`` (called after the kernel updated: TVLARS's step counter)."""

    __slots__ = ("scalars", "inputs", "state", "after")

    def __init__(self, scalars: dict[str, Any], inputs: dict[str, Tensor] | None = None,
                 state: tuple[str | None, ...] = (), after=None):
        self.scalars, self.inputs, self.state, self.after = scalars, inputs or {}, state, after


class _Args(ctypes.Structure):
    """``struct Args`` of ``_native.cpp``: every field is 8 bytes, in this order."""
    _fields_ = ([(k, ctypes.c_int64) for k in ("n", "nthreads")]
                + [(k, ctypes.c_void_p) for k in ("numel", "w", "g", "s0", "s1", "count", "lrf", "tn", "scale", "ok")]
                + [(k, ctypes.c_double) for k in ("lr", "mu", "wd", "eta", "eps", "damp", "b1", "b2", "log_b1",
                                                  "log_b2", "max_trust")]
                + [(k, ctypes.c_int64) for k in ("adapt", "nesterov", "clip", "has_max_trust")]
                + [(k, ctypes.c_void_p) for k in ("out", "block_offset", "scratch")]
                + [("mode", ctypes.c_int64), ("sums", ctypes.c_void_p)])


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
    return os.path.join(_compiled.cache_dir(), "native", f"kernels-{h.hexdigest()[:20]}.so")


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
            if lib.largebatch_native_abi() != 4:
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


#: 0-d state the kernel reads as an int64 counter (``Args::count``)
_COUNTERS = ("step",)


def _check_meta(opt, p: Tensor, g: Tensor, st: dict[str, Tensor]) -> None:
    """Refuse, before the kernel reads raw memory, a gradient or state tensor that does not
    match its parameter (metadata only: no read of a value, no sync): full-size state and the
    gradient have the parameter's shape and dtype and, like the parameter, live on the CPU (the
    native path's only device); counters are one-element int64 tensors. A state of another
    shape would make the kernel read and write out of bounds. Runs every step: one comparison
    per tensor, the message only on failure."""
    shape, dtype = p.shape, p.dtype
    if not (isinstance(g, Tensor) and g.shape == shape and g.dtype == dtype and g.is_cpu):
        _refuse_meta(opt, p, "grad", g)
    for k, v in st.items():
        if not isinstance(v, Tensor) or not v.is_cpu:
            _refuse_meta(opt, p, k, v)
        if v.dim() == 0:
            if k in _COUNTERS and v.dtype != torch.int64:
                _refuse_meta(opt, p, k, v)
        elif v.shape != shape or v.dtype != dtype:
            _refuse_meta(opt, p, k, v)


def _refuse_meta(opt, p: Tensor, k: str, v) -> None:
    """The error of :func:`_check_meta`: which parameter, which tensor, what it is and should be."""
    if isinstance(v, Tensor) and v.dim() == 0 and k != "grad":
        want = "a 0-d int64 tensor" if k in _COUNTERS else "a 0-d tensor"
    else:
        want = f"a {p.dtype} tensor of shape {tuple(p.shape)} on {p.device}"
    got = (f"a {v.dtype} tensor of shape {tuple(v.shape)} on {v.device}" if isinstance(v, Tensor)
           else f"a {type(v).__name__}")
    index = next((j for j, q in enumerate(q for grp in opt.param_groups for q in grp["params"]) if q is p), "?")
    raise ValueError(f"{type(opt).__name__}: parameter {index}: {'its gradient' if k == 'grad' else f'state {k!r}'} "
                     f"is {got}, expected {want} (was the state loaded from another model or changed by hand?)")


MODE_FULL, MODE_SUMS, MODE_GIVEN = 0, 1, 2   # _native.cpp, struct Args::mode


def _split(opt, params, grads, states):
    """``(lib, idx, rest)``: the library, the indices of the tensors it takes (:func:`_fits`) and
    of the others (``foreach``), or ``None`` when the native path cannot run here (disabled, not
    a float32/float64 CPU bucket, the build failed and warned: the compiled path's turn)."""
    if not available() or params[0].dtype not in DTYPES or params[0].device.type != "cpu":
        return None
    n = len(params)
    # an optimizer too small to pay for building the library (every test and demo model)
    # takes foreach; a large one runs every bucket here, its biases and norm layers too
    if sum(p.numel() for g in opt.param_groups for p in g["params"]) < _compiled.MIN_TOTAL:
        return None, [], list(range(n))
    for i in range(n):
        _check_meta(opt, params[i], grads[i], states[i])
    idx = [i for i in range(n) if _fits(params[i], grads[i], states[i])]
    lib = _lib() if idx else None
    if idx and lib is None:
        return None
    taken = set(idx)
    return lib, idx, [i for i in range(n) if i not in taken]


def _merge(n, idx, cols, rest, rest_cols):
    """Per-tensor output columns of the kernel's tensors ``idx`` and the others ``rest``, in
    ``params`` order."""
    if not rest:
        return cols
    if not idx:
        return rest_cols
    rows: list[Any] = [None] * n
    for ii, cc in ((idx, cols), (rest, rest_cols)):
        for j, i in enumerate(ii):
            rows[i] = tuple(None if c is None else c[j] for c in cc)
    return tuple(None if col[0] is None else torch.stack(col) for col in zip(*rows))


class Native:
    """Engine path object (``P``) for ``"native"``: :meth:`run` replaces the engine's loop
    (:meth:`local_norms` and :meth:`run_given` for sharded parameters, ``_sharded.py``)."""

    fuses_scale = True   # the scale is a kernel input of both sharded phases (_paths.PerTensor)

    @staticmethod
    def run(opt, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
            states: list[dict[str, Tensor]], scale: Tensor | None = None, ok: Tensor | None = None):
        """Update ``params`` in place; returns ``fin, trust, lr, w_norm, g_norm`` stacked in
        ``params`` order (``w_norm`` is ``None`` for a non-adapted group), as
        ``LayerwiseOptimizer._masked_update`` does."""
        split = _split(opt, params, grads, states)
        if split is None:
            return _compiled.Compiled.run(opt, group, params, grads, states, scale, ok)
        lib, idx, rest = split
        cols = rest_cols = None
        if idx:
            cols = _call(lib, opt, group, *_sub(params, grads, states, idx), scale, ok)
        if rest:
            rest_cols = opt._masked_update(group, *_lists(params, grads, states, rest), Foreach, scale, ok)
        return _merge(len(params), idx, cols, rest, rest_cols)

    @staticmethod
    def local_norms(opt, group, params, grads, states, scale: Tensor | None = None) -> Tensor:
        """``LayerwiseOptimizer._local_norms`` of every tensor, ``[n, k]`` float64 (writes
        nothing): the kernel's pass 1 alone."""
        split = _split(opt, params, grads, states)
        if split is None:
            return _compiled.Compiled.local_norms(opt, group, params, grads, states, scale)
        lib, idx, rest = split
        parts = []
        if idx:
            got = _call(lib, opt, group, *_sub(params, grads, states, idx), scale, None, mode=MODE_SUMS)
            parts.append(got[:, _columns(opt, group)])
        if rest:
            parts.append(opt._local_norms(group, *_lists(params, grads, states, rest), Foreach, scale).double())
        if not rest or not idx:
            return parts[0]
        out = torch.empty((len(params), parts[0].shape[1]), dtype=torch.float64)
        out[idx], out[rest] = parts[0], parts[1]
        return out

    @staticmethod
    def run_given(opt, group, params, grads, states, norms: Tensor, scale: Tensor | None = None,
                  ok: Tensor | None = None):
        """:meth:`run` with the norms given (``[n, k]``, reduced over the shards, in the compute
        dtype; ``LayerwiseOptimizer._given_update``): the kernel without pass 1."""
        split = _split(opt, params, grads, states)
        if split is None:
            return _compiled.Compiled.run_given(opt, group, params, grads, states, norms, scale, ok)
        lib, idx, rest = split
        cols = rest_cols = None
        if idx:
            given = torch.zeros((len(idx), 3), dtype=torch.float64)
            given[:, _columns(opt, group)] = norms[idx].double()
            cols = _call(lib, opt, group, *_sub(params, grads, states, idx), scale, ok, mode=MODE_GIVEN, sums=given)
        if rest:
            rest_cols = opt._given_update(group, *_lists(params, grads, states, rest), norms[rest], Foreach,
                                          scale, ok)
        return _merge(len(params), idx, cols, rest, rest_cols)


def _sub(params, grads, states, idx):
    return [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx]


def _columns(opt, group) -> list[int]:
    """Which of the kernel's norms (``||w||, ||g||, ||x||``) make up ``_local_norms``'s
    columns: ``w`` for an adapted group, ``g``, then the norm operand (LALC's ``h``, LAMB's
    ``r``) where the class has one."""
    return ([0] if group["adapt"] else []) + [1] + ([2] if opt._n_norm_operands(group) else [])


def _call(lib, opt, group, params, grads, states, scale, ok, mode: int = MODE_FULL, sums: Tensor | None = None):
    """One kernel call on tensors that all fit (:func:`_fits`): the step's output columns, or
    for ``MODE_SUMS`` the norms ``[n, 3]`` (``||w||, ||g||, ||x||``, float64); ``MODE_GIVEN``
    takes them from ``sums``."""
    rule, dt = rule_of(type(opt)), params[0].dtype
    n = len(params)
    a = _Args()
    a.n, a.nthreads = n, torch.get_num_threads()
    numel = [p.numel() for p in params]
    offsets = list(itertools.accumulate(((m + BLOCK - 1) // BLOCK for m in numel), initial=0))
    # the per-tensor int64 arrays of struct Args, n entries each, in one tensor
    arrays = {"numel": numel, "block_offset": offsets[:-1], "w": [p.data_ptr() for p in params],
              "g": [g.data_ptr() for g in grads]}
    keep = []                                # tensors the kernel reads, alive until it returns
    lr = group["lr"]
    a.lr = float(lr)                         # a 0-d tensor on the CPU: read, no device sync
    a.wd, a.eps = float(group["weight_decay"]), float(group["eps"])
    a.adapt = bool(group["adapt"])
    # the class's own arguments (its rule's hyper-parameters, per-tensor inputs, state keys)
    spec = opt._native_spec(group, states, dt)
    for field, value in spec.scalars.items():
        setattr(a, field, value)
    for field, t in spec.inputs.items():       # per-tensor factors (TVLARS's phi(t), CLARS's n_k)
        keep.append(t.to(dt).contiguous())
        setattr(a, field, keep[-1].data_ptr())
    for field, key in zip(("s0", "s1", "count"), spec.state):
        if key is not None:
            arrays[field] = [st[key].data_ptr() for st in states]
    table = torch.tensor(list(itertools.chain.from_iterable(arrays.values())), dtype=torch.int64)
    for j, field in enumerate(arrays):
        setattr(a, field, table.data_ptr() + 8 * n * j)
    if scale is not None:
        keep.append(scale.to(dt).contiguous())
        a.scale = keep[-1].data_ptr()
    if ok is not None:
        keep.append(ok.to(torch.bool).contiguous())
        a.ok = keep[-1].data_ptr()
    out = torch.empty((n, 5), dtype=dt)
    scratch = torch.empty(3 * offsets[-1], dtype=torch.float64)
    a.out, a.scratch = out.data_ptr(), scratch.data_ptr()
    a.mode = mode
    if mode != MODE_FULL:
        sums = torch.empty((n, 3), dtype=torch.float64) if sums is None else sums.contiguous()
        a.sums = sums.data_ptr()
    getattr(lib, f"largebatch_{rule}_{DTYPES[dt]}")(ctypes.byref(a))
    if mode == MODE_SUMS:
        return sums
    if spec.after is not None:
        spec.after()
    return out[:, 0] != 0, out[:, 1], out[:, 2], out[:, 3] if a.adapt else None, out[:, 4]
