"""The ``"compiled"`` execution path: one fused kernel per large tensor (the CPU default for a
class that declares ``compilable = True`` but no ``_native_rule``; the package's own rules run
on the ``"native"`` path, ``_native.py``, by default, and take this one where it cannot build).

Where the time of a layer-wise step goes on a CPU (measured with
``benchmarks/optimizer_step.py``, see ``docs/performance.md``): the eager paths make one
pass over memory per ``Tensor`` / ``torch._foreach_*`` op -- about ten passes for LARS
where ``torch.optim.SGD(fused=True)`` makes one. This path instead runs each algorithm's
single ``_update`` (through the engine's ``_masked_update`` on the per-tensor path)
under ``torch.compile`` (inductor), on a flattened view of each tensor, so that the whole
update becomes reductions (``||g||`` and ``||w||``, one loop each: inductor does not fuse
reductions that share no input; LAMB adds one for ``||r||``) and one fused element-wise loop
that writes ``w`` and the state in place. That is the floor for a layer-wise rule (the trust
ratio needs the norms before the update), with no full-size temporary (LALC, whose ``_update`` has a graph break when
``lr`` is a tensor, still gets one: see ``docs/performance.md``).

* Shapes are dynamic (one compiled kernel per optimizer class and configuration serves
  every tensor size); ``lr`` is passed as a 0-d tensor, so a scheduler changing it does
  not recompile. The other hyper-parameters are compiled in as constants (guarded):
  changing one (e.g. ``OneCycleLR`` cycling ``momentum``) compiles another variant, and
  past dynamo's recompile limit that class runs its kernel function eagerly (correct, slow).
* Only tensors with at least :data:`MIN_NUMEL` elements (contiguous, with contiguous
  gradient and state) go through the kernel, where a kernel call (~20-60 us of Python and
  guard overhead) is small next to its memory traffic, and only when they hold at least
  :data:`MIN_TOTAL` elements together (small models never compile). The other tensors
  (biases, normalization parameters) take the ``"foreach"`` path in one batch.
* Compilation happens on the first step (and on a new configuration) and is paid once
  per process (inductor also caches it on disk). If compiling fails (no C++ compiler,
  unsupported platform), the path warns once and falls back to ``"foreach"`` for good.
  ``LARGEBATCH_NO_COMPILE=1`` disables it up front.
* Only classes that declare ``compilable = True`` in their own body are compiled (the
  contract is on :attr:`LayerwiseOptimizer.compilable`): an ``_update`` reads nothing per
  tensor outside ``(group, w, g, st)`` and only class attributes of ``self`` (one bare
  instance per class is the kernel's ``self``). Per-step inputs such as CLARS's ``n_k``
  come through ``st`` (``LayerwiseOptimizer._step_inputs``), not through ``self``.
* Under a ``torch.amp.GradScaler`` (``_engine.py``, "Mixed precision") its ``grad_scale`` and
  "no inf found" are two more 0-d kernel inputs: the unscaling fuses into the kernel's loops.
  A scaled step is one more compiled variant per class; the unscaled kernel is unchanged.

Kernel variants and the first-use choice (docs/performance.md). Which spelling of a kernel is
fastest depends on the CPU: on the project machine (AMD EPYC, AVX-512) norms accumulated in
float64 cost no more than in float32, while on an Intel Xeon with AVX-512 and AMX (numbers
measured for docs/performance.md: 1 thread, 4 tensors of 2.36M elements, fused SGD 9 ms) the LARS kernel
took 38.5 ms with float64 accumulation against 19.5 ms in float32, and 25 ms with 256-bit
vectors against 37 ms at inductor's default 512 bits. So each kernel has variants
(:data:`VARIANTS`), each its own compiled function (``_KERNELS[cls][variant]``,
``_SHARDED_KERNELS[(cls, kind)][variant]``):

* norm accumulation: ``f64`` (:class:`_KernelPath`, float64; the default) or ``f32``
  (:class:`_KernelPathF32`: float32 sums of 4096-element chunks, added in float64; the norm
  of 2.4M elements over six decades of magnitude is within 1e-6 of the float64 one, tested.
  Inductor's own float32 sum -- its cascade helper, kept in memory -- was 1.0e-6 off there and,
  in a standalone two-norm kernel on the AMD machine, 3x slower than either). float64 tensors
  always accumulate in float64 (docs/algorithms.md section 8): for them ``f32`` is ``f64``;
* vector width: inductor's default (the CPU's widest) or ``-256`` (``cpp.simdlen = 256``),
  offered only where the default is wider (``torch.backends.cpu.get_cpu_capability()`` is
  ``"AVX512"``; :func:`supported_variants`).

The choice, per optimizer class, kernel (update, or ``probe`` / ``given`` for sharded
parameters), compute dtype and thread count (:func:`_choose`): at the first compiled step
whose bucket holds a tensor of at least :data:`TUNE_MIN_NUMEL` elements, every variant is
timed on scratch copies of the bucket's largest tensor (with its gradient and state; the
user's tensors are never written): on its first :data:`TUNE_MAX_NUMEL` elements and, when the
bucket's median tensor is under half of that, on a copy of the median's length too (a variant's
fixed cost per call -- more loops, more OpenMP regions -- weighs with the number of tensors:
on the AMD machine, 1 thread, ``f32`` was 2% faster than ``f64`` on 2.4M elements and 20%
slower on 147K).
One untimed call per variant and length (it compiles), then :data:`TUNE_ROUNDS` rounds
interleaved, the minimum of each; a line through the two lengths estimates each variant's time
for the whole bucket, and the fastest wins (``f64`` unless another is :data:`TUNE_MARGIN`
faster). The choice is kept for the
process and in :func:`cache_path` (``~/.cache/largebatch/kernels.json``; ``$LARGEBATCH_CACHE_DIR``
or ``$XDG_CACHE_HOME`` move it), written atomically, keyed by CPU model, ISA level, torch
version, thread count, class, kernel and dtype: later processes read it and compile one
variant. A corrupt or unreadable file is ignored (and rewritten at the next measurement); delete
it (or an entry) to measure again, e.g. after a measurement on a busy machine (each entry keeps
its times and the load average). Buckets under the threshold use the choice already made in the
process, else ``f64`` (a small tensor's call times its overhead, not its loops). In a
``torch.distributed`` group of several processes nothing is measured or read: every process
runs ``f64`` or the forced variant (replicas must compute the same norms bit for bit, and
processes, or machines with their own cache files, could choose differently): set
``LARGEBATCH_KERNEL_VARIANT`` for all ranks to use another one.

* Cost, once per class and machine: compiling 2-4 variants instead of one, the timed calls
  (tens of ms) and scratch memory of ``2 + #state`` copies of at most :data:`TUNE_MAX_NUMEL`
  elements (64 MiB for LAMB in float32). Measured on the AMD machine (1 thread, load ~5, CIFAR
  ResNet-18 parameters, docs/performance.md): the first LARS / LAMB step took 17-20 s with one
  variant and 28-31 s measuring four with a cold inductor cache, 3.4-4.6 s and 4.7-6.5 s with a
  warm one; a later process that reads the choice pays one variant's compile only.
* Forcing: ``LARGEBATCH_KERNEL_VARIANT=f64|f32|f64-256|f32-256`` (or ``auto``), or
  :func:`set_kernel_variant` / ``with kernel_variant("f32"):`` (the API wins over the variable);
  a width the CPU lacks warns once and takes the default width. ``LARGEBATCH_NO_AUTOTUNE=1``:
  ``f64`` without measuring. :func:`kernel_choices` lists the choices of the process.

Sharded (DTensor) parameters (``_sharded.py``) use two kernels per class around the step's
one collective: ``probe`` (the local norms, for classes with norm operands: LAMB,
LALC; the LARS family takes two ``_foreach_norm`` calls instead) and ``given`` (the update
with the reduced norms), on the local shards.

On CUDA the default stays ``"foreach"`` (multi-tensor kernels there are launched per op
for all tensors at once); ``path="compiled"`` would compile through inductor/Triton there
(untested: no GPU on the development machine).
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from typing import Any

import torch
from torch import Tensor

from ._paths import Foreach, PerTensor, TensorList

__all__ = ["Compiled", "MIN_NUMEL", "MIN_TOTAL", "VARIANTS", "DEFAULT_VARIANT", "available", "default_path",
           "supported_variants", "set_kernel_variant", "kernel_variant", "forced_variant", "kernel_choices",
           "cache_path", "cpu_model"]

#: tensors with fewer elements take the foreach path inside the compiled path
MIN_NUMEL = 1 << 14
#: ... and so do all tensors of a (group, device, dtype) bucket whose eligible tensors hold
#: fewer elements in total: compiling (seconds, once) does not pay off for small models
MIN_TOTAL = 1 << 20

_FAILED = False


def available() -> bool:
    """Whether the compiled path may be used (not disabled, no earlier compile failure)."""
    return not _FAILED and os.environ.get("LARGEBATCH_NO_COMPILE", "") in ("", "0")


def default_path(device: torch.device) -> str:
    """The fastest path for ``device``: ``"compiled"`` on CPU, ``"foreach"`` elsewhere and
    while being traced by an outer ``torch.compile`` (which then fuses the step itself)."""
    if device.type == "cpu" and available() and not torch.compiler.is_compiling():
        return "compiled"
    return "foreach"


def _realize_scalars_pass():
    """An instance of :class:`_RealizeScalars` (built here: importing inductor takes ~1 s,
    which ``import largebatch`` should not pay)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class _RealizeScalars(CustomGraphPass):
        __call__ = _realize_scalars
        uuid = lambda self: b"largebatch-realize-scalars-1"  # noqa: E731

    return _RealizeScalars()


def _realize_scalars(self, graph: torch.fx.Graph) -> None:
    """Inductor post-grad pass: compute each 0-d intermediate once, before the loops.

    Inductor inlines a 0-d value (LAMB's ``1 - b2 ** t``, a trust ratio) into every loop
    that reads it, where the C++ compiler cannot hoist it (it may alias the stores): a
    scalar ``pow`` per vector of 16 elements made LAMB 3x slower than ``Adam(fused=True)``.
    Routing the loops' reads through ``as_strided(x, (), ())`` (a view, which needs its
    input in a buffer) makes inductor store each such scalar once and load it in the loops.
    """
    view = torch.ops.aten.as_strided.default
    for node in list(graph.nodes):
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, Tensor) or val.dim() != 0:
            continue
        big = [u for u in node.users
               if isinstance(u.meta.get("val"), Tensor) and u.meta["val"].dim() > 0]
        if not big:
            continue
        with graph.inserting_after(node):
            r = graph.call_function(view, (node, [], []))
        r.meta["val"] = val
        for u in big:
            u.replace_input_with(node, r)


class _KernelPath(PerTensor):
    """The per-tensor path as spelled inside a kernel of variant ``"f64"``: norms accumulate in
    float64 (the float32 data is widened as it is read; as accurate as a float64 norm)."""

    @staticmethod
    def norm(x: Tensor) -> Tensor:
        # float32 squares summed in float64 neither overflow nor underflow; float64 data takes
        # the scaled recomputation where its plain norm is not safe (_paths.norms)
        n = torch.linalg.vector_norm(x, dtype=torch.float64)
        if x.dtype == torch.float64:
            return _safe(x, n)
        return n.to(x.dtype)


#: elements per float32 partial sum of :class:`_KernelPathF32` (inductor sums a reduction of
#: at most 4096 elements with a plain vector accumulator, above that with its cascade helper)
CHUNK = 4096


def _chunked_sumsq(x: Tensor) -> Tensor:
    """``sum(x**2)`` of float32 ``x`` (at least ``2 * CHUNK`` elements) as a float64 0-d
    tensor: float32 sums of ``CHUNK`` consecutive elements (each vector lane adds
    ``CHUNK / lanes`` squares in a register), added in float64, plus the last
    ``numel % CHUNK`` elements (read as the masked last ``CHUNK``: every intermediate has a
    static size or at least 2 rows, so dynamic shapes add no guard per tensor size)."""
    x = x.reshape(-1)
    n = x.shape[0]
    m = n // CHUNK
    part = x[: m * CHUNK].view(m, CHUNK).square().sum(1)
    last = x[n - CHUNK:].square()
    idx = torch.arange(CHUNK, device=x.device)
    tail = torch.where(idx >= m * CHUNK - n + CHUNK, last, 0)
    return part.sum(dtype=torch.float64) + tail.sum(dtype=torch.float64)


class _KernelPathF32(_KernelPath):
    """The kernel path of variant ``"f32"``: norms of float32 tensors of at least
    ``2 * CHUNK`` elements accumulate in float32 in chunks of :data:`CHUNK` elements, the chunk
    sums in float64 (:func:`_chunked_sumsq`; relative error 3e-8 to 6e-8 against float64
    measured on 2.4M elements of mixed magnitudes, <= 1e-6 tested). Smaller tensors (a size
    guard: one more graph only if a bucket mixes both) and float64 tensors accumulate in
    float64 exactly as in ``"f64"`` (docs/algorithms.md section 8)."""

    @staticmethod
    def norm(x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.numel() < 2 * CHUNK:
            return _KernelPath.norm(x)
        return _safe(x, _chunked_sumsq(x).sqrt()).to(x.dtype)   # float32 chunk sums can overflow


def _safe(x: Tensor, n: Tensor) -> Tensor:
    """``n`` (a float64 norm of ``x``), or where it is not a safe normal number the scaled
    recomputation of ``_paths.norms`` (a ``torch.where`` inside the kernel)."""
    from ._paths import _SAFE_LOW, _scaled_norms

    bad = ~(n >= _SAFE_LOW[x.dtype]) | (n == float("inf"))
    return torch.where(bad, _scaled_norms([x])[0].to(n.dtype), n)


# ------------------------------------------------------------------------ kernel variants
#: every kernel variant: the norms' accumulation (``f64``: float64; ``f32``: chunked float32,
#: :class:`_KernelPathF32`) x the vector width of inductor's C++ (the CPU's widest by
#: default; ``-256``: ``cpp.simdlen = 256``, offered on AVX-512 CPUs only)
VARIANTS = ("f64", "f32", "f64-256", "f32-256")
#: the variant used without a measurement (``LARGEBATCH_NO_AUTOTUNE=1``, small tensors)
DEFAULT_VARIANT = "f64"
_PATHS = {"f64": _KernelPath, "f32": _KernelPathF32}

#: the choice is measured (or read from the disk cache) for a bucket whose largest eligible
#: tensor has at least this many elements; smaller ones use the choice already made in this
#: process, or :data:`DEFAULT_VARIANT` (a kernel call on a small tensor times its overhead)
TUNE_MIN_NUMEL = 1 << 18
#: the scratch copies the variants are timed on hold at most this many elements per tensor
TUNE_MAX_NUMEL = 1 << 22
#: timed calls per variant (after one untimed call that compiles), interleaved; the minimum
TUNE_ROUNDS = 10
#: the default variant is kept unless another one is faster by more than this fraction
TUNE_MARGIN = 0.05
#: part of every cache key: a change of the kernels' code that changes their speed bumps it
_REVISION = 1

_FORCED: str | None = None
#: choices made in this process: cache key -> {"variant", "source", "times_us"}
_CHOSEN: dict[str, dict[str, Any]] = {}
_WARNED: set[str] = set()


def _parse(variant: str) -> tuple[str, int | None]:
    """``"f32-256"`` -> ``("f32", 256)``; ``"f64"`` -> ``("f64", None)``."""
    if variant not in VARIANTS:
        raise ValueError(f"invalid kernel variant {variant!r}: expected one of {VARIANTS}")
    acc, _, width = variant.partition("-")
    return acc, int(width) if width else None


def supported_variants(dtype: torch.dtype = torch.float32) -> tuple[str, ...]:
    """The variants that differ on this CPU for kernels computing in ``dtype``: the 256-bit
    ones only where inductor's default vectors are wider (``get_cpu_capability()`` is
    ``"AVX512"``); for float64 only ``f64`` ones (float64 always accumulates in float64)."""
    wide = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return tuple(v for v in VARIANTS
                 if (wide or not v.endswith("-256")) and (dtype == torch.float32 or v.startswith("f64")))


def _effective(variant: str, dtype: torch.dtype) -> str:
    """The kernel that ``variant`` means for ``dtype`` on this CPU: ``f32`` is ``f64`` for
    float64 (the same graph), an unsupported width is the default one."""
    acc, width = _parse(variant)
    if dtype != torch.float32:
        acc = "f64"
    v = acc if width is None else f"{acc}-{width}"
    if v not in supported_variants(dtype):
        v = acc
    return v


def set_kernel_variant(variant: str | None) -> None:
    """Force one kernel variant (one of :data:`VARIANTS`) for every class, or ``None``: back
    to ``LARGEBATCH_KERNEL_VARIANT`` / the measured choice. Takes effect for the next step."""
    global _FORCED
    if variant is not None:
        _parse(variant)
    _FORCED = variant


class kernel_variant:  # noqa: N801 (a context manager, used like a function)
    """``with kernel_variant("f32"): opt.step()``: :func:`set_kernel_variant` for a block."""

    def __init__(self, variant: str | None):
        if variant is not None:
            _parse(variant)
        self.variant = variant

    def __enter__(self):
        self.saved = _FORCED
        set_kernel_variant(self.variant)
        return self

    def __exit__(self, *exc):
        set_kernel_variant(self.saved)


def forced_variant() -> str | None:
    """The variant forced by :func:`set_kernel_variant` or ``LARGEBATCH_KERNEL_VARIANT``."""
    if _FORCED is not None:
        return _FORCED
    env = os.environ.get("LARGEBATCH_KERNEL_VARIANT", "")
    if env in ("", "auto"):
        return None
    if env not in VARIANTS:
        raise ValueError(f"invalid LARGEBATCH_KERNEL_VARIANT={env!r}: expected one of {VARIANTS} or 'auto'")
    return env


def _autotune_enabled() -> bool:
    return os.environ.get("LARGEBATCH_NO_AUTOTUNE", "") in ("", "0")


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _machine() -> str:
    import platform
    return (f"{cpu_model()} ({platform.machine()}) | {torch.backends.cpu.get_cpu_capability()} | "
            f"torch {torch.__version__}")


def _machine_key() -> str:
    return f"{_machine()} | {torch.get_num_threads()} threads | rev {_REVISION}"


def _choice_key(cls: type, kind: str | None, dtype: torch.dtype) -> str:
    """The cache key of a choice: the machine (CPU model, ISA, torch version, threads), the
    optimizer class, the kernel (``update``, ``probe``, ``given``) and the compute dtype."""
    return f"{_machine_key()} | {cls.__module__}.{cls.__qualname__} | {kind or 'update'} | {dtype}"


def cache_path() -> str:
    """Where measured choices are kept: ``$LARGEBATCH_CACHE_DIR/kernels.json``, else
    ``$XDG_CACHE_HOME/largebatch/kernels.json``, else ``~/.cache/largebatch/kernels.json``."""
    d = os.environ.get("LARGEBATCH_CACHE_DIR")
    if not d:
        d = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                         "largebatch")
    return os.path.join(d, "kernels.json")


def _read_cache() -> dict[str, dict[str, Any]]:
    """The cache file's entries; ``{}`` for a missing, unreadable or corrupt file (it is
    rewritten whole at the next choice)."""
    import json
    try:
        with open(cache_path()) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("choices"), dict):
        return {}
    return {k: v for k, v in data["choices"].items() if isinstance(v, dict) and v.get("variant") in VARIANTS}


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    """Add ``key: entry`` to the cache file, atomically (a temporary file in the same folder,
    then ``os.replace``): a concurrent reader sees the old file or the new one, never a part.
    A cache that cannot be written (read-only home) is skipped silently."""
    import json
    import tempfile
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        choices = _read_cache()
        choices[key] = entry
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".kernels.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": 1, "choices": choices}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def kernel_choices() -> dict[str, dict[str, Any]]:
    """The choices made in this process: cache key -> ``{"variant", "source", "times_us"}``
    (``source``: ``"measured"`` or ``"disk"``; ``times_us``: each variant's estimated kernel
    time for the bucket that decided, one call per kernel tensor, from its fastest calls on
    the scratch tensors; recorded in the cache with the choice)."""
    return {k: dict(v) for k, v in _CHOSEN.items()}


def _clock() -> float:
    import time
    return time.perf_counter()


def _time_variants(calls: dict[Any, Any], rounds: int) -> dict[Any, float]:
    """Seconds per key (a variant and a length): the minimum of ``rounds`` timed calls of
    ``calls[key]()``, the keys interleaved in each round (drift on a shared machine hits all
    alike), after one untimed call of each."""
    for call in calls.values():
        call()
    best = {v: float("inf") for v in calls}
    for _ in range(rounds):
        for v, call in calls.items():
            t0 = _clock()
            call()
            best[v] = min(best[v], _clock() - t0)
    return best


def _pick(times: dict[str, float]) -> str:
    """The fastest variant; the default one unless another is faster by :data:`TUNE_MARGIN`."""
    fastest = min(times, key=times.__getitem__)
    if DEFAULT_VARIANT in times and times[fastest] >= times[DEFAULT_VARIANT] * (1 - TUNE_MARGIN):
        return DEFAULT_VARIANT
    return fastest


def _replicated() -> bool:
    """Whether this process is one of several in a ``torch.distributed`` group: replicas (DDP)
    must compute the same norms bit for bit, and a measurement (or a cache file) per process
    or machine may choose differently, so they use the default or the forced variant."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _choose(cls: type, kind: str | None, p: Tensor, largest: int, measure) -> str:
    """The variant for a bucket of ``p``'s device and dtype: forced, else chosen before in
    this process, else (for a bucket with a tensor of at least :data:`TUNE_MIN_NUMEL`
    elements, on CPU) read from the disk cache or measured (``measure(variants) ->
    {variant: seconds}``) and recorded in both; else :data:`DEFAULT_VARIANT`."""
    dtype = p.dtype
    forced = forced_variant()
    if forced is not None:
        v = _effective(forced, dtype)
        if _parse(v)[1] != _parse(forced)[1] and forced not in _WARNED:
            _WARNED.add(forced)
            warnings.warn(f"largebatch: kernel variant {forced!r}: this CPU "
                          f"({torch.backends.cpu.get_cpu_capability()}) has no wider vectors; using {v!r}",
                          RuntimeWarning, stacklevel=5)
        return v
    if not _autotune_enabled() or p.device.type != "cpu" or _replicated():
        return DEFAULT_VARIANT
    key = _choice_key(cls, kind, dtype)
    chosen = _CHOSEN.get(key)
    if chosen is not None:
        return chosen["variant"]
    if largest < TUNE_MIN_NUMEL:
        return DEFAULT_VARIANT
    cands = supported_variants(dtype)
    entry = _read_cache().get(key)
    if entry is not None and entry["variant"] in cands:
        _CHOSEN[key] = {"variant": entry["variant"], "source": "disk", "times_us": entry.get("times_us")}
        return entry["variant"]
    if len(cands) == 1:
        _CHOSEN[key] = {"variant": cands[0], "source": "only", "times_us": None}
        return cands[0]
    times = measure(cands)
    v = _pick(times)
    import datetime
    us = {k: round(t * 1e6, 1) for k, t in times.items()}
    _CHOSEN[key] = {"variant": v, "source": "measured", "times_us": us}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # a busy machine measures noise
    _write_cache(key, {"variant": v, "times_us": us, "load_average": load,
                       "measured_on": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return v


# ------------------------------------------------------------------------ kernels
# ``scale`` / ``ok``: a GradScaler's ``grad_scale`` (0-d, compute dtype) and "no inf found"
# (0-d bool), or ``None`` (no scaler: the same graph as without them); with a scaler the
# division by ``scale`` fuses into the kernel's loops (no separate unscale pass). ``P``: the
# variant's path class (a closure cell of each kernel's function)
def _kernel_template(P):
    def kernel(opt, hp, w, g, st, scale, ok):
        return opt._masked_update(hp, w, g, st, P, scale, ok)
    return kernel


def _probe_template(P):
    def kernel(opt, hp, w, g, st, scale):
        return (opt._local_norms(hp, w, g, st, P, scale),)
    return kernel


def _given_template(P):
    def kernel(opt, hp, w, g, st, norms, scale, ok):
        return opt._given_update(hp, w, g, st, norms, P, scale, ok)
    return kernel


#: sharded parameters (``_sharded.py``): the local sums of squares, then the update with the
#: reduced norms, each its own kernel (the collective runs between them)
_TEMPLATES = {None: _kernel_template, "probe": _probe_template, "given": _given_template}
#: compiled kernels: ``_KERNELS[cls][variant]`` and ``_SHARDED_KERNELS[(cls, kind)][variant]``,
#: each ``(kernel, self)``
_KERNELS: dict[type, dict[str, Any]] = {}
_SHARDED_KERNELS: dict[tuple[type, str], dict[str, Any]] = {}


def _compile(cls: type, template, name: str, variant: str = DEFAULT_VARIANT):
    acc, width = _parse(variant)
    fn = template(_PATHS[acc])
    code = fn.__code__.replace(co_name=name)
    fn = types.FunctionType(code, fn.__globals__, code.co_name, None, fn.__closure__)
    options = {
        # dynamic_threads: always emit an OpenMP region, sized by the runtime thread count
        "cpp.dynamic_threads": True, "post_grad_custom_post_pass": _realize_scalars_pass(),
        # recompute element-wise intermediates in each loop instead of storing them: LAMB's
        # r = m_hat / (sqrt(v_hat) + eps) + wd w was a full-size temporary, freshly
        # allocated (and page-faulted) for every tensor and step
        "realize_opcount_threshold": 10_000, "realize_reads_threshold": 100,
    }
    if width is not None:
        options["cpp.simdlen"] = width
    return torch.compile(fn, dynamic=True, options=options), cls.__new__(cls)


def _suffix(variant: str) -> str:
    return "" if variant == DEFAULT_VARIANT else "_" + variant.replace("-", "_")


def _kernel_for(cls: type, variant: str = DEFAULT_VARIANT):
    """``(kernel, self)``: one ``torch.compile`` per optimizer class and variant, each on its
    own code object so that each has its own dynamo cache (and recompile limit), and the
    ``self`` to call it with: one bare instance per class (dynamo guards on the identity of
    an optimizer object, so passing each user's optimizer would recompile per instance;
    a compilable class's ``_update`` reads only class attributes of ``self``)."""
    ks = _KERNELS.setdefault(cls, {})
    k = ks.get(variant)
    if k is None:
        k = ks[variant] = _compile(cls, _kernel_template, f"_compiled_{cls.__name__}{_suffix(variant)}", variant)
    return k


def _sharded_kernel_for(cls: type, kind: str, variant: str = DEFAULT_VARIANT):
    """:func:`_kernel_for` for the two kernels of sharded parameters (``kind``: ``"probe"``
    or ``"given"``)."""
    ks = _SHARDED_KERNELS.setdefault((cls, kind), {})
    k = ks.get(variant)
    if k is None:
        k = ks[variant] = _compile(cls, _TEMPLATES[kind], f"_compiled_{cls.__name__}_{kind}{_suffix(variant)}",
                                   variant)
    return k


def _get_kernel(cls: type, kind: str | None, variant: str):
    # the default variant is asked for by class (and kind) alone, as before variants existed
    if kind is None:
        return _kernel_for(cls) if variant == DEFAULT_VARIANT else _kernel_for(cls, variant)
    return _sharded_kernel_for(cls, kind) if variant == DEFAULT_VARIANT else _sharded_kernel_for(cls, kind, variant)


def _flat(t: Tensor) -> Tensor:
    """A 1-D alias of contiguous ``t`` that is not an autograd view (dynamo would guard on a
    view's base shape and recompile for every rank)."""
    shape = () if t.dim() == 0 else (t.numel(),)
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), shape, (1,) * len(shape))


def _fits(p: Tensor, g: Tensor, st: dict[str, Tensor]) -> bool:
    return (p.numel() >= MIN_NUMEL and p.is_contiguous() and g.is_contiguous()
            and all(v.is_contiguous() for v in st.values()))


def _tune_lengths(sizes: list[int]) -> list[int]:
    """The lengths the variants are timed at, for a bucket of kernel tensors of ``sizes``: the
    largest (at most :data:`TUNE_MAX_NUMEL`) and, when under half of it, the median size (at
    least ``2 * CHUNK``): a variant's fixed cost per call weighs with the number of tensors."""
    big = min(max(sizes), TUNE_MAX_NUMEL)
    mid = min(max(sorted(sizes)[len(sizes) // 2], 2 * CHUNK), big)
    return [big, mid] if mid < big // 2 else [big]


def _bucket_times(times: dict[tuple[str, int], float], sizes: list[int]) -> dict[str, float]:
    """Seconds per variant for one call on each tensor of ``sizes``, from the times at one or
    two lengths (``times[variant, length]``): linear in the length through the two points
    (a fixed cost per call and a cost per element), proportional with one."""
    out = {}
    for v in dict.fromkeys(v for v, _ in times):
        pts = sorted((n, t) for (w, n), t in times.items() if w == v)
        if len(pts) == 1:
            (n1, t1), = pts
            out[v] = sum(t1 * n / n1 for n in sizes)
        else:
            (n0, t0), (n1, t1) = pts[0], pts[-1]
            per = (t1 - t0) / (n1 - n0)
            out[v] = sum(max(t0 + per * (n - n0), 0.0) for n in sizes)
    return out


def _scratch(p: Tensor, g: Tensor, st: dict[str, Tensor], n: int | None = None):
    """Fresh copies of the first ``n`` (at most :data:`TUNE_MAX_NUMEL`) elements of ``p``, ``g``
    and each state tensor of ``p``'s size (others, e.g. 0-d step counters, whole), flat: what
    the variants are timed on (the user's weights and state are never written for timing)."""
    n = min(p.numel(), TUNE_MAX_NUMEL, n or p.numel())

    def cut(t: Tensor) -> Tensor:
        if t.numel() == p.numel() and t.dim() > 0:
            return t.detach().reshape(-1)[:n].clone()
        return t.detach().clone()

    return cut(p), cut(g), {k: cut(v) for k, v in st.items()}


def _compile_errors() -> tuple[type, ...]:
    """What a failed compilation raises (no C++ compiler, unsupported platform or dtype)."""
    import torch._dynamo.exc
    import torch._inductor.exc
    return (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.CppCompileError, OSError, ImportError)


class Compiled:
    """Engine path object (``P``) for ``"compiled"``: :meth:`run` replaces the engine's loop
    (:meth:`local_norms` and :meth:`run_given` for sharded parameters, ``_sharded.py``)."""

    fuses_scale = True   # the scale is a kernel input of both sharded phases (_paths.PerTensor)

    @staticmethod
    def run(opt, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
            states: list[dict[str, Tensor]], scale: Tensor | None = None, ok: Tensor | None = None):
        """Update ``params`` in place; returns ``fin, trust, lr, w_norm, g_norm`` stacked
        in ``params`` order (``w_norm`` is ``None`` for a non-adapted group). ``scale``, ``ok``:
        a GradScaler's inputs (``LayerwiseOptimizer._masked_update``), kernel inputs here."""
        return _run_split(opt, group, params, grads, states, None, lambda idx: opt._masked_update(
            group, *_lists(params, grads, states, idx), Foreach, scale, ok), tail=(scale, ok))

    @staticmethod
    def local_norms(opt, group, params, grads, states, scale: Tensor | None = None) -> Tensor:
        """``LayerwiseOptimizer._local_norms`` of every tensor, ``[n, k]`` (writes nothing).
        Without norm operands (the LARS family) the norms are two ``_foreach_norm`` calls."""
        if not opt._n_norm_operands(group):
            return opt._local_norms(group, *_lists(params, grads, states, range(len(params))), Foreach, scale)
        return _run_split(opt, group, params, grads, states, "probe", lambda idx: (opt._local_norms(
            group, *_lists(params, grads, states, idx), Foreach, scale),), tail=(scale,))[0]

    @staticmethod
    def run_given(opt, group, params, grads, states, norms: Tensor, scale: Tensor | None = None,
                  ok: Tensor | None = None):
        """:meth:`run` with the norms given (``[n, k]``, see ``LayerwiseOptimizer._given_update``)."""
        return _run_split(opt, group, params, grads, states, "given", lambda idx: opt._given_update(
            group, *_lists(params, grads, states, idx), norms[idx], Foreach, scale, ok), extra=norms,
            tail=(scale, ok))


def _lists(params, grads, states, idx):
    idx = list(idx)
    st = {k: TensorList(states[i][k] for i in idx) for k in states[idx[0]]}
    return TensorList(params[i] for i in idx), TensorList(grads[i] for i in idx), st


def _run_split(opt, group, params, grads, states, kind: str | None, eager, extra: Tensor | None = None,
               tail: tuple = ()):
    """Run the kernel (``kind``: ``None`` for the update, ``"probe"`` / ``"given"`` for
    sharded parameters) on each large tensor and ``eager(indices)`` (the ``"foreach"``
    spelling) on the others in one batch; returns the kernel's outputs stacked in
    ``params`` order. ``extra``: a further per-tensor input (row ``i`` for tensor ``i``);
    ``tail``: the last arguments of every kernel call (the GradScaler's inputs or ``None``)."""
    global _FAILED
    n = len(params)
    use = available() and opt._compilable
    big = [i for i in range(n) if use and _fits(params[i], grads[i], states[i])]
    if sum(params[i].numel() for i in big) < MIN_TOTAL:
        big = []
    rows: list[Any] = [None] * n
    if big:
        # lr: a 0-d tensor (a scheduler changing it reuses the kernel); other hyper-parameters
        # are specialized constants (guarded): unspecialized floats that reach an op's Scalar
        # argument (torch.full_like(x, lr)) were baked in without a guard by dynamo
        hp = {k: group[k] for k in opt.defaults}
        p0 = params[big[0]]
        hp["lr"] = torch.as_tensor(group["lr"], dtype=p0.dtype, device=p0.device).reshape(())
        cls = type(opt)

        def args_of(w, g, st, i):
            args = (w, g, st)
            if extra is not None:  # a fresh tensor: a view of `extra` would be guarded on its base
                args += (extra[i].clone(),)
            return args + tail

        def measure(variants):  # each variant on scratch copies of the largest tensor
            i = max(big, key=lambda j: params[j].numel())
            sizes = [params[j].numel() for j in big]
            lengths = _tune_lengths(sizes)
            scratch = {n: _scratch(params[i], grads[i], states[i], n) for n in lengths}
            calls = {}
            for v in variants:
                try:
                    kernel, algo = _get_kernel(cls, kind, v)
                    for n in lengths:
                        kernel(algo, hp, *args_of(*scratch[n], i))  # compiles
                except Exception as e:
                    if v == DEFAULT_VARIANT or not isinstance(e, _compile_errors()):
                        raise
                    continue  # e.g. a vector width the C++ compiler refuses: not a candidate
                for n in lengths:
                    calls[v, n] = lambda kernel=kernel, algo=algo, n=n: kernel(algo, hp, *args_of(*scratch[n], i))
            return _bucket_times(_time_variants(calls, TUNE_ROUNDS), sizes)

        done = 0
        try:
            with torch._dynamo.config.patch(specialize_float=True):
                variant = _choose(cls, kind, p0, max(params[i].numel() for i in big), measure)
                kernel, algo = _get_kernel(cls, kind, variant)
                for i in big:
                    st = {k: _flat(v) for k, v in states[i].items()}
                    rows[i] = kernel(algo, hp, *args_of(_flat(params[i]), _flat(grads[i]), st, i))
                    done += 1
        except Exception as e:  # compilation unavailable: finish these tensors eagerly
            if done or not isinstance(e, _compile_errors()):  # after a successful call: not a
                raise                                       # compile failure
            _FAILED = True
            warnings.warn(f"largebatch: the compiled optimizer path is unavailable ({type(e).__name__}: "
                          f"{e}); using the 'foreach' path", RuntimeWarning, stacklevel=4)
            big = []
    small = [i for i in range(n) if rows[i] is None]
    if small:
        cols = eager(small)
        if not big:
            return cols
        parts = [None if c is None else c.unbind() for c in cols]
        for j, i in enumerate(small):
            rows[i] = tuple(None if p is None else p[j] for p in parts)
    return tuple(None if col[0] is None else torch.stack(col) for col in zip(*rows))
