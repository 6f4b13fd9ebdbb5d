"""``largebatch groups MODEL``: which parameter of a torchvision model gets which treatment
(``largebatch.optim.groups.describe_groups``)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="torchvision model builder name, e.g. resnet18, resnet50, vit_b_16")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay of the decayed group "
                        "(default: 5e-4)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="also exclude parameters whose name matches GLOB (repeatable)")
    parser.add_argument("--keep-1d", action="store_true", help="do not exclude 1-D tensors by default")
    parser.add_argument("--optimizer", default=None, metavar="NAME",
                        help="also say what this registered optimizer does with each group (`largebatch optimizers`)")


def run(args: argparse.Namespace) -> int:
    import torchvision

    from largebatch.optim.groups import describe_groups
    from largebatch.optim.registry import OPTIMIZERS

    info = None
    if args.optimizer is not None:
        info = OPTIMIZERS.get(args.optimizer)
        if info is None:
            print(f"largebatch groups: --optimizer: {args.optimizer!r} is not one of {', '.join(OPTIMIZERS)}",
                  file=sys.stderr)
            return 2
    builder = getattr(torchvision.models, args.model, None)
    if not callable(builder) or args.model.startswith("_"):
        print(f"largebatch groups: unknown model {args.model!r}: give a torchvision.models builder name such as "
              "resnet18", file=sys.stderr)
        return 2
    model = builder(weights=None)
    print(describe_groups(model, weight_decay=args.weight_decay, exclude=args.exclude or None,
                          exclude_1d=not args.keep_1d))
    if info is not None:
        if info.layerwise:
            print(f"{info.name}: adapted tensors get {info.summary}; excluded tensors get its base update at the "
                  "group's lr, without the layer-wise rule")
        else:
            print(f"{info.name}: {info.summary}; no layer-wise rule (adapt is ignored), weight decay as listed")
    return 0
