"""Exact per-sample gradient norms inside the ordinary backward pass (for CLARS; the CLARS paper).

    tracker = PerSampleGradNorms(model, loss_reduction="mean")
    loss = F.cross_entropy(model(x), y)       # mean over the batch
    loss.backward()                          # hooks accumulate sum_i ||grad_w f_i|| per tensor
    stats = tracker.collect()                # all-reduced over DDP ranks, accumulators reset
    n_k = stats.mean_norm()                  # CLARS's n_k (docs/algorithms.md, "CLARS")
    M_k = stats.variance_factor()            # CLARS paper Fig. 2, uses each tensor's .grad

Per-layer rules and their costs: :mod:`.rules`; hooks, scaling, accumulation and DDP:
:mod:`.tracker`. With BatchNorm in training mode, samples interact through the batch
statistics; the per-sample term of sample ``i`` is then its additive contribution to the
batch gradient (the terms sum exactly to the batch gradient).
"""

from .rules import UnsupportedLayerError
from .stats import PerSampleStats
from .tracker import PerSampleGradNorms
from .variance import gradient_variance

__all__ = ["PerSampleGradNorms", "PerSampleStats", "UnsupportedLayerError", "gradient_variance"]
