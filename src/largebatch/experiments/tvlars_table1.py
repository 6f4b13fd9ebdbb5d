"""``largebatch reproduce-tvlars-table1``: the former name of ``largebatch reproduce tvlars-table1 --scale paper``
(Table 1's grid and numbers live in ``largebatch.experiments.artifacts.tvlars``). Its filters are kept:
``--datasets``, ``--optimizers``, ``--batch-sizes``, ``--problems`` (default ``clf``) select the cells,
as ``--only`` patterns over the run names."""

from __future__ import annotations

import argparse
import sys

from . import reproduce
from .artifacts.tvlars import LRS, OPTIMIZERS
from .engine import UserError

FILTERS = {"datasets": ("cifar10", "tinyimagenet"), "optimizers": OPTIMIZERS, "batch_sizes": tuple(map(str, LRS)),
           "problems": ("clf", "ssl")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    reproduce.add_arguments(parser, artifact="tvlars-table1", scale="paper")
    for name, allowed in FILTERS.items():
        default = "clf" if name == "problems" else ",".join(allowed)
        parser.add_argument("--" + name.replace("_", "-"), default=default, help=f"subset of {','.join(allowed)}")


def _split(name: str, value: str) -> list[str]:
    items, allowed = [x for x in value.split(",") if x], FILTERS[name]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UserError(f"--{name.replace('_', '-')}: invalid choice {', '.join(bad) or repr(value)}; expected a "
                        f"comma-separated subset of {','.join(allowed)}")
    return items


def run(args: argparse.Namespace) -> int:
    try:
        sel = {k: _split(k, getattr(args, k)) for k in FILTERS}
    except UserError as e:
        print(f"largebatch reproduce-tvlars-table1: {e}", file=sys.stderr)
        return 2
    if args.only is None:
        args.only = ",".join(f"{'bt-' if p == 'ssl' else ''}{d}-{o}-b{b}-lr*" for p in sel["problems"]
                             for d in sel["datasets"] for o in sel["optimizers"] for b in sel["batch_sizes"])
    return reproduce.run(args)
