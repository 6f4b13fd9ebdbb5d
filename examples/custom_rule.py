"""A new layer-wise rule written outside the package, on the public extension API
(docs/optimizers.md, "Adding an optimizer").

``NormSGD``, a toy rule: SGD with momentum on a per-layer *normalized* gradient. For each
tensor (layer) ``w`` with gradient ``g``::

    d     = g + wd * w                                 # coupled L2, as every optimizer here
    trust = eta / (||g|| + wd * ||w|| + eps)           # adapted groups; 1 in excluded groups,
                                                       # and where the denominator is 0
    m     = momentum * m + trust * d                   # m starts at 0 (no lr inside)
    w     = w - lr * m

``||g|| + wd ||w||`` bounds ``||d||``, so each layer's normalized direction has a norm of at
most ``eta``: the step size is set by ``lr * eta`` alone, not by the gradient's scale. A
tensor whose gradient is not finite is left untouched, weights and momentum alike.

Importing this module registers the rule as ``normsgd``; running it hands its arguments to
the ``largebatch`` command line with the rule known::

    python examples/custom_rule.py train --optimizer normsgd --dataset digits --epochs 2 \
        --lr 0.1 --eta 1.0

(or ``import custom_rule`` in your own script before calling ``largebatch.cli.main``).
tests/test_extension.py checks this rule against an independent float64 formula.
"""

from __future__ import annotations

import sys

import torch

from largebatch.optim import (LayerwiseOptimizer, OptimizerInfo, check_nonneg, check_unit, register,
                              select)

__all__ = ["NormSGD", "INFO"]


class NormSGD(LayerwiseOptimizer):
    """SGD with momentum on a per-layer normalized gradient (the module docstring's rule).

    Args:
        params: parameters or param groups (see :func:`largebatch.optim.param_groups`).
        lr: learning rate (read from ``group["lr"]`` every step: schedulers work).
        momentum: heavy-ball momentum in [0, 1) (default 0.9).
        eta: norm of the normalized direction (default 1.0).
        weight_decay: coupled L2 (default 0).
        eps: added to the normalizing denominator (default 1e-8).
        adapt: normalize this group's gradients (default True; excluded groups get plain SGD).
        path: execution path (``None``, "per_tensor", "foreach", "compiled").

    State per tensor: ``momentum_buffer`` (``m``, without the learning rate).
    """

    # _update reads only (group, w, g, st, ...): the compiled path may fuse it
    compilable = True

    def __init__(self, params, lr: float, momentum: float = 0.9, eta: float = 1.0, weight_decay: float = 0.0,
                 eps: float = 1e-8, adapt: bool = True, path: str | None = None, *, maximize: bool = False,
                 foreach: bool | None = None):
        defaults = dict(lr=lr, momentum=momentum, eta=eta, weight_decay=weight_decay, eps=eps, adapt=adapt)
        super().__init__(params, defaults, path=path, maximize=maximize, foreach=foreach)

    @classmethod
    def _check_hparams(cls, group):
        # the engine checks lr, weight_decay and adapt; each error names the argument
        check_unit("momentum", group["momentum"])
        check_nonneg("eta", group["eta"])
        check_nonneg("eps", group["eps"])

    def _init_state(self, p, group):
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def _update(self, group, w, g, st, w_norm, g_norm, fin, P):
        # w, g, st[...]: tensors (per_tensor, compiled) or TensorLists (foreach); g is a private
        # copy with non-finite tensors zeroed; fin: per tensor, is the gradient finite.
        lr, mu, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
        if group["adapt"]:
            den = g_norm + wd * w_norm + group["eps"]
            trust = select(den > 0, eta / den, 1.0, g_norm)   # in g_norm's dtype: float64 stays exact
        else:
            trust = torch.ones_like(g_norm)
        d = g.add_(w, alpha=wd) if wd != 0 else g
        m = st["momentum_buffer"]
        # skipped tensors: m * 1 + d * 0, and w + m * 0
        m.mul_(P.coef(select(fin, mu, 1.0, g_norm))).addcmul_(d, P.coef(torch.where(fin, trust, 0.0)))
        lr_t = torch.ones_like(g_norm) * lr                   # lr may be a 0-d tensor
        w.addcmul_(m, P.coef(torch.where(fin, -lr_t, 0.0)))
        return trust, lr_t * trust


#: its registry entry: config fields -> constructor keywords (``largebatch train --optimizer normsgd``)
INFO = register(OptimizerInfo(
    "normsgd", NormSGD, {"momentum": "momentum", "eta": "eta", "eps": "eps"},
    "toy: momentum on the per-layer normalized gradient eta d / (||g|| + wd ||w|| + eps) (examples/custom_rule.py)",
    demo=(dict(lr=0.1, lr_scaling="none", warmup=0.0),)))


if __name__ == "__main__":
    from largebatch.cli import main

    sys.exit(main(sys.argv[1:]))
