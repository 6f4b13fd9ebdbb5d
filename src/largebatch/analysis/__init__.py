"""Gradient-explosion analysis of BatchNorm + ReLU networks (seed 003: Prop. 1, Thm. 1-2,
Cor. 1-2, Fig. 1, Fig. 3). See docs/explosion.md.

Modules: ``theory`` (closed forms and factors), ``architectures`` (test networks),
``explosion`` (per-block gradient variance via hooks), ``dynamics`` (Fig. 3 tracking),
``plots`` (figures). The runnable experiment, ``largebatch explosion``, is
``largebatch.experiments.explosion``.
"""

from .explosion import measure_architecture, measure_gradients, per_block_factor, rates, record_blocks
from .theory import (THM1_FACTOR, THM2_CORRECTED_FACTOR, THM2_PAPER_FACTOR, activation_factor,
                     relu_gaussian_mean, relu_gaussian_var)

__all__ = ["measure_architecture", "measure_gradients", "per_block_factor", "rates", "record_blocks",
           "THM1_FACTOR", "THM2_CORRECTED_FACTOR", "THM2_PAPER_FACTOR", "activation_factor",
           "relu_gaussian_mean", "relu_gaussian_var"]
