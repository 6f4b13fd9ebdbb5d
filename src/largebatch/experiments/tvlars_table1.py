"""``largebatch reproduce-tvlars-table1``: TVLARS's Table 1, classification and Barlow Twins.

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

The Barlow Twins half (``--problems ssl``; seed 001 Appendix A): ``largebatch pretrain`` for
1000 epochs (projector 2048-2048-4096, ``lambd`` 0.0051, the same optimizers, LRs, warm-up,
init and weight decay; TVLARS ``lambda = 1e-5``), then ``largebatch linear-eval`` (100 epochs,
SGD + cosine) of the frozen backbone; the cell's number is its top-1.

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

#: Table 1, Barlow Twins (linear-eval top-1 %), same layout as PAPER
PAPER_SSL = {
    "cifar10": {
        "lars": {512: [51.31, 58.89, 60.76], 1024: [61.13, 67.03, 68.98], 2048: [52.42, 57.35, 52.42],
                 4096: [52.77, 55.74, 55.98], 8192: [50.29, 52.78, 9.65], 16384: [48.27, 48.26, 49.05]},
        "lamb": {512: [10.01, 12.01, 67.31], 1024: [12.03, 15.03, 69.49], 2048: [10.01, 15.64, 60.08],
                 4096: [48.93, 50.19, 53.38], 8192: [42.22, 45.26, 52.39], 16384: [42.26, 44.02, 49.65]},
        "tvlars": {512: [69.96, 69.72, 70.54], 1024: [67.38, 69.8, 71.13], 2048: [62.61, 61.71, 61.05],
                   4096: [57.96, 58.28, 60.46], 8192: [54.14, 53.56, 52.24], 16384: [48.16, 49.84, 50.15]},
    },
    "tinyimagenet": {
        "lars": {512: [18.32, 19.52, 21.12], 1024: [19.96, 19.36, 20.38], 2048: [19.92, 20.33, 19.98],
                 4096: [19.45, 20.2, 20.25], 8192: [19.69, 20.79, 21.62], 16384: [20.97, 21.54, 22.42]},
        "lamb": {512: [13.46, 17.75, 27.37], 1024: [16.44, 16.7, 24.53], 2048: [18.67, 21.98, 23.43],
                 4096: [13.78, 15.66, 21.45], 8192: [19.6, 23.44, 23.55], 16384: [20.34, 23.58, 23.78]},
        "tvlars": {512: [29.02, 31.01, 31.44], 1024: [28.98, 27.46, 28.32], 2048: [26.15, 23.43, 27.08],
                   4096: [24.29, 24.29, 24.92], 8192: [23.41, 23.47, 24.26], 16384: [25.82, 24.95, 25.91]},
    },
}
PROBLEMS = ("clf", "ssl")
#: the SSL cells' pre-training (Appendix A) and linear evaluation
SSL = dict(epochs=1000, projector="2048-2048-4096", lambd=0.0051, lr_scaling="none")
SSL_TVLARS_LAM = 1e-5
LINEAR_EPOCHS = 100

COMMON = dict(init="kaiming_uniform", stem="imagenet", epochs=100, weight_decay=5e-4, momentum=0.9)
PER_OPTIMIZER = {
    "lars": dict(schedule="cosine", warmup_epochs=20.0),
    "lamb": dict(schedule="cosine", warmup_epochs=20.0),
    "tvlars": dict(schedule="none", tvlars_lam=1e-4, tvlars_delay_epochs=10.0),
}


def run_name(dataset: str, optimizer: str, batch: int, lr: float, problem: str = "clf") -> str:
    return f"{'bt-' if problem == 'ssl' else ''}{dataset}-{optimizer}-b{batch}-lr{lr:g}"


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its Table 1 coordinates and its ``TrainConfig`` overrides."""

    dataset: str
    optimizer: str
    batch: int
    lr: int
    cfg: dict[str, Any]
    problem: str = "clf"  # "clf": largebatch train; "ssl": largebatch pretrain + linear-eval

    @property
    def paper(self) -> float:
        table = PAPER_SSL if self.problem == "ssl" else PAPER
        return table[self.dataset][self.optimizer][self.batch][LRS[self.batch].index(self.lr)]


def grid(datasets, optimizers, batch_sizes, out: str, overrides: dict[str, Any],
         problems=("clf",)) -> list[Cell]:
    """The runs of Table 1 for these datasets, optimizers, batch sizes and problems. ``overrides``
    apply to every run that has the field (pre-training fields only to the SSL cells)."""
    from dataclasses import fields

    from largebatch.train.config import FIELD_NAMES

    cells = []
    for problem in problems:
        for ds in datasets:
            for b in batch_sizes:
                for opt in optimizers:
                    for lr in LRS[b]:
                        cfg = dict(dataset=ds, model=DATASETS[ds], optimizer=opt, lr=float(lr), batch_size=b,
                                   **COMMON, **PER_OPTIMIZER[opt])
                        if problem == "ssl":
                            cfg.update(SSL)
                            if opt == "tvlars":
                                cfg["tvlars_lam"] = SSL_TVLARS_LAM
                        cfg.update({k: v for k, v in overrides.items() if problem == "ssl" or k in FIELD_NAMES})
                        cfg["out_dir"] = os.path.join(out, run_name(ds, opt, b, lr, problem))
                        cells.append(Cell(ds, opt, b, lr, cfg, problem))
    return cells


def command_line(cell: Cell) -> str:
    args = ["largebatch", "pretrain" if cell.problem == "ssl" else "train"]
    for k, v in cell.cfg.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    line = shlex.join(args)
    if cell.problem == "ssl":
        line += " && " + shlex.join(["largebatch", "linear-eval", cell.cfg["out_dir"], "--epochs", str(LINEAR_EPOCHS)])
    return line


def _final(out_dir: str, epochs: int, problem: str = "clf") -> tuple[float | None, bool]:
    """(final test accuracy in %, finished) of a run directory (SSL: its linear-eval top-1)."""
    from largebatch.train.rundir import read_table

    if problem == "ssl":
        path = os.path.join(out_dir, "linear-eval", "pretrained.json")
        if not os.path.exists(path):
            return None, False
        import json

        with open(path) as f:
            r = json.load(f)
        return 100.0 * r["top1"], r["epoch"] >= epochs

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
    what = {"clf": "classification, final test accuracy", "ssl": "Barlow Twins, linear-eval top-1"}
    for problem, ds in dict.fromkeys((c.problem, c.dataset) for c in cells):
        out += [f"### {ds} ({DATASETS[ds]}), {what[problem]} %, measured (paper Table 1)", "",
                "| batch | optimizer | lr: acc (paper) | | |", "|---:|---|---|---|---|"]
        rows: dict[tuple[int, str], list[str]] = {}
        for c in (c for c in cells if c.dataset == ds and c.problem == problem):
            acc, done = _final(c.cfg["out_dir"], c.cfg["epochs"], c.problem)
            got = "-" if acc is None else f"{acc:.2f}" + ("" if done else "*")
            rows.setdefault((c.batch, c.optimizer), []).append(f"{c.lr}: {got} ({c.paper:.2f})")
        out += [f"| {b} | {opt} | " + " | ".join(v) + " |" for (b, opt), v in rows.items()]
        out.append("")
    out.append("`*`: run not finished; `-`: no result yet.")
    return "\n".join(out)


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs; values are YAML scalars (``1``, ``1e-4``, ``false``, ``none``, text)."""
    import yaml

    from dataclasses import fields

    from largebatch.train.config import _coerce
    from largebatch.train.pretrain import PretrainConfig

    names = [f.name for f in fields(PretrainConfig)]
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(names)}")
        out[key] = _coerce(key, yaml.safe_load(value) if value.lower() != "none" else None, PretrainConfig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datasets", default="cifar10,tinyimagenet", help="subset of cifar10,tinyimagenet")
    parser.add_argument("--optimizers", default="lars,lamb,tvlars", help="subset of lars,lamb,tvlars")
    parser.add_argument("--batch-sizes", default=",".join(map(str, LRS)), help="subset of " + ",".join(map(str, LRS)))
    parser.add_argument("--problems", default="clf", help="subset of clf,ssl (ssl: Barlow Twins + linear-eval)")
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
    from largebatch.train.config import TrainConfig, resolve
    from largebatch.train.pretrain import PretrainConfig

    cells = grid(_split("--datasets", args.datasets, DATASETS), _split("--optimizers", args.optimizers, OPTIMIZERS),
                 _split("--batch-sizes", args.batch_sizes, LRS, int), args.out, _parse_set(args.set),
                 _split("--problems", args.problems, PROBLEMS))
    config_class = {"clf": TrainConfig, "ssl": PretrainConfig}
    for c in cells:  # every run is a valid config before anything starts
        try:
            resolve(overrides=c.cfg, cls=config_class[c.problem])
        except ValueError as e:
            raise SystemExit(f"{os.path.basename(c.cfg['out_dir'])}: invalid configuration: {e}") from None
    if args.collect:
        print(collect(cells))
        return 0
    if not args.run:
        print("\n".join(command_line(c) for c in cells))
        print(f"# {len(cells)} runs; --run trains them, --collect tabulates them", file=sys.stderr)
        return 0
    from largebatch.train.linear_eval import linear_eval
    from largebatch.train.loop import Classification, train
    from largebatch.train.pretrain import BarlowTwinsTask

    for i, c in enumerate(cells, 1):
        _, done = _final(c.cfg["out_dir"], c.cfg["epochs"], c.problem)
        if done:
            continue
        resume = os.path.exists(os.path.join(c.cfg["out_dir"], "checkpoint.pt"))
        print(f"[{i}/{len(cells)}] {os.path.basename(c.cfg['out_dir'])}{' (resuming)' if resume else ''}", flush=True)
        # --resume also starts a directory left by a run that stopped in its first epoch
        cfg = resolve(overrides={**c.cfg, "resume": os.path.isdir(c.cfg["out_dir"])}, cls=config_class[c.problem])
        task = BarlowTwinsTask() if c.problem == "ssl" else Classification()
        res = train(cfg, task=task)
        if c.problem == "ssl" and res.status == "finished":
            linear_eval(c.cfg["out_dir"], epochs=LINEAR_EPOCHS)
    print(collect(cells))
    return 0
