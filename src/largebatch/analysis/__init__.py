"""Gradient-explosion analysis of BatchNorm + ReLU networks (LALC paper: Prop. 1, Thm. 1-2,
Cor. 1-2, Fig. 1, Fig. 3). See docs/explosion.md.

Modules: ``theory`` (closed forms and factors), ``architectures`` (test networks),
``explosion`` (per-block gradient variance via hooks), ``dynamics`` (Fig. 3 tracking),
``plots`` (figures). The runnable experiment, ``largebatch explosion``, is
``largebatch.experiments.explosion``.
"""

import importlib

# name -> module; imported on first access (PEP 562), so that the torch-free ``names`` module and
# the command line do not pay for torch and scipy
_EXPORTS = {**dict.fromkeys(("measure_architecture", "measure_gradients", "per_block_factor", "rates",
                             "record_blocks"), "explosion"),
            **dict.fromkeys(("THM1_FACTOR", "THM2_CORRECTED_FACTOR", "THM2_PAPER_FACTOR", "activation_factor",
                             "relu_gaussian_mean", "relu_gaussian_var"), "theory")}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
