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

Kernel variants (docs/performance.md, "Kernel variants"). Which spelling of a kernel is fastest
depends on the CPU: on an AMD EPYC (AVX-512) norms accumulated in float64 cost no more than in
float32, while on an Intel Xeon with AVX-512 and AMX (1 thread, 4 tensors of 2.36M elements,
fused SGD 9 ms) the LARS kernel took 38.5 ms with float64 accumulation against 19.5 ms in
float32, and 25 ms with 256-bit vectors against 37 ms at inductor's default 512 bits. So each
kernel has variants (:data:`VARIANTS`), each its own compiled function
(``_KERNELS[cls][variant]``, ``_SHARDED_KERNELS[(cls, kind)][variant]``):

* norm accumulation: ``f64`` (:class:`_KernelPath`, float64; the default) or ``f32``
  (:class:`_KernelPathF32`: float32 sums of 4096-element chunks, added in float64; the norm
  of 2.4M elements over six decades of magnitude is within 1e-6 of the float64 one, tested).
  float64 tensors always accumulate in float64 (docs/algorithms.md section 8): for them
  ``f32`` is ``f64``;
* vector width: inductor's default (the CPU's widest) or ``-256`` (``cpp.simdlen = 256``),
  offered only where the default is wider (``torch.backends.cpu.get_cpu_capability()`` is
  ``"AVX512"``; :func:`supported_variants`).

``f64`` runs unless a variant is forced: ``LARGEBATCH_KERNEL_VARIANT=f64|f32|f64-256|f32-256``
(set it on every rank of a distributed run: replicas must compute the same norms), or
:func:`set_kernel_variant` / ``with kernel_variant("f32"):`` (the API wins over the variable);
a width the CPU lacks warns once and takes the default width. ``benchmarks/optimizer_step.py
--variants`` times every variant of this CPU side by side. (An earlier version measured the
variants at the first step and kept the choice in a cache file; since the package's own rules
run on the ``"native"`` path, that machinery served only user subclasses and was removed:
docs/performance.md.)

Sharded (DTensor) parameters (``_sharded.py``) use two kernels per class around the step's
one collective: ``probe`` (the local norms, for classes with norm operands: LAMB,
LALC; the LARS family takes two ``_foreach_norm`` calls instead) and ``given`` (the update
with the reduced norms), on the local shards.

On CUDA the default stays ``"foreach"`` (multi-tensor kernels there are launched per op
for all tensors at once); ``path="compiled"`` would compile through inductor/Triton there
(untested: no GPU on the development machine).
"""

from __future__ import annotations

import os
import types
import warnings
from typing import Any

import torch
from torch import Tensor

from .._provenance import cpu_model
from ._paths import Foreach, PerTensor, TensorList

__all__ = ["Compiled", "MIN_NUMEL", "MIN_TOTAL", "VARIANTS", "DEFAULT_VARIANT", "available", "default_path",
           "supported_variants", "set_kernel_variant", "kernel_variant", "forced_variant", "cache_dir", "cpu_model"]

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
        # the scaled recomputation where its plain norm is not safe (largebatch._norms)
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
    recomputation of ``largebatch._norms.norms`` (a ``torch.where`` inside the kernel)."""
    from .._norms import _SAFE_LOW, _scaled_norms

    bad = ~(n >= _SAFE_LOW[x.dtype]) | (n == float("inf"))
    return torch.where(bad, _scaled_norms([x])[0].to(n.dtype), n)


# ------------------------------------------------------------------------ kernel variants
#: every kernel variant: the norms' accumulation (``f64``: float64; ``f32``: chunked float32,
#: :class:`_KernelPathF32`) x the vector width of inductor's C++ (the CPU's widest by
#: default; ``-256``: ``cpp.simdlen = 256``, offered on AVX-512 CPUs only)
VARIANTS = ("f64", "f32", "f64-256", "f32-256")
#: the variant that runs unless another is forced
DEFAULT_VARIANT = "f64"
_PATHS = {"f64": _KernelPath, "f32": _KernelPathF32}

_FORCED: str | None = None
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
    to ``LARGEBATCH_KERNEL_VARIANT`` / :data:`DEFAULT_VARIANT`. Takes effect for the next step."""
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
    if env in ("", "auto"):   # "auto": the former first-use measurement; now the default
        return None
    if env not in VARIANTS:
        raise ValueError(f"invalid LARGEBATCH_KERNEL_VARIANT={env!r}: expected one of {VARIANTS}")
    return env


def cache_dir() -> str:
    """The folder of the package's build products (the native library, ``_native.py``):
    ``$LARGEBATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/largebatch``, else ``~/.cache/largebatch``."""
    d = os.environ.get("LARGEBATCH_CACHE_DIR")
    if d:
        return d
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "largebatch")


def _variant(dtype: torch.dtype) -> str:
    """The variant for a bucket of ``dtype``: the forced one as it applies to ``dtype`` on this
    CPU (warning once where its vector width is not offered), else :data:`DEFAULT_VARIANT`."""
    forced = forced_variant()
    if forced is None:
        return DEFAULT_VARIANT
    v = _effective(forced, dtype)
    if _parse(v)[1] != _parse(forced)[1] and forced not in _WARNED:
        _WARNED.add(forced)
        warnings.warn(f"largebatch: kernel variant {forced!r}: this CPU "
                      f"({torch.backends.cpu.get_cpu_capability()}) has no wider vectors; using {v!r}",
                      RuntimeWarning, stacklevel=5)
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

        done = 0
        try:
            with torch._dynamo.config.patch(specialize_float=True):
                variant = _variant(p0.dtype)
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
