"""Layer-wise adaptive optimizers on one shared engine (see ``_engine.py``).

Each optimizer is a ``torch.optim.Optimizer``: param groups, ``state_dict``, LR schedulers,
``GradScaler`` and closures work as with ``torch.optim.SGD``. Exact rules:
docs/algorithms.md. ``registry.OPTIMIZERS`` holds one entry per optimizer (what the
training harness, the demo and the docs know about it; ``register`` adds your own).

The extension API (docs/optimizers.md, "Adding an optimizer"; a worked example outside the
package: examples/custom_rule.py): subclass :class:`LayerwiseOptimizer`; build per-tensor
scalars with :func:`select` and :func:`zero_norm_safe_ratio`; validate hyper-parameters with
:func:`check`, :func:`check_nonneg`, :func:`check_unit` (they raise
:class:`HyperparameterError`, which names the argument); :func:`state_dtype` and
:func:`compute_dtype` say which dtype the state and ``_update`` use; ``TensorList`` is what
``_update`` receives on the ``foreach`` path; ``PATHS`` lists the execution paths.
"""

from .._validation import HyperparameterError, check, check_nonneg, check_unit
from ._engine import (PATHS, SUPPORTED_DTYPES, LayerwiseOptimizer, compute_dtype, select, state_dtype,
                      zero_norm_safe_ratio)
from ._paths import TensorList
from .clars import CLARS
from .groups import describe_groups, param_groups, split_parameters
from .integrations import timm_groups, timm_register  # docs/integrations.md
from .lalc import LALC
from .lamb import LAMB
from .lars import LARS
from .registry import OPTIMIZERS, OptimizerInfo, register
from .tvlars import TVLARS

#: the optimizer classes of this package's registry entries (registry.py) beside the five above
#: (the papers' variants ``PaperLAMB``, ``PaperLARS``; a new module's class): exported with their
#: entry, no edit here
_REGISTERED = {info.cls.__name__: info.cls for info in OPTIMIZERS.values()
               if info.cls.__module__.startswith(__name__ + ".")}
globals().update(_REGISTERED)

__all__ = [
    # the optimizers (registry entries of this package)
    "LARS", "LAMB", "TVLARS", "LALC", "CLARS",
    *sorted(set(_REGISTERED) - {"LARS", "LAMB", "TVLARS", "LALC", "CLARS"}),
    # parameter groups
    "param_groups", "describe_groups", "split_parameters",
    # the registry
    "OPTIMIZERS", "OptimizerInfo", "register",
    # integrations (docs/integrations.md)
    "timm_register", "timm_groups",
    # the extension API (docs/optimizers.md, "Adding an optimizer")
    "LayerwiseOptimizer", "select", "zero_norm_safe_ratio", "compute_dtype", "state_dtype",
    "SUPPORTED_DTYPES", "PATHS", "TensorList", "HyperparameterError", "check", "check_nonneg", "check_unit",
]
