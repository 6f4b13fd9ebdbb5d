"""``largebatch demo``: every optimizer on one offline dataset at a batch size large for it.

Trains a BatchNorm MLP (3 x 256, ReLU) once per optimizer with the same seed, data order and
epoch budget, prints a results table (final and best test accuracy, final test loss, seconds)
and writes the plots of ``largebatch plot`` (curves, LR vs step, per-layer LWN/LGN/LNR) into
``--out-dir``. Data: scikit-learn's digits by default (embedded; about a minute on 2 cores, training ~12 s);
``--dataset fashion-mnist`` uses Fashion-MNIST from ``/usr/share/datasets/fashion-mnist``
(Debian's ``dataset-fashion-mnist``) or ``--data-dir`` (longer). Neither needs the network.

The recipes are the ``demo`` field of each optimizer's registry entry
(``largebatch.optim.registry``; a registered optimizer of your own is trained too). They follow
the papers' shapes at toy scale: SGD with linear LR scaling and warm-up (Goyal et al.), LARS
with and without warm-up (You et al.), LAMB with warm-up, TVLARS with a constant target LR and
its own ``phi(t)`` decay instead of warm-up, sized to the run (TVLARS paper), LALC without warm-up
(LALC paper), CLARS (CLARS paper).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

def recipes() -> dict[str, tuple[str, dict]]:
    """``{label: (optimizer name, recipe)}`` from the registry, in its order; the label is the
    optimizer's name, with ``+warmup`` for a recipe with warm-up."""
    from largebatch.optim import registry

    out = {}
    for info in registry.OPTIMIZERS.values():
        for r in info.demo:
            out[info.name + ("+warmup" if r.get("warmup", 0) > 0 else "")] = (info.name, dict(r))
    return out


DATASET_DEFAULTS = {  # epochs, global batch
    "digits": (30, 512),
    "fashion-mnist": (10, 4096),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits", choices=("digits", "fashion-mnist", "auto"),
                        help="digits (default: about a minute on 2 cores), fashion-mnist (longer: 60k images), "
                             "auto: fashion-mnist when found locally, else digits")
    parser.add_argument("--data-dir", default=None, help="where to look for fashion-mnist first")
    parser.add_argument("--out-dir", default="runs/demo", help="output folder (one sub-folder per optimizer)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: 30 digits / 10 fashion-mnist)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch (default: 512 digits, i.e. 1/3 of the training set; 4096 fashion-mnist)")
    parser.add_argument("--optimizers", default=None, metavar="NAMES",
                        help="comma-separated subset of the recipes (default: all): the optimizers of `largebatch "
                             "optimizers`, NAME+warmup for a recipe with warm-up (an unknown name lists them)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of every run (default: 0)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the runs of an earlier demo in --out-dir (only their run files are deleted)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="print the table only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 for digits, whose tiny matrix products only "
                             "lose to threading overhead; torch's default otherwise)")


def _pick_dataset(name: str, data_dir: str | None) -> str:
    if name != "auto":
        return name
    from largebatch.train.data import find_fashion_mnist

    return "fashion-mnist" if find_fashion_mnist(data_dir) else "digits"


def recipe_config(name: str, dataset: str, epochs: int, batch: int, spe: int, out_dir: str, seed: int,
                  device: str, overwrite: bool = False):
    """The TrainConfig of recipe ``name`` (peak LRs referenced to batch 256 by the scaling rule;
    a callable recipe value is evaluated as ``value(epochs, steps_per_epoch)``)."""
    from largebatch.train.config import TrainConfig

    optimizer, r = recipes()[name]
    warmup = r.pop("warmup", 0.0)
    kw = dict(lr_scaling="auto", schedule="auto", weight_decay=5e-4, base_batch_size=256)
    kw.update({k: v(epochs, spe) if callable(v) else v for k, v in r.items()})
    return TrainConfig(dataset=dataset, model="mlp", mlp_depth=3, mlp_width=256, epochs=epochs, batch_size=batch,
                       out_dir=os.path.join(out_dir, name), seed=seed, device=device, checkpoint=False,
                       stats_every=1, progress=False, optimizer=optimizer, warmup_epochs=round(warmup * epochs, 3),
                       overwrite=overwrite, **kw)


def _earlier_demo(out_dir: str, cfgs) -> list[str]:
    """The recipe folders holding a run, and ``results.md``, already in ``out_dir``."""
    from largebatch.train.rundir import RunDir

    held = [c.out_dir for c in cfgs if RunDir(c.out_dir, c.metrics_format, True).run_files()]
    results = os.path.join(out_dir, "results.md")
    return held + ([results] if os.path.exists(results) else [])


def run(args: argparse.Namespace) -> int:
    from largebatch.train import data as data_mod
    from largebatch.train.factory import steps_per_epoch
    from largebatch.train.loop import train
    from largebatch.train.plot import plot_runs

    dataset = _pick_dataset(args.dataset, args.data_dir)
    threads = args.threads or (1 if dataset == "digits" else None)
    if threads is not None:
        if threads < 1:
            print("largebatch demo: --threads: must be >= 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(threads)
    d_epochs, d_batch = DATASET_DEFAULTS[dataset]
    epochs = args.epochs or d_epochs
    batch = args.batch_size or d_batch
    known = recipes()
    names = list(known) if not args.optimizers else [s.strip() for s in args.optimizers.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"largebatch demo: --optimizers: unknown {', '.join(unknown)} (known: {', '.join(known)})",
              file=sys.stderr)
        return 2
    try:
        ds = data_mod.load(dataset, args.data_dir)
    except FileNotFoundError as e:
        print(f"largebatch demo: {e}", file=sys.stderr)
        return 2
    try:
        spe = steps_per_epoch(ds.train_x.shape[0], batch, 1)
    except ValueError as e:
        print(f"largebatch demo: {e}", file=sys.stderr)
        return 2
    total = epochs * spe
    print(f"demo: {dataset} ({ds.train_x.shape[0]} train / {ds.test_x.shape[0]} test), BN-MLP 3x256, "
          f"global batch {batch} ({spe} steps/epoch), {epochs} epochs = {total} steps, seed {args.seed}")
    cfgs = {name: recipe_config(name, dataset, epochs, batch, spe, args.out_dir, args.seed, args.device,
                                overwrite=args.overwrite) for name in names}
    if not args.overwrite:
        held = _earlier_demo(args.out_dir, cfgs.values())
        if held:
            print(f"largebatch demo: {held[0]}{f' (and {len(held) - 1} more)' if len(held) > 1 else ''} holds the "
                  f"output of an earlier demo; pass --overwrite to replace it, or choose another --out-dir",
                  file=sys.stderr)
            return 2
    results = []
    dirs = []
    for name, cfg in cfgs.items():
        t0 = time.perf_counter()
        res = train(cfg, dataset=ds, log=lambda s: None)
        dt = time.perf_counter() - t0
        f = res.final
        best = max((r["test_acc"] for r in res.history), default=float("nan"))
        results.append((name, cfg, res.status, f.get("test_acc", float("nan")), best, f.get("test_loss", float("nan")),
                        f.get("train_loss", float("nan")), dt))
        dirs.append(cfg.out_dir)
        print(f"  {name:<12} test acc {100 * f.get('test_acc', float('nan')):6.2f}%  ({dt:.1f} s)"
              + ("" if res.status == "finished" else f"  [{res.status}]"), flush=True)
    table = _table(results)
    print()
    print(table)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.md"), "w") as fh:
        fh.write(f"{dataset}, BN-MLP 3x256, global batch {batch}, {epochs} epochs ({total} steps), seed {args.seed}\n\n")
        fh.write(table + "\n")
    if args.plots:
        made = plot_runs(dirs, args.out_dir, names)
        print("\nplots: " + ", ".join(made))
    return 0


def _table(results) -> str:
    lines = ["| optimizer | peak LR | warm-up epochs | final test acc | best test acc | final test loss | final train loss | time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    from largebatch.train.factory import effective_lr

    for name, cfg, status, acc, best, loss, tloss, dt in results:
        mark = "" if status == "finished" else f" ({status})"
        lines.append(f"| {name}{mark} | {effective_lr(cfg):.4g} | {cfg.warmup_epochs:g} | {100 * acc:.2f}% | "
                     f"{100 * best:.2f}% | {loss:.4f} | {tloss:.4f} | {dt:.1f} |")
    return "\n".join(lines)
