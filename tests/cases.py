"""The optimizer table of the test suite: one row per optimizer, shared by the reference,
behaviour, fast-path and generic tests. Adding an optimizer adds one row here (and its formula
in ``reference.py``); ``test_optim_reference.VARIANTS`` adds further configurations of the same
rules. CLARS needs a model and per-sample statistics: ``GENERIC`` holds it with the others for
the generic contract tests (``test_optim_generic.py``); ``test_clars.py`` covers its rule."""

from largebatch.optim import CLARS, LALC, LAMB, LARS, TVLARS

#: name -> (class, reference rule in reference.Reference, constructor keywords incl. lr)
OPTIMIZERS = {
    "LARS": (LARS, "lars", dict(lr=0.5, momentum=0.9, eta=0.02)),
    "TVLARS": (TVLARS, "tvlars", dict(lr=2.0, eta=0.02, lam=0.05, delay=1)),
    "LAMB": (LAMB, "lamb", dict(lr=0.05, max_trust=5.0)),
    "LALC": (LALC, "lalc", dict(lr=0.5, momentum=0.9, eta=0.02)),
}

#: the generic contract table (torch's ``optim_db`` in spirit): every optimizer with the
#: configurations its generic tests run (keyword overrides of its ``OPTIMIZERS`` row) and the
#: execution paths they run on ("compiled" is exercised by a subset: each compile costs seconds)
GENERIC = {
    "LARS": dict(configs=[{}, dict(nesterov=True, weight_decay=1e-2), dict(momentum=0.0, trust_clip=True)]),
    "TVLARS": dict(configs=[{}, dict(weight_decay=1e-2, momentum=0.0)]),
    "LAMB": dict(configs=[{}, dict(weight_decay=1e-2, max_trust=None, betas=(0.5, 0.9))]),
    "LALC": dict(configs=[{}, dict(nesterov=True, weight_decay=1e-2), dict(momentum=0.0)]),
    "CLARS": dict(configs=[{}, dict(momentum=0.0, weight_decay=1e-2)], needs_model=True),
}
GENERIC_PATHS = ("per_tensor", "foreach", "native")
CLARS_KW = dict(lr=0.5, momentum=0.9, eta=0.02)


def make(name, params, **overrides):
    """The optimizer of row ``name`` over ``params``."""
    cls, _, kw = OPTIMIZERS[name]
    return cls(params, **{**kw, **overrides})


def make_generic(name, params, model=None, **overrides):
    """The optimizer of ``GENERIC`` row ``name`` (CLARS attached to ``model``)."""
    if name == "CLARS":
        return CLARS(params, **{**CLARS_KW, **overrides}, model=model)
    return make(name, params, **overrides)
