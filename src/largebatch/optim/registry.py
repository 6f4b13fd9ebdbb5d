"""The optimizer registry: one entry per optimizer, read by every front end.

An :class:`OptimizerInfo` says what the rest of the package needs to know about an
optimizer beyond its class: which ``largebatch train`` config fields feed which
constructor arguments, what the harness's ``schedule: auto`` and ``lr_scaling: auto`` mean
for it, whether it needs the model (CLARS), and the toy-scale recipes ``largebatch demo``
trains it with. Everything else is read from the class itself: its defaults (the
constructor's signature), its validation (:meth:`OptimizerInfo.check` constructs the
optimizer on a dummy parameter, so the class, config files and the command line accept
exactly the same values), and its CPU path (``native`` for a class with a C++ rule,
``_native_rule``; ``compiled`` for one that declares ``compilable``; else ``foreach``).

The config (``train/config.py``), the optimizer factory (``train/factory.py``), the demo
(``experiments/demo.py``), ``largebatch groups`` and ``largebatch optimizers`` (the table
in docs/optimizers.md) read :data:`OPTIMIZERS`; ``largebatch.optim`` exports the package's
classes from it. Adding an optimizer to the package: its module, one :func:`register` call
below (with its import), its reference formula (``tests/reference.py``, its section of
docs/algorithms.md) and one row in ``tests/cases.py``; then regenerate the table of
docs/optimizers.md (docs/optimizers.md, "Adding an optimizer").
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .._validation import HyperparameterError
from ._engine import LayerwiseOptimizer
from .clars import CLARS
from .lalc import LALC
from .lamb import LAMB
from .lars import LARS
from .tvlars import TVLARS

__all__ = ["OptimizerInfo", "OPTIMIZERS", "register", "get", "markdown_table"]

#: a demo recipe value may depend on the run: ``f(epochs, steps_per_epoch) -> value``
RecipeValue = Any


@dataclass(frozen=True)
class OptimizerInfo:
    """One registry entry.

    Attributes:
        name: the name in configs and on the command line (``--optimizer NAME``).
        cls: a ``torch.optim.Optimizer`` subclass, constructed as ``cls(param_groups, lr=...,
            **kwargs)``; weight decay goes in the param groups.
        args: ``{config field: constructor keyword}`` for every config field the optimizer
            takes besides ``lr`` and ``weight_decay``. A field set to ``None`` is not passed
            (the constructor's default applies: no copy of defaults here).
        summary: its rule in one line (``largebatch optimizers``, ``largebatch groups``).
        epoch_args: constructor keywords counted in optimizer steps that the config gives in
            epochs (converted with the run's steps per epoch).
        fixed: keywords the harness always passes (CLARS: the loop's loss reduction).
        persample: it measures per-sample statistics in the model's backward pass: the
            constructor takes ``model=`` and the training loop sets ``opt.persample.loss_scale``
            (the loss's scale relative to the sum of per-sample losses) before each step.
        schedule: what ``schedule: auto`` means: ``"none"`` for an optimizer that schedules
            its learning rate itself (TVLARS's ``phi``), ``"cosine"`` (warm-up + cosine)
            otherwise.
        lr_scaling: what ``lr_scaling: auto`` means (the rule of its paper).
        demo: ``largebatch demo`` recipes at toy scale: config values, plus ``warmup``
            (a fraction of the run); a value may be a callable ``(epochs, steps_per_epoch)``.
            The demo's label is ``name`` (``name+warmup`` when ``warmup > 0``).
    """

    name: str
    cls: type
    args: Mapping[str, str]
    summary: str
    epoch_args: frozenset[str] = frozenset()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    persample: bool = False
    schedule: str = "cosine"
    lr_scaling: str = "linear"
    demo: tuple[Mapping[str, RecipeValue], ...] = ()

    # ------------------------------------------------------------------ derived from the class
    @property
    def layerwise(self) -> bool:
        """A largebatch optimizer (``adapt`` groups, diagnostics, execution paths)."""
        return isinstance(self.cls, type) and issubclass(self.cls, LayerwiseOptimizer)

    @property
    def compiled(self) -> bool:
        """Whether it runs on the compiled path (its class declares ``compilable = True``)."""
        return self.layerwise and self.cls.is_compilable()

    @property
    def cpu_path(self) -> str:
        """Its default execution path on a CPU, for a model of 2^20 parameters or more: ``native``
        (the class declares a C++ rule), ``compiled``, ``foreach`` or ``torch`` (a torch.optim class)."""
        if not self.layerwise:
            return "torch"
        from . import _native
        return "native" if _native.rule_of(self.cls) else "compiled" if self.compiled else "foreach"

    def defaults(self) -> dict[str, Any]:
        """The constructor's default of every keyword in :attr:`args` (its signature)."""
        sig = inspect.signature(self.cls.__init__).parameters
        return {kw: sig[kw].default for kw in self.args.values()
                if kw in sig and sig[kw].default is not inspect.Parameter.empty}

    # ------------------------------------------------------------------ construction
    def kwargs(self, values: Mapping[str, Any], steps_per_epoch: int = 1) -> dict[str, Any]:
        """Constructor keywords from config ``values`` (``None`` values left out)."""
        kw: dict[str, Any] = {}
        for fld, arg in self.args.items():
            v = values.get(fld)
            if v is None:
                continue
            kw[arg] = int(round(v * steps_per_epoch)) if arg in self.epoch_args else v
        if self.layerwise and values.get("optimizer_path", "auto") != "auto":
            kw["path"] = values["optimizer_path"]
        return {**kw, **self.fixed}

    def build(self, params, lr: float, values: Mapping[str, Any], steps_per_epoch: int = 1,
              model: nn.Module | None = None, **extra: Any) -> torch.optim.Optimizer:
        """The optimizer over ``params`` (param groups carry ``weight_decay``)."""
        kw = {**self.kwargs(values, steps_per_epoch), **extra}
        if self.persample:
            kw["model"] = model
        return self.cls(params, lr=lr, **kw)

    def check(self, values: Mapping[str, Any], lr: float | None = None) -> None:
        """Validate config ``values`` by the class's own rules, on a dummy parameter.

        Raises ``ValueError`` whose message starts with the config field to change
        (``tvlars_lam: invalid lam=-1: expected a finite number >= 0``).
        """
        model = nn.Linear(1, 1, bias=False)  # a throwaway model, for optimizers that need one
        try:
            self.build([model.weight], values["lr"] if lr is None else lr, values, model=model,
                       weight_decay=values.get("weight_decay", 0.0))
        except (ValueError, TypeError) as e:
            arg = getattr(e, "arg", None)
            if arg is None:  # torch.optim's messages: "Invalid momentum value: -1", "Invalid learning rate"
                m = re.match(r"[Ii]nvalid (\w+)", str(e))
                arg = {"learning": "lr", "beta": "betas", "epsilon": "eps"}.get(m.group(1), m.group(1)) if m else None
            fields = {"lr": "lr", "weight_decay": "weight_decay", "path": "optimizer_path",
                      **{a: f for f, a in self.args.items()}}
            where = fields.get(arg, f"optimizer {self.name}")
            raise HyperparameterError(where, f"{where}: {e}") from None


#: name -> entry, in the order of the demo and the docs
OPTIMIZERS: dict[str, OptimizerInfo] = {}


def register(info: OptimizerInfo, replace: bool = False) -> OptimizerInfo:
    """Add ``info`` to :data:`OPTIMIZERS` (``largebatch train --optimizer NAME`` then works)."""
    if not replace and info.name in OPTIMIZERS:
        raise ValueError(f"optimizer {info.name!r} is already registered (pass replace=True)")
    if info.schedule not in ("none", "cosine", "poly"):
        raise ValueError(f"schedule: {info.schedule!r} is not one of none, cosine, poly")
    OPTIMIZERS[info.name] = info
    return info


def get(name: str) -> OptimizerInfo:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"optimizer: {name!r} is not one of {', '.join(OPTIMIZERS)}") from None


def _tvlars_lam(epochs: int, spe: int) -> float:
    """Demo: ``phi`` decays to about 1e-3 by the end of the run (exp(7) ~ 1100)."""
    return 7.0 / max(epochs * spe - round(0.1 * epochs * spe), 1)


_MOMENTUM = {"momentum": "momentum"}
register(OptimizerInfo(
    "sgd", torch.optim.SGD, {**_MOMENTUM, "nesterov": "nesterov"},
    "torch.optim.SGD (heavy-ball or Nesterov momentum), the baseline",
    demo=(dict(lr=0.1, lr_scaling="linear", warmup=0.15),)))
register(OptimizerInfo(
    "adamw", torch.optim.AdamW, {"betas": "betas", "eps": "eps"},
    "torch.optim.AdamW (decoupled weight decay), the adaptive baseline of Nado et al. 2021",
    lr_scaling="sqrt"))
register(OptimizerInfo(
    "lars", LARS, {**_MOMENTUM, "nesterov": "nesterov", "eta": "eta", "trust_clip": "trust_clip", "eps": "eps"},
    "trust = eta ||w|| / (||g|| + wd ||w|| + eps) times lr, in the velocity (You et al. 2017)",
    lr_scaling="sqrt",
    demo=(dict(lr=4.0, lr_scaling="none", warmup=0.15), dict(lr=4.0, lr_scaling="none", warmup=0.0))))
register(OptimizerInfo(
    "lamb", LAMB, {"betas": "betas", "eps": "eps", "max_trust": "max_trust"},
    "Adam direction r, trust = ||w|| / ||r|| (You et al. 2020; max_trust=1: LAMBC)",
    lr_scaling="sqrt",
    demo=(dict(lr=0.01, lr_scaling="none", warmup=0.15, weight_decay=0.01),)))
register(OptimizerInfo(
    "tvlars", TVLARS, {**_MOMENTUM, "eta": "eta", "tvlars_lam": "lam", "tvlars_alpha": "alpha",
                       "tvlars_delay_epochs": "delay", "tvlars_gamma_min": "gamma_min", "eps": "eps"},
    "LARS trust times phi(t) = 1/(alpha + exp(lam (t - delay))) + gamma_min, Nesterov, no warm-up (Do et al.)",
    epoch_args=frozenset({"delay"}), schedule="none", lr_scaling="sqrt",
    demo=(dict(lr=4.0, lr_scaling="none", schedule="none", warmup=0.0,
               tvlars_delay_epochs=lambda epochs, spe: 0.1 * epochs, tvlars_lam=_tvlars_lam),)))
register(OptimizerInfo(
    "lalc", LALC, {**_MOMENTUM, "nesterov": "nesterov", "eta": "eta", "eps": "eps"},
    "SGD direction h, lr_k = min(lr, eta ||w|| / (||h|| + eps)): clips, never amplifies (LALC paper)",
    demo=(dict(lr=0.1, lr_scaling="linear", warmup=0.0),)))
register(OptimizerInfo(
    "clars", CLARS, {**_MOMENTUM, "eta": "eta", "eps": "eps", "clars_subset": "persample_subset"},
    "LARS trust with the mean per-sample gradient norm n_k for ||g||, Nesterov (Huo et al. 2021)",
    # the training loop back-propagates sum_i f_i / rows of the step: "sum", scale set per step
    fixed={"loss_reduction": "sum"}, persample=True, lr_scaling="sqrt",
    # default eta 0.01 (CLARS paper): lr 0.4 gives the same lr * eta as the LARS recipes
    demo=(dict(lr=0.4, lr_scaling="none", warmup=0.0),)))

from . import paper_variants  # noqa: E402 - the TVLARS papers' LAMB and LARS: lamb-pto, lars-flash

paper_variants._register()


def markdown_table() -> str:
    """The registry as the Markdown table of docs/optimizers.md (``largebatch optimizers``)."""
    rows = ["| `--optimizer` | class | rule | config fields (constructor default) | `schedule: auto` | "
            "`lr_scaling: auto` | CPU path |",
            "|---|---|---|---|---|---|---|"]
    for info in OPTIMIZERS.values():
        defaults = info.defaults()
        fields = ", ".join(f"`{f}` ({defaults.get(a, '-')!r})" if f == a else f"`{f}` -> `{a}` ({defaults.get(a, '-')!r})"
                           for f, a in info.args.items())
        cls = f"{'torch.optim' if info.cls.__module__.startswith('torch') else 'largebatch.optim'}.{info.cls.__name__}"
        summary = info.summary.replace("|", "\\|")  # norms' bars inside a table cell
        rows.append(f"| `{info.name}` | `{cls}` | {summary} | {fields} | {info.schedule} | "
                    f"{info.lr_scaling} | {info.cpu_path} |")
    return "\n".join(rows)
