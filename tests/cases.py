"""The optimizer table of the test suite: one row per optimizer, shared by the reference,
behaviour and fast-path tests. Adding an optimizer adds one row here (and its formula in
``reference.py``); ``test_optim_reference.VARIANTS`` adds further configurations of the same
rules. CLARS needs a model and per-sample statistics: ``test_clars.py`` covers it."""

from largebatch.optim import LALC, LAMB, LARS, TVLARS

#: name -> (class, reference rule in reference.Reference, constructor keywords incl. lr)
OPTIMIZERS = {
    "LARS": (LARS, "lars", dict(lr=0.5, momentum=0.9, eta=0.02)),
    "TVLARS": (TVLARS, "tvlars", dict(lr=2.0, eta=0.02, lam=0.05, delay=1)),
    "LAMB": (LAMB, "lamb", dict(lr=0.05, max_trust=5.0)),
    "LALC": (LALC, "lalc", dict(lr=0.5, momentum=0.9, eta=0.02)),
}


def make(name, params, **overrides):
    """The optimizer of row ``name`` over ``params``."""
    cls, _, kw = OPTIMIZERS[name]
    return cls(params, **{**kw, **overrides})
