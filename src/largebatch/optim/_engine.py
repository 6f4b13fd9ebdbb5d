"""The engine shared by every largebatch optimizer.

Every layer-wise optimizer here is "a base direction + a layer-wise rule"
(docs/algorithms.md): the engine does everything else once:

* collects the parameters of a group that have a gradient (``grad is None`` is skipped,
  sparse gradients raise), creates their state lazily;
* computes the per-tensor norms ``||w||`` and ``||g||`` in one batched call;
* decides, per tensor and on the device, whether the gradient is finite: a tensor with a
  non-finite gradient is left untouched, weights and state alike (its coefficients become
  the identity and its gradient is replaced by zeros) and ``found_inf`` is raised;
* runs the algorithm's ``_update`` on an execution path, all tested equal:
  ``"per_tensor"`` (the readable reference), ``"foreach"`` (``_paths.py``),
  ``"compiled"`` (``_compiled.py``, for classes that declare ``compilable = True``) and
  ``"native"`` (``_native.py``: the rule in C++, for classes that declare ``_native_rule``);
* hands DTensor parameters (FSDP2, tensor parallelism) to ``_sharded.py``: the same
  ``_update`` on the local shards, with the norms of the full tensors (docs/algorithms.md section 1) of
  all tensors of the step reduced in one collective (docs/algorithms.md, section 13).

There is no host-device synchronization inside ``step()``: per-tensor decisions (zero norm
rules, non-finite skips, clipping) are ``torch.where`` on device tensors, never a Python
``if`` on a tensor value. Python branches only look at hyper-parameters.

Precision (docs/algorithms.md section 8): ``_update`` computes in the
*compute dtype* of the parameters (:func:`compute_dtype`): their own for float32 / float64,
float32 for float16 / bfloat16 (whose state is float32 too; the engine hands ``_update``
float32 copies of weights and gradients and rounds the result back), and complex tensors
(weights, gradients, state) are seen as ``torch.view_as_real``. Per-tensor scalars are
built in that dtype (:func:`select`, never ``torch.where(mask, 0.9, 1.0)``, which rounds
to float32), and step counters are int64.

Diagnostics: with ``opt.track_stats = True`` the engine keeps, after each step, the norms
and the trust ratio / per-layer learning rate it applied as device tensors;
:meth:`LayerwiseOptimizer.layer_stats` returns them.

Mixed precision: the optimizers follow ``torch.amp.GradScaler``'s protocol for optimizers
that unscale inside their step (``_step_supports_amp_scaling = True``; torch 2.14
``GradScaler.step``, as ``torch.optim.Adam(fused=True)``). The scaler checks the gradients
for infs (one pass at ``inv_scale = 1``, no unscale pass), sets ``opt.grad_scale`` (its scale,
a device tensor; ``None`` after an explicit ``scaler.unscale_(opt)``) and ``opt.found_inf``
(a device tensor, nonzero: skip the step), calls ``step()`` and deletes both. ``step()`` then
divides the gradients by ``grad_scale`` as part of the update (private copies; ``p.grad``
keeps its scaled values; the compiled kernels take it as an input) and, where ``found_inf``
is nonzero, masks every tensor as non-finite and restores the 0-d state (step counters, e.g.
TVLARS's ``optimizer_steps``): weights and state stay untouched. All of it on the device:
the scaler's ``step`` + ``update`` read nothing on the host. ``opt.found_inf`` reads the
scaler's input while it is set and otherwise :attr:`LayerwiseOptimizer.last_found_inf`, the
engine's output (a 0-d bool tensor: the last step left a tensor, or all of them, untouched).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from .._validation import HyperparameterError, check, check_nonneg
from . import _compiled, _native, _sharded
from .._dtensor import dtensor_type
from ._paths import Foreach, PerTensor, Replay, TensorList

__all__ = ["LayerwiseOptimizer", "HyperparameterError", "PATHS", "zero_norm_safe_ratio", "select",
           "state_dtype", "compute_dtype", "SUPPORTED_DTYPES"]

PATHS = ("per_tensor", "foreach", "compiled", "native")
_PATH_IMPL = {"per_tensor": PerTensor, "foreach": Foreach, "compiled": _compiled.Compiled,
              "native": _native.Native}

#: parameter dtypes the optimizers accept (docs/algorithms.md, "Precision")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
_HALF = (torch.float16, torch.bfloat16)
_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the optimizer state of a parameter of ``dtype``: float32 for float16 /
    bfloat16, the parameter's own otherwise (complex state stays complex, as in ``torch.optim``)."""
    return torch.float32 if dtype in _HALF else dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``_update`` computes in for a parameter of ``dtype``: float32 for float16 /
    bfloat16, the real dtype of ``view_as_real`` for complex, the parameter's own otherwise."""
    d = state_dtype(dtype)
    return _REAL.get(d, d)   # a lookup, not dtype.to_real(): dynamo (fullgraph) cannot trace that


def select(mask: Tensor, a: Tensor | float, b: Tensor | float, like: Tensor) -> Tensor:
    """``torch.where(mask, a, b)`` in ``like``'s dtype (``mask`` broadcast to ``like``'s shape).

    Python numbers enter at double precision and are rounded once, to ``like``'s dtype;
    ``torch.where(mask, 0.9, 1.0)`` would give the default dtype (float32), which a float64
    run must not use (docs/algorithms.md, "Precision")."""
    return torch.where(mask, a if isinstance(a, Tensor) else torch.full_like(like, a), b)


def _working_tensors(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]]):
    """What ``_update`` works on for one (device, dtype) bucket: complex tensors as
    ``view_as_real`` (weights, gradients and complex state; ``torch.optim``'s convention),
    float16 / bfloat16 weights and gradients as float32 copies (their state is float32
    already). Returns ``(w, g, states, targets)``: ``targets`` are the tensors the float32
    result is copied (rounded) back into, ``None`` when ``w`` is updated in place."""
    if params[0].is_complex():
        params = [torch.view_as_real(p) for p in params]
        grads = [torch.view_as_real(g) for g in grads]
        states = [{k: torch.view_as_real(v) if v.is_complex() else v for k, v in st.items()} for st in states]
    if params[0].dtype in _HALF:
        return [p.float() for p in params], [g.float() for g in grads], states, params
    return params, grads, states, None


def _state_like(p: Tensor, empty: bool = False) -> Tensor:
    """A tensor like ``p`` in :func:`state_dtype` (``p`` itself when that is ``p``'s dtype),
    from which ``_init_state`` builds the state; 0 elements with ``empty`` (dtypes only)."""
    dt = state_dtype(p.dtype)
    if empty:
        return torch.empty(0, dtype=dt, device=p.device)
    return p if dt == p.dtype else torch.empty_like(p, dtype=dt)


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base class: a subclass defines its constructor, ``_check_hparams``, ``_init_state``
    and ``_update`` (see docs/optimizers.md, "Adding an optimizer").

    Group keys shared by all: ``lr``, ``weight_decay`` (coupled L2: ``d = g + wd * w``),
    ``adapt`` (apply the layer-wise rule to this group; excluded groups get the plain base
    update at ``lr`` -- see :func:`largebatch.optim.param_groups`).

    ``lr`` may be a float or a 0-d float tensor. A tensor on the parameters' device keeps
    ``step()`` free of host values (step counters already live there), so the step can be
    captured in a CUDA graph; LR schedulers update such a tensor in place.

    ``path``: ``None`` picks the fastest path for the device (on CPU ``"native"`` for a class
    that declares ``_native_rule``, else ``"compiled"`` for a class with ``compilable = True``;
    ``"foreach"`` otherwise); ``"per_tensor"`` forces the reference loop; ``"compiled"`` for a
    class that is not compilable, or ``"native"`` for one without a rule, raises ``ValueError``.
    """

    #: The compiled path's contract (``_compiled.py``), declared by each class in its own
    #: body (not inherited): ``_update`` (and the hooks it calls) reads nothing per tensor
    #: outside ``(group, w, g, st, ...)`` and only *class* attributes of ``self``, because
    #: one bare instance per class (``cls.__new__(cls)``) is the compiled kernel's ``self``.
    #: Per-step inputs that are not state go through :meth:`_step_inputs`.
    compilable: ClassVar[bool] = False

    #: DTensor parameters (FSDP2, tensor parallelism) take the sharded flow (``_sharded.py``):
    #: local shards, all norms of the step in one collective. ``False`` hands the DTensors to
    #: the paths as they are (DTensor dispatch: one collective per norm; benchmarks only).
    _shard_aware: ClassVar[bool] = True

    #: group keys accepted besides the defaults (set by users, schedulers, or the engine)
    _extra_group_keys = frozenset({"params", "name", "initial_lr"})

    #: ``torch.amp.GradScaler`` protocol (module docstring, "Mixed precision"): the scaler sets
    #: ``grad_scale`` and ``found_inf`` on the optimizer instead of unscaling and syncing.
    _step_supports_amp_scaling: ClassVar[bool] = True

    def __init__(self, params, defaults: dict[str, Any], path: str | None = None, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False):
        check("maximize", maximize, isinstance(maximize, bool), "True or False")
        check("foreach", foreach, foreach is None or isinstance(foreach, bool), "None, True or False")
        if differentiable:
            raise HyperparameterError(
                "differentiable", "differentiable=True is not supported: the step updates weights and state in "
                "place under torch.no_grad() (as torch.optim's default), and its trust ratio is a torch.where on "
                "norms whose zero-norm branches have no useful derivative; differentiate through a functional "
                "update of your own instead")
        if foreach is not None:   # torch.optim's switch, mapped onto the execution paths
            want = "foreach" if foreach else "per_tensor"
            if path is not None and path != want:
                raise HyperparameterError("foreach", f"foreach={foreach} contradicts path={path!r}: pass one of them "
                                          f"(foreach={foreach} means path={want!r})")
            path = want
        if path is not None and path not in PATHS:
            raise HyperparameterError("path", f"invalid path={path!r}: expected None or one of {PATHS}")
        if path == "compiled" and not self.is_compilable():
            raise HyperparameterError(
                "path", f"path='compiled': {type(self).__name__} does not declare `compilable = True` in its "
                "class body (see docs/optimizers.md, 'Adding an optimizer'); use path='foreach'")
        if path == "native" and not _native.rule_of(type(self)):
            raise HyperparameterError(
                "path", f"path='native': {type(self).__name__} has no native kernel (only the classes that "
                "declare `_native_rule` in their class body: LARS, TVLARS, CLARS, LALC, LAMB); use path='compiled'")
        self.path = path
        self._compilable = self.is_compilable()  # read in step(): dynamo cannot trace cls.__dict__
        self._native_rule = _native.rule_of(type(self))
        self.track_stats = False
        self._stats: list[dict[str, Any]] = []
        #: the last step's output: a 0-d bool device tensor, ``True`` when it left a tensor
        #: (non-finite gradient) or all of them (``found_inf`` given by a GradScaler) untouched
        self.last_found_inf: Tensor | None = None
        self._amp_found_inf: Tensor | None = None
        defaults = {"adapt": True, **defaults, "maximize": maximize}
        self._validate_group(defaults, where="")
        super().__init__(params, defaults)

    @property
    def amp_unscale_in_step(self) -> bool:
        """Whether a ``torch.amp.GradScaler`` hands this optimizer its scale and lets ``step()``
        unscale the gradients (True, the default: no unscale pass, no host sync; module
        docstring, "Mixed precision"). Set it to False for code that unscales explicitly and
        refuses optimizers that unscale themselves, e.g. Lightning's ``precision="16-mixed"``
        with ``gradient_clip_val``: the scaler then unscales ``.grad`` in place
        (``scaler.unscale_``) and skips ``step()`` on an inf itself, as for ``torch.optim.SGD``
        (docs/optimizers.md, "Mixed precision")."""
        return bool(self._step_supports_amp_scaling)

    @amp_unscale_in_step.setter
    def amp_unscale_in_step(self, value: bool) -> None:
        check("amp_unscale_in_step", value, isinstance(value, bool), "True or False")
        self._step_supports_amp_scaling = value

    @property
    def found_inf(self) -> Tensor | None:
        """While ``torch.amp.GradScaler.step`` runs: the scaler's ``found_inf`` (an input of
        ``step()``, torch's protocol); otherwise :attr:`last_found_inf`, the output of the last
        step (``opt.found_inf`` after a step, as before the protocol; ``del`` clears the input)."""
        given = getattr(self, "_amp_found_inf", None)
        return given if given is not None else getattr(self, "last_found_inf", None)

    @found_inf.setter
    def found_inf(self, value) -> None:
        self._amp_found_inf = value

    @found_inf.deleter
    def found_inf(self) -> None:
        self._amp_found_inf = None

    @classmethod
    def is_compilable(cls) -> bool:
        """Whether this class itself declares the compiled path's contract (``compilable``)."""
        return bool(cls.__dict__.get("compilable", False))

    # ------------------------------------------------------------------ validation
    @classmethod
    def _check_hparams(cls, g: dict[str, Any]) -> None:
        """Subclasses: raise ``HyperparameterError`` naming the argument and its accepted range."""
        raise NotImplementedError

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor):  # e.g. on the params' device, for CUDA-graph capture
            check(f"lr{where}", lr, lr.dim() == 0 and lr.is_floating_point(), "a float or a 0-d float tensor")
            check_nonneg(f"lr{where}", float(lr))  # once, at construction: not in step()
        else:
            check_nonneg(f"lr{where}", lr)
        check_nonneg(f"weight_decay{where}", group["weight_decay"])
        check(f"adapt{where}", group["adapt"], isinstance(group["adapt"], bool), "True or False")
        check(f"maximize{where}", group.get("maximize", False), isinstance(group.get("maximize", False), bool),
              "True or False")
        try:
            self._check_hparams(group)
        except HyperparameterError as e:
            raise HyperparameterError(e.arg, f"{e}{where}") from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, then this class's checks. Keys this class
        does not know are kept, as ``torch.optim`` keeps them (timm's ``lr_scale``, a ``model``
        from ``ZeroRedundancyOptimizer``); one that looks like a misspelling of a known key
        (``difflib``) warns."""
        _warn_misspelled(param_group, set(self.defaults) | self._extra_group_keys, type(self).__name__)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        bad = sorted({str(p.dtype) for p in group["params"] if p.dtype not in SUPPORTED_DTYPES})
        if bad:
            self.param_groups.pop()
            raise TypeError(
                f"{type(self).__name__}: parameters of dtype {', '.join(bad)} are not supported; accepted: "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} (docs/algorithms.md, 'Precision')")
        try:
            self._validate_group(group, where=f" (param group {len(self.param_groups) - 1})")
        except Exception:
            self.param_groups.pop()
            raise
        self._group_added(group)

    def _group_added(self, group: dict[str, Any]) -> None:
        """Called after a group is added (CLARS: measure its new adapted tensors)."""

    # ------------------------------------------------------------------ copies and checkpoints
    #: instance attributes that describe one step in flight (not copied, not pickled)
    _transient = frozenset({"_stats", "_amp_found_inf", "grad_scale"})

    def __getstate__(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.__getstate__`` (defaults, state, param groups) and this
        object's own settings (``path``, ``track_stats``, CLARS's tracker ...), so that
        ``copy.deepcopy``, ``pickle`` and ``torch.save(opt)`` give an optimizer that steps.
        Hooks are left out, as by ``torch.optim``."""
        out = super().__getstate__()
        for k, v in self.__dict__.items():
            if k not in out and k not in self._transient and not k.startswith("_optimizer_"):
                out[k] = v
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_stats", [])
        self.__dict__.setdefault("_amp_found_inf", None)
        for k, v in _ATTR_DEFAULTS.items():
            self.__dict__.setdefault(k, v)
        self.defaults.pop("differentiable", None)   # torch.optim adds it; refused at construction here
        for g in self.param_groups:
            for k, v in _LATER_GROUP_KEYS.items():
                g.setdefault(k, v)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict`` (docs/optimizers.md, "Checkpoints"):

        * the load-state-dict pre-hooks run first, each on the (shallow-copied) dict the previous
          one returned, then everything below is checked on their result, and the post-hooks
          run last, as in ``torch.optim``;
        * the saved state may be keyed by anything (``torch.optim`` maps the saved groups'
          ``params`` entries to this optimizer's parameters in order: integer ids, or the
          parameter names ``torch.distributed.checkpoint.set_optimizer_state_dict`` passes);
        * before anything is loaded: each saved group passes this class's validation and has
          this class's hyper-parameters (a group of another class, e.g. ``torch.optim.SGD``'s
          or LAMB's saved into LARS, is refused); each tensor's state has exactly the keys
          this class keeps; full-size state has the parameter's shape and a floating (or, for
          a complex parameter, complex) dtype; counters are one-element tensors or Python
          numbers (``torch.optim``'s tests and old checkpoints store ``step`` as a number);
        * each state tensor is then cast to the dtype this class keeps (docs/algorithms.md,
          "Precision"), on the parameter's device: ``torch.optim`` casts floating state to the
          parameter dtype (float32 state of a float16 parameter would become float16);
          counters become exact int64 0-d tensors."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        state_dict, originals = self._checked_state_dict(state_dict)
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post
        for group in self.param_groups:
            for k, v in _LATER_GROUP_KEYS.items():
                group.setdefault(k, v)
            for p in group["params"]:
                st, saved = self.state.get(p), originals.get(p)
                if not st or saved is None:
                    continue
                want = self._init_state(_state_like(p, empty=True), group)
                for k, ref in want.items():   # from the saved value: torch.optim cast it to p's dtype
                    v = saved[k].to(device=p.device, dtype=ref.dtype)
                    st[k] = v.reshape(()) if ref.dim() == 0 else v.clone() if v is saved[k] else v
        for hook in post.values():
            hook(self)

    def _checked_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` checked against this optimizer (see :meth:`load_state_dict`), with
        counters given as numbers made tensors; raises ``ValueError`` naming what differs."""
        name = type(self).__name__
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict: no {key!r} entry; expected the dict of an optimizer's state_dict()")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict: {len(saved_groups)} param group(s), but this {name} has "
                             f"{len(self.param_groups)}")
        required = set(self.defaults) - set(_LATER_GROUP_KEYS)
        owner: dict[Any, tuple[Tensor, dict[str, Any], int]] = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict: param group {i} has {len(saved['params'])} parameters, "
                                 f"this {name}'s has {len(group['params'])}")
            missing = sorted(required - set(saved))
            if missing:
                raise ValueError(
                    f"state_dict: param group {i} lacks {missing}, hyper-parameters of {name}; was it saved by "
                    "another optimizer class?")
            merged = {**self.defaults, **saved}
            self._validate_group(merged, where=f" (loaded param group {i})")
            for key, p in zip(saved["params"], group["params"]):
                owner[key] = (p, merged, i)
        state = dict(state_dict["state"])
        originals: dict[Tensor, dict[str, Tensor]] = {}
        for key, st in state_dict["state"].items():
            if key not in owner or not st:
                continue
            p, group, i = owner[key]
            where = f"state_dict: parameter {key!r} (param group {i})"
            want = self._init_state(_state_like(p, empty=True), group)
            if not isinstance(st, dict) or set(st) != set(want):
                got = sorted(st) if isinstance(st, dict) else type(st).__name__
                raise ValueError(f"{where} has state {got}, but {name} with these hyper-parameters keeps "
                                 f"{sorted(want)}; was it saved by another optimizer class?")
            st = dict(st)
            for k, ref in want.items():
                v = st[k]
                if ref.dim() == 0:   # a counter: a one-element tensor or a number
                    if isinstance(v, Tensor) and v.numel() == 1 and not v.is_complex():
                        continue
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
                        st[k] = torch.tensor(int(round(v)), dtype=torch.int64)
                        continue
                    raise ValueError(f"{where}: state {k!r} is {_describe(v)}; expected a number or a one-element "
                                     "tensor")
                ok = (isinstance(v, Tensor) and tuple(v.shape) == tuple(p.shape)
                      and (v.is_complex() if p.is_complex() else v.is_floating_point()))
                if not ok:
                    raise ValueError(f"{where}: state {k!r} is {_describe(v)}; expected a "
                                     f"{'complex' if p.is_complex() else 'floating'} tensor of the parameter's "
                                     f"shape {tuple(p.shape)}")
            state[key] = st
            originals[p] = st
        return {**state_dict, "state": state}, originals

    # ------------------------------------------------------------------ algorithm hooks
    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """Return the initial state tensors of a parameter (created on first step). ``p`` has
        the parameter's shape, layout and device, in :func:`state_dtype` (float32 for a
        float16 / bfloat16 parameter): build tensors with ``torch.zeros_like(p)``. Step
        counters: 0-d int64 on ``p.device`` (exact)."""
        return {}

    def _step_inputs(self, group: dict[str, Any], params: list[Tensor]) -> dict[str, list[Tensor]]:
        """Per-step, per-tensor inputs that are not state (CLARS's ``n_k``): ``{key: [one
        tensor per param]}``. ``_update`` finds them in ``st`` beside the state; they are
        never stored in ``self.state`` (so never written into checkpoints)."""
        return {}

    def _update(self, group, w, g, st, w_norm, g_norm, fin, P) -> tuple[Tensor, Tensor]:
        """Update ``w`` (and the state ``st``) in place from the finite-masked gradient ``g``.

        ``w``, ``g`` and the values of ``st`` are tensors (per-tensor path) or
        :class:`TensorList` (foreach path), real and in the compute dtype (module docstring).
        ``w_norm`` (``None`` when the group is not adapted), ``g_norm`` (in the compute dtype:
        build per-tensor scalars with :func:`select` or from it) and ``fin`` (gradient
        finite) are 0-d / 1-D tensors.
        Returns the trust ratio and the per-layer learning rate applied (for diagnostics).
        """
        raise NotImplementedError

    @classmethod
    def _n_norm_operands(cls, group: dict[str, Any]) -> int:
        """How many norms ``_update`` takes through ``P.norm`` (0 by default; LAMB's ``||r||``,
        LALC's ``||h||``: 1 in adapted groups). Only sharded parameters need it."""
        return 0

    def _norm_operands(self, group, w, g, st, P, dtype: torch.dtype) -> list:
        """The tensors whose norms ``_update`` takes through ``P.norm``, in that order, as
        ``_update`` would compute them from this (unmasked) ``g`` if it is finite, written
        out of place (``w``, ``g`` and ``st`` are not modified). For sharded parameters the
        engine reduces their norms with ``||w||`` and ``||g||`` in one collective before
        ``_update`` runs (``_sharded.py``); ``dtype`` is the compute dtype."""
        return []

    def _native_spec(self, group: dict[str, Any], states: list[dict[str, Tensor]], dtype: torch.dtype):
        """For a class that declares ``_native_rule``: the kernel's arguments for one bucket
        (``_native.NativeSpec``: the rule's hyper-parameters, per-tensor inputs, the state keys
        it reads), declared once by the class that owns the rule (``_native.py`` sets only what
        every rule shares: ``lr``, ``weight_decay``, ``eps``, ``adapt``, the tensors)."""
        raise NotImplementedError(f"{type(self).__name__} declares no native arguments")

    def lr_multiplier(self, group: dict[str, Any], t: int) -> float:
        """The factor this optimizer applies to ``group["lr"]`` at optimizer step ``t``,
        before any trust ratio: 1 here; TVLARS: ``phi(t)``. For logs and plots."""
        return 1.0

    # ------------------------------------------------------------------ engine
    def _path_for(self, device: torch.device) -> str:
        if self.path is not None:
            return self.path
        if self._native_rule and _native.applies(device):
            return "native"
        return _compiled.default_path(device) if self._compilable else "foreach"

    @staticmethod
    def _call_closure(closure: Callable[[], Any] | None) -> Any:
        """``closure()`` with gradients enabled (``torch.optim`` convention), or ``None``."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _amp(self) -> "_AmpInputs | None":
        """The GradScaler's inputs of this step (module docstring, "Mixed precision"), or ``None``."""
        scale, found = getattr(self, "grad_scale", None), getattr(self, "_amp_found_inf", None)
        if found is not None and not isinstance(found, Tensor):  # sum() over no device: 0
            found = None if not found else torch.tensor(float(found))
        if scale is None and found is None:
            return None
        return _AmpInputs(scale, found)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = self._call_closure(closure)
        self._stats = []
        amp = self._amp()
        found_inf = None
        dtensor = dtensor_type() if self._shard_aware else None
        sharded = []
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
                mesh = p.device_mesh if dtensor is not None and isinstance(p, dtensor) else None
                buckets[(p.device, p.dtype, mesh)].append(p)
            for (device, _, mesh), params in buckets.items():
                P = _PATH_IMPL[self._path_for(device)]
                if mesh is not None:  # DTensor parameters: all of the step's norms in one collective
                    sharded.append((group, params, P))
                    continue
                fin = self._run(group, params, P, amp)
                bad = ~fin.all()
                found_inf = bad if found_inf is None else found_inf | bad.to(found_inf.device)
        for fin in _sharded.run(self, sharded, amp) if sharded else ():
            bad = ~fin.all()
            found_inf = bad if found_inf is None else found_inf | bad.to(found_inf.device)
        self.last_found_inf = found_inf
        return loss

    def _states(self, group, params: list[Tensor]) -> list[dict[str, Tensor]]:
        """Each tensor's state (created on first use), with this step's inputs beside it."""
        out = []
        for p in params:
            st = self.state[p]
            if not st:
                st.update(self._init_state(_state_like(p), group))
            out.append(st)
        inputs = self._step_inputs(group, params)
        if inputs:  # shallow copies: state tensors are still updated in place
            out = [{**st, **{k: v[i] for k, v in inputs.items()}} for i, st in enumerate(out)]
        return out

    def _run(self, group, params: list[Tensor], P, amp: "_AmpInputs | None" = None) -> Tensor:
        work, grads, states, targets = _working_tensors(params, [p.grad for p in params],
                                                        self._states(group, params))
        scale, ok = amp.scale(work[0]) if amp else None, amp.ok(work[0].device) if amp else None
        scale = maximized(group, scale, work[0])
        counters = _Counters(states) if ok is not None else None
        fin, trust, lr, wn, gn = P.run(self, group, work, grads, states, scale, ok)
        if counters is not None:
            counters.restore_unless(ok)
        if targets is not None:  # float16 / bfloat16: the float32 result, rounded
            torch._foreach_copy_(targets, work)
        self._record_stats(group, params, fin, trust, lr, wn, gn)
        return fin

    def _record_stats(self, group, params, fin, trust, lr, wn, gn) -> None:
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

    def _masked_update(self, group, w, g, st, P, scale: Tensor | None = None, ok: Tensor | None = None):
        """The update with the engine's masking: ``g`` divided by ``scale`` (a GradScaler's
        ``grad_scale`` in the compute dtype) when given, every tensor masked as non-finite
        where ``ok`` (0-d bool: the scaler found no inf) is ``False``."""
        if scale is not None:
            g = g.div(scale)  # out of place: p.grad is never modified
        g_norm = P.norm(g)
        fin = torch.isfinite(g_norm)
        if ok is not None:
            fin = fin & ok
        w_norm = P.norm(w) if group["adapt"] else None
        trust, lr = self._update(group, w, P.zero_unless(fin, g), st, w_norm, g_norm, fin, P)
        return fin, trust, lr, w_norm, g_norm

    # ------------------------------------------------------------------ sharded parameters
    def _local_norms(self, group, w, g, st, P, scale: Tensor | None = None) -> Tensor:
        """Local norms (``[..., k]``, in the compute dtype; ``P.norm``: free of overflow and
        underflow) of what the step takes norms of: ``w`` (adapted groups), ``g`` (divided by
        ``scale`` when given), then :meth:`_norm_operands`. Writes nothing."""
        if scale is not None:
            g = g.div(scale)
        xs = [w] if group["adapt"] else []
        xs.append(g)
        if self._n_norm_operands(group):
            dtype = (w.ts[0] if isinstance(w, TensorList) else w).dtype
            xs += self._norm_operands(group, w, g, st, P, dtype)
        return torch.stack([P.norm(x) for x in xs], dim=-1)

    def _given_update(self, group, w, g, st, norms, P, scale: Tensor | None = None, ok: Tensor | None = None):
        """:meth:`_masked_update` with the norms given (``[..., k]`` as :meth:`_local_norms`,
        already reduced over the shards and in the compute dtype; see :meth:`_local_norms`): ``_update`` reads the
        norms of its :meth:`_norm_operands` through ``P.norm`` (a :class:`Replay`)."""
        if scale is not None:
            g = g.div(scale)
        a = 1 if group["adapt"] else 0
        w_norm = norms[..., 0] if a else None
        g_norm = norms[..., a]
        fin = torch.isfinite(g_norm)
        if ok is not None:
            fin = fin & ok
        R = Replay(P, norms[..., a + 1:])
        trust, lr = self._update(group, w, P.zero_unless(fin, g), st, w_norm, g_norm, fin, R)
        R.done()
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


#: group keys added after the first releases: filled with these values in older checkpoints
_LATER_GROUP_KEYS = {"maximize": False}
#: instance attributes of ``LayerwiseOptimizer`` added later (pickles of older objects)
_ATTR_DEFAULTS = {"path": None, "track_stats": False, "last_found_inf": None}


def _warn_misspelled(group: dict[str, Any], known: set[str], name: str) -> None:
    """Warn for a group key close to a known one (``difflib``): ``momentun=0.9`` would be kept
    and ignored, as by ``torch.optim``; other unknown keys are kept silently."""
    import difflib
    import warnings

    for key in sorted(set(group) - known, key=str):
        close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.8)
        if close:
            warnings.warn(f"{name}: param-group key {key!r} is not a hyper-parameter of {name} and is kept but "
                          f"unused; did you mean {close[0]!r}?", UserWarning, stacklevel=4)


def _describe(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"{type(v).__name__} {v!r}"[:80]


class _AmpInputs:
    """A GradScaler's ``grad_scale`` and ``found_inf`` for one step, moved (once per device and
    dtype, without a sync: ``non_blocking`` as ``torch.optim.Adam``'s fused path) to where the
    buckets compute."""

    def __init__(self, grad_scale, found_inf: Tensor | None):
        self.grad_scale, self.found_inf = grad_scale, found_inf
        self._cache: dict = {}

    def scale(self, like: Tensor) -> Tensor | None:
        """``grad_scale`` as a 0-d tensor in ``like``'s (compute) dtype and device, or ``None``."""
        if self.grad_scale is None:
            return None
        key = ("scale", like.device, like.dtype)
        if key not in self._cache:
            s = self.grad_scale
            if not isinstance(s, Tensor):  # a number set by the user: exact in float64
                s = torch.tensor(float(s), dtype=torch.float64)
            self._cache[key] = s.to(device=like.device, non_blocking=True).to(like.dtype)
        return self._cache[key]

    def ok(self, device: torch.device) -> Tensor | None:
        """0-d bool on ``device``: the scaler found no inf (``found_inf == 0``), or ``None``."""
        if self.found_inf is None:
            return None
        key = ("ok", device)
        if key not in self._cache:
            self._cache[key] = self.found_inf.to(device, non_blocking=True) == 0
        return self._cache[key]


class _Counters:
    """The 0-d state tensors of a bucket (step counters), saved before the update so that a step
    the GradScaler skips leaves them as they were (``_update`` masks everything else through
    ``fin``; TVLARS's ``optimizer_steps`` counts steps it skips for its own reasons)."""

    def __init__(self, states: list[dict[str, Tensor]]):
        seen: dict[int, Tensor] = {}
        for st in states:
            for v in st.values():
                if isinstance(v, Tensor) and v.dim() == 0:
                    seen.setdefault(id(v), v)
        by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
        for v in seen.values():
            by_dtype[v.dtype].append(v)
        self._saved = [(vs, torch.stack(vs)) for vs in by_dtype.values()]

    def restore_unless(self, ok: Tensor) -> None:
        for vs, old in self._saved:
            new = torch.where(ok.to(old.device), torch.stack(vs), old)
            torch._foreach_copy_(vs, list(new.unbind()))


def maximized(group: dict[str, Any], scale: Tensor | None, like: Tensor) -> Tensor | None:
    """The divisor of this step's gradients: a GradScaler's ``scale`` (or none), negated for a
    group with ``maximize=True`` (``torch.optim``'s switch: ascend the objective). Dividing by
    ``-1`` is exact, and every path already divides by ``scale`` where it reads ``g``."""
    if not group.get("maximize", False):
        return scale
    return -scale if scale is not None else torch.full((), -1.0, dtype=like.dtype, device=like.device)


def zero_norm_safe_ratio(num: Tensor, den: Tensor, scale: float = 1.0, eps: float = 0.0) -> Tensor:
    """``scale * num / (den + eps)``, or 1 where ``num == 0`` or ``den == 0`` (the zero-norm
    rule of docs/algorithms.md), computed with ``torch.where`` (no host sync)."""
    ok = (num > 0) & (den > 0)
    return torch.where(ok, scale * num / (den + eps), torch.ones_like(num))
