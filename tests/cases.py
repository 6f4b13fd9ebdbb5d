"""The optimizer table of the test suite, in the spirit of torch's ``OptimizerInfo`` /
``optim_db``: one :class:`OptimInfo` row per optimizer in :data:`TABLE` holds its input
configurations, the execution paths it runs on and its known failures. Every test that runs
over the optimizers reads it: the reference (``test_optim_reference``), native
(``test_native``), precision (``test_precision``), behaviour, fast-path, generic contract
(``test_optim_generic``), mixed-precision (``test_amp``), sharded (``test_sharded``) and
real-client (``test_integrations``) modules; ``test_registry`` checks that every registered
package optimizer has a row. Rule-specific tests (``test_clars``, LALC's clipping, ...) stay
in their modules.

Adding an optimizer to the package (docs/optimizers.md, "Adding an optimizer"): its module,
its registry entry (``optim/registry.py``), its float64 formula in ``reference.py`` (from its
section of docs/algorithms.md) and one row in :data:`ROWS`, before the per-sample rows; the
minimal row is ``OptimInfo(MyOpt, "myopt", dict(lr=...))``: the fields below default to the
base configuration everywhere and to the paths the class declares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from largebatch.optim import CLARS, LALC, LAMB, LARS, PATHS, TVLARS, LayerwiseOptimizer, _native
from largebatch.persample import PerSampleStats

#: the paths that run without compiling (each compile costs seconds on 2 cores)
EAGER_PATHS = ("per_tensor", "foreach")


@dataclass(frozen=True)
class Known:
    """A known failure: ``test`` (a test function's name) with the parameter values ``params``
    (besides the row's ``name``) is marked xfail and not run (``conftest.py``)."""

    test: str
    reason: str
    params: dict[str, Any]


@dataclass(frozen=True)
class OptimInfo:
    """One optimizer of the test suite. Configurations are constructor keywords (``lr``
    included) unless said otherwise.

    Attributes:
        cls: the optimizer class; the row's name is ``cls.__name__``.
        rule: its float64 formula, a ``reference.Reference`` rule ("lars"); ``None`` for a rule
            whose reference needs the model (CLARS: ``test_clars.reference_clars``).
        kw: the base configuration, read by every test of the table.
        reference: further configurations compared with the float64 reference on the eager
            paths, 10 steps (``test_optim_reference``), and on the native path in float64
            (``test_native``); the first one (else ``kw``) also runs the zero-norm test.
        float64: further configurations of ``test_precision``'s float64 test on every path
            (where float32 scalars would hurt most).
        native: the configurations of ``test_native``'s float32, GradScaler, thread-count and
            resume tests (default: ``kw``).
        generic: keyword overrides of ``kw``, each a configuration of the generic contract
            tests (``test_optim_generic``; default: ``kw`` itself).
        client: the configuration of the real-client tests (``test_integrations``: DCP, ZeRO,
            Lightning, accelerate, timm; default: ``kw``).
        paths: the execution paths it runs on; default: what the class declares
            (``per_tensor``, ``foreach``, ``compiled`` if ``compilable``, ``native`` if it has a
            C++ rule).
        spot_check: one of the rows the costly checks run on (a compile per configuration,
            extreme magnitudes in the kernels): LARS for the SGD family, LAMB for Adam's.
        persample: it needs per-sample statistics: :func:`make` attaches the model's tracker,
            or without a model a stand-in handing it fixed ``n_k`` (:class:`FixedNorms`).
        lr_in_velocity: its velocity holds ``lr`` (``v = mu v + lr trust d``), so with ``lr = 0``
            it keeps coasting (LARS, TVLARS); the others step by ``lr_k`` times a direction.
        fuzz: ``fuzz(pick, seed, mu) -> configuration``, the random configurations of
            ``test_native``'s float64 fuzz test (``pick`` draws one of a list; ``mu`` is the
            drawn momentum, 0 or 0.9); ``None``: not fuzzed.
        known: its known failures (:class:`Known`).
    """

    cls: type
    rule: str | None
    kw: dict[str, Any]
    reference: tuple[dict[str, Any], ...] = ()
    float64: tuple[dict[str, Any], ...] = ()
    native: tuple[dict[str, Any], ...] = ()
    generic: tuple[dict[str, Any], ...] = ({},)
    client: dict[str, Any] | None = None
    paths: tuple[str, ...] | None = None
    spot_check: bool = False
    persample: bool = False
    lr_in_velocity: bool = False
    fuzz: Callable[..., dict[str, Any]] | None = None
    known: tuple[Known, ...] = ()

    def __post_init__(self):
        if self.paths is None:
            declared = {"per_tensor", "foreach", *(["compiled"] if self.cls.is_compilable() else []),
                        *(["native"] if _native.rule_of(self.cls) else [])}
            object.__setattr__(self, "paths", tuple(p for p in PATHS if p in declared))
        if not self.native and "native" in self.paths:
            object.__setattr__(self, "native", (self.kw,))
        if self.client is None:
            object.__setattr__(self, "client", self.kw)

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def derived_norms(self) -> bool:
        """Its ``_update`` takes the norm of a tensor it derives (LAMB's ``r``, LALC's ``h``)."""
        return self.cls._n_norm_operands.__func__ is not LayerwiseOptimizer._n_norm_operands.__func__


# ---------------------------------------------------------------------------- random configurations
def _fuzz_lars(pick, seed, mu):
    return dict(lr=0.7, momentum=mu, eta=pick([1e-3, 0.05]), nesterov=mu > 0 and bool(seed % 2),
                trust_clip=pick([False, True]), eps=pick([0.0, 1e-4]))


def _fuzz_tvlars(pick, seed, mu):
    return dict(lr=1.3, momentum=mu, eta=0.02, lam=pick([0.0, 0.3]), delay=pick([0, 2]))


def _fuzz_lalc(pick, seed, mu):
    nest = mu > 0 and bool(seed % 2)
    return dict(lr=0.4, momentum=mu, eta=pick([0.01, 0.5]), nesterov=nest,
                dampening=0.0 if nest or mu == 0 else pick([0.0, 0.4]))


def _fuzz_lamb(pick, seed, mu):   # no momentum: mu unused
    return dict(lr=0.03, betas=pick([(0.9, 0.999), (0.0, 0.5)]), max_trust=pick([None, 0.7]), eps=pick([1e-6, 1e-3]))


# ---------------------------------------------------------------------------- the table
ROWS = [
    OptimInfo(
        LARS, "lars", dict(lr=0.5, momentum=0.9, eta=0.02),
        reference=(dict(lr=1.0, momentum=0.9, eta=0.02),
                   dict(lr=1.0, momentum=0.9, eta=0.02, nesterov=True),
                   dict(lr=1.0, momentum=0.0, eta=0.02),
                   dict(lr=1.0, momentum=0.8, eta=0.5, trust_clip=True, eps=1e-3)),
        float64=(dict(lr=0.5, momentum=0.9, eta=0.02, nesterov=True),),
        native=(dict(lr=1.0, eta=0.02, nesterov=True, trust_clip=True, eps=1e-3),),
        generic=({}, dict(nesterov=True, weight_decay=1e-2), dict(momentum=0.0, trust_clip=True)),
        spot_check=True, lr_in_velocity=True, fuzz=_fuzz_lars),
    OptimInfo(
        TVLARS, "tvlars", dict(lr=2.0, eta=0.02, lam=0.05, delay=1),
        reference=(dict(lr=1.0, momentum=0.9, eta=0.02, lam=0.2, alpha=0.5, delay=3, gamma_min=0.05),
                   dict(lr=1.0, momentum=0.0, eta=0.02, lam=0.1)),
        native=(dict(lr=1.0, eta=0.02, lam=0.2, delay=2),),
        generic=({}, dict(weight_decay=1e-2, momentum=0.0)),
        lr_in_velocity=True, fuzz=_fuzz_tvlars),
    OptimInfo(
        LALC, "lalc", dict(lr=0.5, momentum=0.9, eta=0.02),
        reference=(dict(lr=0.5, momentum=0.9, eta=0.05),
                   dict(lr=0.5, momentum=0.9, eta=0.05, nesterov=True),
                   dict(lr=0.5, momentum=0.9, eta=0.05, dampening=0.3),
                   dict(lr=0.5, momentum=0.0, eta=0.05)),
        float64=(dict(lr=0.5, momentum=0.9, eta=0.02, dampening=0.3),),
        native=(dict(lr=0.5, eta=0.05, dampening=0.2), dict(lr=0.5, eta=0.05, nesterov=True)),
        generic=({}, dict(nesterov=True, weight_decay=1e-2), dict(momentum=0.0)),
        fuzz=_fuzz_lalc),
    OptimInfo(
        LAMB, "lamb", dict(lr=0.05, max_trust=5.0),
        reference=(dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6),
                   dict(lr=0.05, betas=(0.8, 0.9), eps=1e-4, max_trust=1.0)),
        float64=(dict(lr=0.05, betas=(0.9, 0.99999)),),   # 1 - b2 in float32 is 1.4e-3 off
        native=(dict(lr=0.05, betas=(0.8, 0.99), max_trust=2.0),),
        generic=({}, dict(weight_decay=1e-2, max_trust=None, betas=(0.5, 0.9))), client=dict(lr=0.05),
        spot_check=True, fuzz=_fuzz_lamb,
        known=(Known("test_norms_neither_overflow_nor_underflow",
                     "LAMB's v = b2 v + (1 - b2) g^2 is element-wise: inductor forms g * g first, which "
                     "overflows float32 beyond 1.8e19 (eager and native scale by 1 - b2 first); not a norm",
                     dict(path="compiled", dtype=torch.float32, scale=1e20)),)),
    OptimInfo(
        CLARS, None, dict(lr=0.5, momentum=0.9, eta=0.02),
        generic=({}, dict(momentum=0.0, weight_decay=1e-2)), client=dict(lr=0.5, eta=0.05),
        persample=True, lr_in_velocity=True),
]

#: name -> row, in the order of the tests' ids
TABLE: dict[str, OptimInfo] = {row.name: row for row in ROWS}
assert len(TABLE) == len(ROWS), "two rows of one class"


def names(*, path: str | None = None, rule: bool = False, model_free: bool = False,
          where: Callable[[OptimInfo], bool] | None = None) -> list[str]:
    """The rows that run on ``path``, have a reference rule, need no per-sample statistics,
    and satisfy ``where``."""
    return [n for n, r in TABLE.items()
            if (path is None or path in r.paths) and (not rule or r.rule is not None)
            and (not model_free or not r.persample) and (where is None or where(r))]


def with_paths(names_: list[str], paths=PATHS) -> list[tuple[str, str]]:
    """``(name, path)`` for each row in ``names_`` and each of ``paths`` it runs on."""
    return [(n, p) for n in names_ for p in paths if p in TABLE[n].paths]


def reference_configs(name: str) -> list[dict[str, Any]]:
    """Its base configuration and the further ones compared with the float64 reference."""
    row = TABLE[name]
    return [row.kw, *row.reference]


#: ``(name, index, configuration)`` of every configuration compared with the float64 reference
REFERENCE_CASES = [(n, j, kw) for n in names(rule=True) for j, kw in enumerate(reference_configs(n))]
REFERENCE_IDS = [f"{n}-{j}" for n, j, _ in REFERENCE_CASES]


# ---------------------------------------------------------------------------- construction
class FixedNorms:
    """A stand-in for :class:`largebatch.persample.PerSampleGradNorms` handing a per-sample
    rule (CLARS) a given ``n_k`` per tensor (no model: e.g. complex parameters, which the
    per-sample tracker refuses)."""

    def __init__(self, params, n_k):
        self.params, self.n_k = list(params), n_k

    def collect(self):
        n = len(self.params)
        one = torch.ones(n, dtype=torch.float64)
        return PerSampleStats(params=self.params, names=[f"p{i}" for i in range(n)],
                              sum_norm=torch.tensor(self.n_k, dtype=torch.float64), sum_sq=one,
                              count=one, grad_weight=one, local_count=[1] * n)

    def reset(self):
        pass

    def remove(self):
        pass


def make(name, params, model=None, *, n_k=None, **overrides):
    """The optimizer of row ``name`` over ``params``, its base configuration updated by
    ``overrides``. A per-sample row (CLARS) is attached to ``model``; without one, to a
    :class:`FixedNorms` handing its adapted tensors ``n_k`` (one per tensor); other rows ignore
    both."""
    row = TABLE[name]
    kw = {**row.kw, **overrides}
    if not row.persample:
        return row.cls(params, **kw)
    if model is not None:
        return row.cls(params, **kw, model=model)
    if n_k is None:
        raise TypeError(f"{name} needs model= or n_k= (its per-sample statistics)")
    opt = row.cls(params, **kw)
    opt.persample = FixedNorms([p for g in opt.param_groups if g["adapt"] for p in g["params"]], n_k)
    return opt
