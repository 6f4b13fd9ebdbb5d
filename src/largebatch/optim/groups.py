"""Parameter groups: which tensor gets the layer-wise rule and weight decay (docs/algorithms.md).

By default every tensor with ``ndim <= 1`` (biases, normalization scales and shifts) is
*excluded*: it goes to a group with ``adapt=False, weight_decay=0`` and gets the plain base
update. ``exclude`` adds more exclusions by name glob, module type or predicate.
``describe_groups`` (and ``largebatch groups``) prints what happens to each tensor.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Union

from torch import nn

__all__ = ["param_groups", "describe_groups", "split_parameters"]

Rule = Union[str, type, Callable[[str, nn.Parameter, nn.Module], bool]]


def _as_rules(exclude: Rule | Iterable[Rule] | None) -> list[Rule]:
    if exclude is None:
        return []
    if isinstance(exclude, (str, type)) or callable(exclude):
        return [exclude]
    return list(exclude)


def _matches(rule: Rule, name: str, p: nn.Parameter, module: nn.Module) -> bool:
    if isinstance(rule, str):
        return fnmatch.fnmatchcase(name, rule)
    if isinstance(rule, type):
        if not issubclass(rule, nn.Module):
            raise TypeError(f"exclude: a type must be an nn.Module subclass, got {rule!r}")
        return isinstance(module, rule)
    if callable(rule):
        return bool(rule(name, p, module))
    raise TypeError(f"exclude: expected a name glob (str), an nn.Module type or a predicate "
                    f"(name, param, module) -> bool, got {rule!r}")


def split_parameters(model: nn.Module, exclude: Rule | Iterable[Rule] | None = None,
                     exclude_1d: bool = True) -> list[tuple[str, nn.Parameter, bool]]:
    """``[(name, param, excluded), ...]`` for every trainable parameter, each once."""
    rules = _as_rules(exclude)
    out, seen = [], set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            excluded = (exclude_1d and p.ndim <= 1) or any(_matches(r, name, p, module) for r in rules)
            out.append((name, p, excluded))
    return out


def param_groups(model: nn.Module, weight_decay: float = 0.0, exclude: Rule | Iterable[Rule] | None = None,
                 exclude_1d: bool = True, **group_options: Any) -> list[dict[str, Any]]:
    """Build optimizer param groups for ``model``.

    Returns up to two groups: adapted tensors (``adapt=True, weight_decay=weight_decay``) and
    excluded tensors (``adapt=False, weight_decay=0``). ``exclude`` is a name glob
    (``"*.bias"``), an ``nn.Module`` subclass (``nn.LayerNorm``), a predicate
    ``(name, param, module) -> bool``, or a list of these. ``exclude_1d=False`` keeps 1-D
    tensors adapted. ``group_options`` are added to both groups (e.g. ``lr=...``).
    Each group carries ``name`` ("adapted" / "excluded").
    """
    adapted, excluded = [], []
    for _, p, ex in split_parameters(model, exclude, exclude_1d):
        (excluded if ex else adapted).append(p)
    groups = []
    if adapted:
        groups.append({"params": adapted, "name": "adapted", "adapt": True, "weight_decay": weight_decay, **group_options})
    if excluded:
        groups.append({"params": excluded, "name": "excluded", "adapt": False, "weight_decay": 0.0, **group_options})
    return groups


def describe_groups(model: nn.Module, groups: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
    """A table of each parameter's name, shape, group, adapt flag and weight decay.

    ``groups`` are the param groups (or an optimizer's ``param_groups``); by default those of
    ``param_groups(model, **kwargs)``. Parameters in no group are listed as "not optimized".
    """
    if groups is None:
        groups = param_groups(model, **kwargs)
    where = {}
    for i, g in enumerate(groups):
        for p in g["params"]:
            where[id(p)] = (g.get("name", str(i)), g.get("adapt", True), g.get("weight_decay", 0.0))
    rows = [("parameter", "shape", "group", "adapt", "weight_decay")]
    for name, p in model.named_parameters():
        grp, adapt, wd = where.get(id(p), ("not optimized", "-", "-"))
        rows.append((name, "x".join(map(str, p.shape)) or "scalar", str(grp), str(adapt), str(wd)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_ad = sum(p.numel() for g in groups if g.get("adapt", True) for p in g["params"])
    n_all = sum(p.numel() for g in groups for p in g["params"])
    lines.append(f"{n_ad:,} of {n_all:,} optimized elements are adapted (layer-wise rule)")
    return "\n".join(lines)
