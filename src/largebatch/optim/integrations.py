"""Hooks into other libraries' optimizer factories (docs/integrations.md).

:func:`timm_register` adds every largebatch optimizer of :data:`~largebatch.optim.OPTIMIZERS`
to timm's optimizer registry, so that ``timm.optim.create_optimizer_v2(model, "lblars", ...)``
builds it from timm's parameter groups (weight decay split, layer-wise LR decay).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

from torch import Tensor

__all__ = ["timm_register", "timm_groups"]


def timm_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Param groups built by timm's factory, with ``adapt`` decided as
    :func:`~largebatch.optim.param_groups` decides it (docs/algorithms.md, parameter groups).

    A group that already has an ``adapt`` key is kept as it is. In a group without one,
    ``adapt=False`` goes to

    * every tensor with ``ndim <= 1`` (biases, normalization scales and shifts: what
      ``param_groups`` excludes by default), and
    * every tensor of a *no-decay* group of a weight-decay split (``weight_decay == 0`` while
      another group has ``weight_decay > 0``): timm puts there the tensors of the model's
      ``no_weight_decay()`` list (ViT position embeddings, class tokens), which timm's own
      ``Lars`` / ``Lamb`` leave unadapted too;

    the other tensors get ``adapt=True``. A group holding both kinds is split in two groups
    with the same keys otherwise (``lr_scale`` of layer decay, ``weight_decay``); bare
    tensors become one group.
    """
    params = list(params)
    if not params:
        return []
    groups = [{"params": params}] if isinstance(params[0], Tensor) else [dict(g) for g in params]
    split = any(float(g.get("weight_decay", 0.0)) > 0 for g in groups)
    out: list[dict[str, Any]] = []
    for g in groups:
        ps = list(g["params"])
        if "adapt" in g:
            out.append({**g, "params": ps})
            continue
        no_decay_group = split and float(g.get("weight_decay", 0.0)) == 0
        adapted = [p for p in ps if not no_decay_group and p.ndim > 1]
        excluded = [p for p in ps if no_decay_group or p.ndim <= 1]
        if adapted:
            out.append({**g, "params": adapted, "adapt": True})
        if excluded:
            out.append({**g, "params": excluded, "adapt": False})
    return out


def _build(cls: type, params: Any, **kwargs: Any):
    return cls(timm_groups(params), **kwargs)


def timm_register(prefix: str = "lb", registry: Any = None) -> list[str]:
    """Register each largebatch optimizer in timm's optimizer registry as ``prefix + name``
    (``lblars``, ``lblamb``, ``lbtvlars``, ``lblalc``, ``lbclars``); returns the names.

    Then ``timm.optim.create_optimizer_v2(model, "lblars", lr=..., weight_decay=...,
    layer_decay=0.75)`` works: the class gets timm's groups through :func:`timm_groups`
    (biases, normalization layers and timm's no-decay tensors get ``adapt=False``), layer
    decay's ``lr_scale`` stays a group key (timm's schedulers multiply ``lr`` by it). Other
    keywords go to the constructor (``model=model`` for CLARS); timm adds ``momentum=0.9``
    to optimizers that take ``momentum``, as it does for its own. The prefix keeps timm's
    ``lars`` / ``lamb`` reachable, and must not contain ``_`` (timm reads ``a_b`` as
    wrapper ``a`` around optimizer ``b``). ``registry``: a ``timm.optim`` registry other than
    the default one. Calling it again changes nothing.
    """
    if "_" in prefix:
        raise ValueError(f"prefix: {prefix!r} contains '_', which timm reads as a wrapper separator "
                         "('lookahead_lblars'); use letters and digits only")
    try:
        from timm.optim import OptimInfo
        from timm.optim._optim_factory import default_registry  # what create_optimizer_v2 reads (timm >= 1.0.12)
    except ImportError:
        raise ImportError("timm_register() needs timm >= 1.0.12 (its optimizer registry): pip install -U timm") from None
    import inspect

    from .registry import OPTIMIZERS

    registry = default_registry if registry is None else registry
    names = []
    for info in OPTIMIZERS.values():
        if not info.layerwise:
            continue
        sig = inspect.signature(info.cls.__init__).parameters
        name = f"{prefix}{info.name}".lower()
        try:
            old = registry.get_optimizer_info(name).opt_class
        except ValueError:
            old = None
        names.append(name)
        if isinstance(old, functools.partial) and old.func is _build and old.args == (info.cls,):
            continue  # registered by an earlier call
        registry.register(OptimInfo(
            name=name, opt_class=functools.partial(_build, info.cls),
            description=f"largebatch {info.cls.__name__}: {info.summary}",
            has_eps="eps" in sig, has_momentum="momentum" in sig, has_betas="betas" in sig))
    return names
