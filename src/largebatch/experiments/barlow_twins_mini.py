"""``largebatch barlow-twins-mini``: does Barlow Twins pre-training learn anything, with LARS, LAMB
and TVLARS at one large batch? The CPU-sized edition of TVLARS Table 1's SSL half (docs/ssl.md).

For each optimizer: ``largebatch pretrain`` of a BN-MLP backbone (default 2 x 1024, projector
1024-1024) on Fashion-MNIST at batch 4096, then ``largebatch linear-eval`` (100 epochs, SGD +
cosine) and the kNN monitor (k = 200, cosine similarity) of its frozen features, next to two
baselines every SSL number needs: the same backbone at its random initialization (the point
pre-training starts from) and the raw pixels. One table, written to ``OUT/results.md``.

Learning rates are set by rule, not tuned: LARS and TVLARS the reference's ``0.2 x B/256`` (eta
0.001; LARS with 10% warm-up then cosine, TVLARS with ``lam = 1e-5``, no schedule), LAMB the
same per-layer relative step (``lr = 0.2 x eta x B/256``, warm-up then cosine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

OPTIMIZERS = ("lars", "lamb", "tvlars")


def recipe(optimizer: str, dataset: str, epochs: int, batch: int, width: int, depth: int, projector: str,
           out: str, seed: int, knn_every: int) -> dict:
    """The ``PretrainConfig`` fields of one optimizer's run."""
    base = dict(dataset=dataset, model="mlp", mlp_width=width, mlp_depth=depth, projector=projector,
                batch_size=batch, epochs=epochs, optimizer=optimizer, lr_scaling="linear", base_batch_size=256,
                weight_decay=1.5e-6, seed=seed, knn_every=knn_every, stats_every=10,
                out_dir=os.path.join(out, optimizer), progress=False)
    warm = dict(schedule="cosine", warmup_epochs=max(1.0, round(0.1 * epochs, 1)))
    per = {"lars": dict(lr=0.2, **warm), "lamb": dict(lr=0.2 * 1e-3, **warm),
           "tvlars": dict(lr=0.2, schedule="none", tvlars_lam=1e-5)}
    return {**base, **per[optimizer]}


def knn_of(features: str, run_dir: str, k: int = 200) -> float:
    """kNN top-1 of the baselines' features (the pre-trained runs log theirs every epoch)."""
    import torch

    from largebatch import ssl
    from largebatch.train import data as data_mod
    from largebatch.train.linear_eval import build_backbone, run_config

    cfg = run_config(run_dir)
    ds = data_mod.load(cfg.dataset, cfg.data_dir)
    if features == "raw-pixels":
        tr = data_mod.normalize(ds.train_x, ds.mean, ds.std).flatten(1)
        te = data_mod.normalize(ds.test_x, ds.mean, ds.std).flatten(1)
    else:
        bb = build_backbone(cfg, ds.shape, None)
        tr = ssl.extract_features(bb, ds.train_x, ds.mean, ds.std, 1024)
        te = ssl.extract_features(bb, ds.test_x, ds.mean, ds.std, 1024)
    with torch.no_grad():
        return ssl.knn_accuracy(tr, ds.train_y, te, ds.test_y, ds.num_classes, k)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) or digits")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="subset of lars,lamb,tvlars")
    parser.add_argument("--epochs", type=int, default=15, help="pre-training epochs (default: 15)")
    parser.add_argument("--batch-size", type=int, default=4096, help="global batch (default: 4096)")
    parser.add_argument("--width", type=int, default=1024, help="MLP backbone width (default: 1024)")
    parser.add_argument("--depth", type=int, default=2, help="MLP backbone hidden layers (default: 2)")
    parser.add_argument("--projector", default="1024-1024", help="projector widths (default: 1024-1024)")
    parser.add_argument("--linear-epochs", type=int, default=100, help="linear-eval epochs (default: 100)")
    parser.add_argument("--knn-every", type=int, default=5, help="kNN monitor every N epochs (default: 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="runs/barlow-twins-mini", help="one run directory per optimizer")


def run(args: argparse.Namespace) -> int:
    from largebatch.train.config import resolve
    from largebatch.train.linear_eval import linear_eval
    from largebatch.train.pretrain import PretrainConfig, pretrain
    from largebatch.train.rundir import read_table

    opts = [o for o in args.optimizers.split(",") if o]
    if not opts or any(o not in OPTIMIZERS for o in opts):
        print(f"largebatch barlow-twins-mini: --optimizers: expected a subset of {','.join(OPTIMIZERS)}",
              file=sys.stderr)
        return 2
    try:
        cfgs = {o: resolve(None, recipe(o, args.dataset, args.epochs, args.batch_size, args.width, args.depth,
                                        args.projector, args.out_dir, args.seed, args.knn_every), PretrainConfig)
                for o in opts}
    except ValueError as e:
        print(f"largebatch barlow-twins-mini: {e}", file=sys.stderr)
        return 2
    rows = []
    for o, cfg in cfgs.items():
        done = os.path.exists(os.path.join(cfg.out_dir, "linear-eval", "pretrained.json"))
        t0 = time.perf_counter()
        if not done:
            cfg.resume = os.path.isdir(cfg.out_dir)
            res = pretrain(cfg)
            if res.status != "finished":
                print(f"largebatch barlow-twins-mini: {o} did not finish ({res.status})", file=sys.stderr)
                return 3
        minutes = (time.perf_counter() - t0) / 60
        m = read_table(os.path.join(cfg.out_dir, "metrics.csv"))
        lin = linear_eval(cfg.out_dir, "pretrained", epochs=args.linear_epochs)
        rows.append((f"{o} pre-trained", lin["top1"], m[-1]["knn_acc"], m[-1]["train_loss"],
                     sum(r["epoch_seconds"] for r in m) / 60, sum(r["images_per_s"] for r in m) / len(m)))
        print(f"{o}: linear {100 * lin['top1']:.2f}% kNN {100 * m[-1]['knn_acc']:.2f}% ({minutes:.1f} min)", flush=True)
    first = next(iter(cfgs.values())).out_dir
    for base in ("random-init", "raw-pixels"):
        lin = linear_eval(first, base, epochs=args.linear_epochs)
        rows.append((base, lin["top1"], knn_of(base, first), None, None, None))
    lines = [f"Barlow Twins mini edition: {args.dataset}, BN-MLP {args.depth} x {args.width}, projector "
             f"{args.projector}, batch {args.batch_size}, {args.epochs} pre-training epochs, linear-eval "
             f"{args.linear_epochs} epochs, kNN k = 200, seed {args.seed}", "",
             "| features | linear-eval top-1 | kNN top-1 | final BT loss | pre-training min | images/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, lin, knn, loss, mins, ips in rows:
        lines.append(f"| {name} | {100 * lin:.2f}% | {100 * knn:.2f}% | " +
                     (f"{loss:.1f} | {mins:.1f} | {ips:.0f} |" if loss is not None else "- | - | - |"))
    text = "\n".join(lines)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0
