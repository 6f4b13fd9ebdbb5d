"""largebatch: layer-wise adaptive optimizers and large-batch training for PyTorch.

Subpackages:
    largebatch.optim      LARS, LAMB, TVLARS, LALC, CLARS on one shared engine; param_groups
    largebatch.schedules  warm-up + cosine, polynomial decay, TVLARS phi(t), LR scaling rules
"""

# the package's one version number (pyproject.toml reads it; `largebatch --version` prints it)
__version__ = "0.1.0"
