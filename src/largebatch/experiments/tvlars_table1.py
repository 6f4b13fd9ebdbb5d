"""``largebatch reproduce-tvlars-table1``: the classification half of TVLARS's Table 1.

Seed 001 Table 1 / Appendix A (seed 000 Table I): CIFAR-10 with ResNet-18 and Tiny ImageNet
with ResNet-34, global batch 512 ... 16384, three target learning rates per batch (the
square-root rule's neighbourhood: {1,2,3}, {2,3,4}, {5,6,7}, {8,9,10}, {10,12,15},
{15,17,19}), for LARS and LAMB with warm-up (linear for 20 epochs, then cosine; Appendix A)
and TVLARS (no schedule, ``lambda = 1e-4``), weight decay 5e-4, momentum 0.9.

Where the papers are silent or disagree, this grid chooses (and any of it can be overridden
with ``--set FIELD=VALUE``):

* init ``kaiming_uniform`` (seed 001 Appendix A; seed 000's Table I caption says Xavier
  uniform);
* the ImageNet stem of torchvision's ResNets (the authors' code; ``--set stem=cifar`` for the
  3x3 stem);
* 100 epochs (not stated; the papers' curves run to about 100);
* TVLARS ``delay = 10`` epochs (the value the paper states for its ablation) and
  ``gamma_min = 0``; ``eta`` is each optimizer's default;
* cosine to 0 after warm-up (``lr_min`` is not given).

The Barlow Twins half of Table 1 (1000 SSL + 100 linear epochs) is not part of this grid.

``--run`` trains every missing run in turn (resuming a run that has a checkpoint but has not
finished); ``--collect`` prints the measured final test accuracy next to the paper's.
Without either, the command prints the ``largebatch train`` command lines of the grid.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any

DATASETS = {"cifar10": "resnet18", "tinyimagenet": "resnet34"}
OPTIMIZERS = ("lars", "lamb", "tvlars")
#: target learning rates per global batch size (Table 1's "Learning rate" rows)
LRS = {512: (1, 2, 3), 1024: (2, 3, 4), 2048: (5, 6, 7), 4096: (8, 9, 10), 8192: (10, 12, 15), 16384: (15, 17, 19)}

#: Table 1, classification (final test accuracy %), [dataset][optimizer][batch] -> one value per LR in LRS[batch]
PAPER = {
    "cifar10": {
        "lars": {512: [74.64, 77.49, 79.64], 1024: [74.7, 78.83, 80.52], 2048: [75.22, 79.49, 81.1],
                 4096: [75.63, 80.96, 82.49], 8192: [77.59, 81.75, 82.5], 16384: [79.46, 80.62, 38.57]},
        "lamb": {512: [57.88, 64.76, 78.39], 1024: [52.06, 57.83, 79.98], 2048: [43.12, 47.88, 81.43],
                 4096: [22.32, 37.52, 81.53], 8192: [16.14, 19.85, 81.78], 16384: [14.82, 11.97, 77.16]},
        "tvlars": {512: [78.92, 81.42, 81.56], 1024: [81.84, 82.58, 82.54], 2048: [81.52, 82.22, 82.44],
                   4096: [80.9, 80.96, 81.16], 8192: [81.16, 82.42, 82.74], 16384: [79.2, 80.42, 80.42]},
    },
    "tinyimagenet": {
        "lars": {512: [33.72, 36.6, 38.92], 1024: [33.8, 36.84, 38.52], 2048: [34.48, 38.04, 40.44],
                 4096: [34.24, 38.56, 40.4], 8192: [34.36, 38.12, 42.0], 16384: [35.6, 39.72, 41.72]},
        "lamb": {512: [20.28, 41.4, 37.52], 1024: [16.88, 31.84, 37.76], 2048: [12.6, 18.56, 39.92],
                 4096: [5.24, 10.76, 39.0], 8192: [1.12, 2.48, 39.2], 16384: [0.84, 0.92, 37.28]},
        "tvlars": {512: [37.56, 39.28, 39.64], 1024: [39.6, 39.16, 39.4], 2048: [39.56, 39.56, 41.68],
                   4096: [38.28, 39.96, 41.64], 8192: [36.48, 39.2, 42.32], 16384: [38.56, 40.32, 41.08]},
    },
}

COMMON = dict(init="kaiming_uniform", stem="imagenet", epochs=100, weight_decay=5e-4, momentum=0.9)
PER_OPTIMIZER = {
    "lars": dict(schedule="cosine", warmup_epochs=20.0),
    "lamb": dict(schedule="cosine", warmup_epochs=20.0),
    "tvlars": dict(schedule="none", tvlars_lam=1e-4, tvlars_delay_epochs=10.0),
}


def run_name(dataset: str, optimizer: str, batch: int, lr: float) -> str:
    return f"{dataset}-{optimizer}-b{batch}-lr{lr:g}"


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its Table 1 coordinates and its ``TrainConfig`` overrides."""

    dataset: str
    optimizer: str
    batch: int
    lr: int
    cfg: dict[str, Any]

    @property
    def paper(self) -> float:
        return PAPER[self.dataset][self.optimizer][self.batch][LRS[self.batch].index(self.lr)]


def grid(datasets, optimizers, batch_sizes, out: str, overrides: dict[str, Any]) -> list[Cell]:
    """The runs of Table 1 for these datasets, optimizers and batch sizes."""
    cells = []
    for ds in datasets:
        for b in batch_sizes:
            for opt in optimizers:
                for lr in LRS[b]:
                    cfg = dict(dataset=ds, model=DATASETS[ds], optimizer=opt, lr=float(lr), batch_size=b,
                               **COMMON, **PER_OPTIMIZER[opt])
                    cfg.update(overrides)
                    cfg["out_dir"] = os.path.join(out, run_name(ds, opt, b, lr))
                    cells.append(Cell(ds, opt, b, lr, cfg))
    return cells


def command_line(cfg: dict[str, Any]) -> str:
    args = ["largebatch", "train"]
    for k, v in cfg.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return shlex.join(args)


def _final(out_dir: str, epochs: int) -> tuple[float | None, bool]:
    """(final test accuracy in %, finished) of a run directory."""
    from largebatch.train.rundir import read_table

    for ext in (".csv", ".jsonl"):
        path = os.path.join(out_dir, "metrics" + ext)
        if os.path.exists(path):
            rows = read_table(path)
            if rows:
                return 100.0 * float(rows[-1]["test_acc"]), int(rows[-1]["epoch"]) >= epochs
    return None, False


def collect(cells: list[Cell]) -> str:
    """Markdown: one table per dataset, a row per batch size and optimizer, a cell per LR:
    measured final test accuracy (the paper's in parentheses)."""
    out = []
    for ds in dict.fromkeys(c.dataset for c in cells):
        out += [f"### {ds} ({DATASETS[ds]}): final test accuracy %, measured (paper Table 1)", "",
                "| batch | optimizer | lr: acc (paper) | | |", "|---:|---|---|---|---|"]
        rows: dict[tuple[int, str], list[str]] = {}
        for c in (c for c in cells if c.dataset == ds):
            acc, done = _final(c.cfg["out_dir"], c.cfg["epochs"])
            got = "-" if acc is None else f"{acc:.2f}" + ("" if done else "*")
            rows.setdefault((c.batch, c.optimizer), []).append(f"{c.lr}: {got} ({c.paper:.2f})")
        out += [f"| {b} | {opt} | " + " | ".join(v) + " |" for (b, opt), v in rows.items()]
        out.append("")
    out.append("`*`: run not finished; `-`: no result yet.")
    return "\n".join(out)


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs; values are YAML scalars (``1``, ``1e-4``, ``false``, ``none``, text)."""
    import yaml

    from largebatch.train.config import FIELD_NAMES, _coerce

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in FIELD_NAMES:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(FIELD_NAMES)}")
        out[key] = _coerce(key, yaml.safe_load(value) if value.lower() != "none" else None)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datasets", default="cifar10,tinyimagenet", help="subset of cifar10,tinyimagenet")
    parser.add_argument("--optimizers", default="lars,lamb,tvlars", help="subset of lars,lamb,tvlars")
    parser.add_argument("--batch-sizes", default=",".join(map(str, LRS)), help="subset of " + ",".join(map(str, LRS)))
    parser.add_argument("--out", default="runs/tvlars-table1", help="one run directory per cell under here")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a train config field for every run (e.g. epochs=200, data_dir=~/data)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--run", action="store_true", help="train the runs that are missing or unfinished")
    what.add_argument("--collect", action="store_true", help="print measured vs paper accuracy")


def _split(option: str, s: str, allowed, conv=str) -> list:
    try:
        items = [conv(x) for x in s.split(",") if x]
    except ValueError:
        items = []
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"{option}: invalid choice {', '.join(map(str, bad)) or repr(s)}; "
                         f"expected a comma-separated subset of {', '.join(map(str, allowed))}")
    return items


def run(args: argparse.Namespace) -> int:
    from largebatch.train.config import resolve

    cells = grid(_split("--datasets", args.datasets, DATASETS), _split("--optimizers", args.optimizers, OPTIMIZERS),
                 _split("--batch-sizes", args.batch_sizes, LRS, int), args.out, _parse_set(args.set))
    for c in cells:  # every run is a valid config before anything starts
        try:
            resolve(overrides=c.cfg)
        except ValueError as e:
            raise SystemExit(f"{os.path.basename(c.cfg['out_dir'])}: invalid configuration: {e}") from None
    if args.collect:
        print(collect(cells))
        return 0
    if not args.run:
        print("\n".join(command_line(c.cfg) for c in cells))
        print(f"# {len(cells)} runs; --run trains them, --collect tabulates them", file=sys.stderr)
        return 0
    from largebatch.train.loop import train

    for i, c in enumerate(cells, 1):
        _, done = _final(c.cfg["out_dir"], c.cfg["epochs"])
        if done:
            continue
        resume = os.path.exists(os.path.join(c.cfg["out_dir"], "checkpoint.pt"))
        print(f"[{i}/{len(cells)}] {os.path.basename(c.cfg['out_dir'])}{' (resuming)' if resume else ''}", flush=True)
        # --resume also starts a directory left by a run that stopped in its first epoch
        train(resolve(overrides={**c.cfg, "resume": os.path.isdir(c.cfg["out_dir"])}))
    print(collect(cells))
    return 0
