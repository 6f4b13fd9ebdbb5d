"""The ``"compiled"`` execution path: one fused kernel per large tensor (the CPU default).

Where the time of a layer-wise step goes on a CPU (measured with
``benchmarks/optimizer_step.py``, see ``docs/performance.md``): the eager paths make one
pass over memory per ``Tensor`` / ``torch._foreach_*`` op -- about ten passes for LARS
where ``torch.optim.SGD(fused=True)`` makes one. This path instead runs each algorithm's
single ``_update`` (through the engine's ``_masked_update`` on the per-tensor path)
under ``torch.compile`` (inductor), on a flattened view of each tensor, so that the whole
update becomes two loops over memory: one reduction (``||w||``, ``||g||``; LAMB adds a
second one for ``||r||``) and one fused element-wise loop that writes ``w`` and the state
in place. That is the floor for a layer-wise rule (the trust ratio needs the norms before
the update), with no full-size temporary (LALC, whose ``_update`` has a graph break when
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

Sharded (DTensor) parameters (``_sharded.py``) use two kernels per class around the step's
one collective: ``probe`` (the local sums of squares, for classes with norm operands: LAMB,
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

from ._paths import Foreach, PerTensor, TensorList

__all__ = ["Compiled", "MIN_NUMEL", "MIN_TOTAL", "available", "default_path"]

#: tensors with fewer elements take the foreach path inside the compiled path
MIN_NUMEL = 1 << 14
#: ... and so do all tensors of a (group, device, dtype) bucket whose eligible tensors hold
#: fewer elements in total: compiling (seconds, once) does not pay off for small models
MIN_TOTAL = 1 << 20

_KERNELS: dict[type, Any] = {}
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
    """The per-tensor path as spelled inside a kernel: norms accumulate in float64.

    Inductor sums float32 with a cascade (chunked) accumulator for accuracy, which made the
    two norm passes cost as much as the update pass; a float64 accumulator is as accurate
    and runs at memory speed (1-thread LARS kernel: 2.5 -> 1.9 ms on 2.4M elements).
    """

    @staticmethod
    def norm(x: Tensor) -> Tensor:
        return torch.linalg.vector_norm(x, dtype=torch.float64).to(x.dtype)

    @staticmethod
    def sqnorm(x: Tensor) -> Tensor:
        return torch.linalg.vector_norm(x, dtype=torch.float64).square()


# ``scale`` / ``ok``: a GradScaler's ``grad_scale`` (0-d, compute dtype) and "no inf found"
# (0-d bool), or ``None`` (no scaler: the same graph as without them); with a scaler the
# division by ``scale`` fuses into the kernel's loops (no separate unscale pass)
def _kernel_template(opt, hp, w, g, st, scale, ok):
    return opt._masked_update(hp, w, g, st, _KernelPath, scale, ok)


def _probe_template(opt, hp, w, g, st, scale):
    return (opt._local_sq(hp, w, g, st, _KernelPath, scale),)


def _given_template(opt, hp, w, g, st, norms, scale, ok):
    return opt._given_update(hp, w, g, st, norms, _KernelPath, scale, ok)


#: sharded parameters (``_sharded.py``): the local sums of squares, then the update with the
#: reduced norms, each its own kernel (the collective runs between them)
_TEMPLATES = {"probe": _probe_template, "given": _given_template}
_SHARDED_KERNELS: dict[tuple[type, str], Any] = {}


def _compile(cls: type, template, name: str):
    code = template.__code__.replace(co_name=name)
    fn = types.FunctionType(code, template.__globals__, code.co_name)
    # dynamic_threads: always emit an OpenMP region, sized by the runtime thread count
    return (torch.compile(fn, dynamic=True, options={
        "cpp.dynamic_threads": True, "post_grad_custom_post_pass": _realize_scalars_pass(),
        # recompute element-wise intermediates in each loop instead of storing them: LAMB's
        # r = m_hat / (sqrt(v_hat) + eps) + wd w was a full-size temporary, freshly
        # allocated (and page-faulted) for every tensor and step
        "realize_opcount_threshold": 10_000, "realize_reads_threshold": 100,
    }), cls.__new__(cls))


def _kernel_for(cls: type):
    """``(kernel, self)``: one ``torch.compile`` per optimizer class, each on its own code
    object so that each class has its own dynamo cache (and recompile limit), and the
    ``self`` to call it with: one bare instance per class (dynamo guards on the identity of
    an optimizer object, so passing each user's optimizer would recompile per instance;
    a compilable class's ``_update`` reads only class attributes of ``self``)."""
    k = _KERNELS.get(cls)
    if k is None:
        k = _KERNELS[cls] = _compile(cls, _kernel_template, f"_compiled_{cls.__name__}")
    return k


def _sharded_kernel_for(cls: type, kind: str):
    """:func:`_kernel_for` for the two kernels of sharded parameters (``kind``: ``"probe"``
    or ``"given"``)."""
    k = _SHARDED_KERNELS.get((cls, kind))
    if k is None:
        k = _SHARDED_KERNELS[(cls, kind)] = _compile(cls, _TEMPLATES[kind], f"_compiled_{cls.__name__}_{kind}")
    return k


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
    (:meth:`local_sq` and :meth:`run_given` for sharded parameters, ``_sharded.py``)."""

    @staticmethod
    def run(opt, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
            states: list[dict[str, Tensor]], scale: Tensor | None = None, ok: Tensor | None = None):
        """Update ``params`` in place; returns ``fin, trust, lr, w_norm, g_norm`` stacked
        in ``params`` order (``w_norm`` is ``None`` for a non-adapted group). ``scale``, ``ok``:
        a GradScaler's inputs (``LayerwiseOptimizer._masked_update``), kernel inputs here."""
        return _run_split(opt, group, params, grads, states, None, lambda idx: opt._masked_update(
            group, *_lists(params, grads, states, idx), Foreach, scale, ok), tail=(scale, ok))

    @staticmethod
    def local_sq(opt, group, params, grads, states, scale: Tensor | None = None) -> Tensor:
        """``LayerwiseOptimizer._local_sq`` of every tensor, ``[n, k]`` (writes nothing).
        Without norm operands (the LARS family) the sums are two ``_foreach_norm`` calls."""
        if not opt._n_norm_operands(group):
            return opt._local_sq(group, *_lists(params, grads, states, range(len(params))), Foreach, scale)
        return _run_split(opt, group, params, grads, states, "probe", lambda idx: (opt._local_sq(
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
        kernel, algo = _kernel_for(type(opt)) if kind is None else _sharded_kernel_for(type(opt), kind)
        done = 0
        try:
            with torch._dynamo.config.patch(specialize_float=True):
                for i in big:
                    st = {k: _flat(v) for k, v in states[i].items()}
                    args = (algo, hp, _flat(params[i]), _flat(grads[i]), st)
                    if extra is not None:  # a fresh tensor: a view of `extra` would be guarded on its base
                        args += (extra[i].clone(),)
                    rows[i] = kernel(*args, *tail)
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
