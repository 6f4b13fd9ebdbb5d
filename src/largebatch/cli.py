"""`largebatch` command line: one entry point, one module per sub-command.

Each sub-command lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported lazily so that ``largebatch --help`` is fast
and a sub-command's heavy imports are paid only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("largebatch.experiments.demo", "train a small model on offline data with every optimizer and print a table"),
    "groups": ("largebatch.optim.groups", "print which parameter gets which optimizer treatment"),
    "optimizers": ("largebatch.optim.registry", "list the registered optimizers: flags, defaults, auto schedule"),
    "train": ("largebatch.train.cli", "train a classifier (config file and/or flags)"),
    "pretrain": ("largebatch.train.pretrain", "Barlow Twins self-supervised pre-training (config file and/or flags)"),
    "linear-eval": ("largebatch.train.linear_eval", "linear evaluation of a run's frozen backbone (or a baseline)"),
    "plot": ("largebatch.train.plot", "plot one or more run directories"),
    "noise-scale": ("largebatch.experiments.noise_scale",
                    "the gradient noise scale (critical batch size) at initialisation and over a short run"),
    "explosion": ("largebatch.experiments.explosion", "gradient-explosion analysis of normalized networks (seed 003)"),
    "barlow-twins-mini": ("largebatch.experiments.barlow_twins_mini",
                          "Barlow Twins on CPU: LARS, LAMB, TVLARS vs random-init and raw-pixel baselines"),
    "reproduce": ("largebatch.experiments.reproduce",
                  "every table and figure of the papers at paper, mini or smoke scale: list, run, collect"),
    "reproduce-tvlars-table1": ("largebatch.experiments.tvlars_table1",
                                "alias of `largebatch reproduce tvlars-table1 --scale paper`"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="largebatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
