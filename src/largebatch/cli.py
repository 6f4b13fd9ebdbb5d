"""`largebatch` command line: one entry point, one module per sub-command.

Each sub-command lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``. Importing such a module must not import torch, torchvision, scipy,
scikit-learn or matplotlib (``tests/test_cli.py`` checks it): building the parser then takes
a fraction of a second, and a sub-command's heavy imports are paid inside its ``run`` only.
Sub-commands whose implementation imports torch at module level have their command line in
``largebatch.commands``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("largebatch.experiments.demo", "train a small model on offline data with every optimizer and print a table"),
    "groups": ("largebatch.commands.groups", "print which parameter gets which optimizer treatment"),
    "optimizers": ("largebatch.commands.optimizers", "list the registered optimizers: flags, defaults, auto schedule"),
    "train": ("largebatch.train.cli", "train a classifier (config file and/or flags)"),
    "pretrain": ("largebatch.commands.pretrain", "Barlow Twins self-supervised pre-training (config file and/or flags)"),
    "linear-eval": ("largebatch.commands.linear_eval", "linear evaluation of a run's frozen backbone (or a baseline)"),
    "plot": ("largebatch.train.plot", "plot one or more run directories"),
    "noise-scale": ("largebatch.experiments.noise_scale",
                    "the gradient noise scale (critical batch size) at initialisation and over a short run"),
    "explosion": ("largebatch.experiments.explosion",
                  "gradient-explosion analysis of normalized networks (the LALC paper's theory)"),
    "barlow-twins-mini": ("largebatch.experiments.barlow_twins_mini",
                          "Barlow Twins on CPU: LARS, LAMB, TVLARS vs random-init and raw-pixel baselines"),
    "reproduce": ("largebatch.experiments.reproduce",
                  "every table and figure of the papers at paper, mini or smoke scale: list, run, collect"),
    "reproduce-tvlars-table1": ("largebatch.experiments.tvlars_table1",
                                "alias of `largebatch reproduce tvlars-table1 --scale paper`"),
}


def build_parser() -> argparse.ArgumentParser:
    from largebatch import __version__

    parser = argparse.ArgumentParser(
        prog="largebatch", description="Layer-wise adaptive optimizers (LARS, LAMB, TVLARS, LALC, CLARS) and "
        "large-batch training: train, plot, reproduce the papers. `largebatch COMMAND --help` for each command.")
    parser.add_argument("--version", action="version", version=f"largebatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def format_warning(message, category, filename, lineno, line=None) -> str:
    """The command line's format of the package's own warnings (``largebatch: ...``, e.g. a
    missing C++ compiler): one line, without the library source line that raised it (nothing a
    user can act on) and without the multi-line text of a compiler error quoted inside it. Other
    warnings keep Python's format."""
    text = str(message)
    if not text.startswith("largebatch"):
        return _python_format(message, category, filename, lineno, line)
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}") + "\n"


_python_format = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print(f"\nlargebatch {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `largebatch optimizers | head`: the reader left, nothing is wrong
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
