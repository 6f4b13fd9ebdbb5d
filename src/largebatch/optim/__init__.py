"""Layer-wise adaptive optimizers on one shared engine (see ``_engine.py``).

Each optimizer is a ``torch.optim.Optimizer``: param groups, ``state_dict``, LR schedulers,
``GradScaler`` and closures work as with ``torch.optim.SGD``. Exact rules:
docs/algorithms.md. ``registry.OPTIMIZERS`` holds one entry per optimizer (what the
training harness, the demo and the docs know about it; ``register`` adds your own).
"""

from .clars import CLARS
from .groups import describe_groups, param_groups, split_parameters
from .integrations import timm_groups, timm_register  # docs/integrations.md
from .lalc import LALC
from .lamb import LAMB
from .lars import LARS
from .registry import OPTIMIZERS, OptimizerInfo, register
from .tvlars import TVLARS

__all__ = ["LARS", "LAMB", "TVLARS", "LALC", "CLARS", "param_groups", "describe_groups", "split_parameters",
           "OPTIMIZERS", "OptimizerInfo", "register"]
