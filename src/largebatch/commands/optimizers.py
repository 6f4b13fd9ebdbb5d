"""``largebatch optimizers``: the optimizer registry (``largebatch.optim.registry``) as text or as
the Markdown table of docs/optimizers.md."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true", help="the Markdown table of docs/optimizers.md")


def train_defaults(info) -> dict[str, object]:
    """``{config field: value}`` that ``largebatch train --optimizer NAME`` passes by default: the
    flag's default, or the constructor's where the flag defaults to ``None`` (leave it to the class)."""
    from largebatch.train.config import TrainConfig

    flag = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    cls = info.defaults()
    return {f: flag.get(f) if flag.get(f) is not None else cls.get(a, "-") for f, a in info.args.items()}


def _flag(field: str, value, class_default) -> str:
    from largebatch.train.cli import _shown

    text = f"--{field.replace('_', '-')} {_shown(value)}"
    return text if class_default in ("-", value) else f"{text} (class default {_shown(class_default)})"


def run(args: argparse.Namespace) -> int:
    from largebatch.optim import _native, registry

    if args.markdown:
        print(registry.markdown_table())
        return 0
    print("flags: the defaults of `largebatch train --optimizer NAME` (and the class's own where they differ)\n")
    for info in registry.OPTIMIZERS.values():
        cls = info.defaults()
        values = train_defaults(info)
        print(f"{info.name:<8} {info.summary}")
        print(f"{'':8} flags: " + ", ".join(_flag(f, values[f], cls.get(a, "-")) for f, a in info.args.items()))
        print(f"{'':8} schedule auto = {info.schedule}, lr_scaling auto = {info.lr_scaling}, "
              f"CPU path: {info.cpu_path}")
    state = ("built: " + _native.library_path() if os.path.exists(_native.library_path())
             else "not built yet (built at the first step of a model of 2^20 parameters or more, ~4 s)")
    print(f"\nnative path (C++ kernels): {state}" if _native.available()
          else "\nnative path: off (LARGEBATCH_NO_NATIVE / LARGEBATCH_NO_COMPILE, or its build failed)")
    return 0
