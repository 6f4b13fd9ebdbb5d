"""``largebatch linear-eval RUN_DIR``: a linear classifier on a run's frozen backbone, or on a
baseline's features (``largebatch.train.linear_eval``)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by largebatch pretrain (or train)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--random-init", action="store_true",
                       help="baseline: the same backbone at its initialization, untrained")
    which.add_argument("--raw-pixels", action="store_true", help="baseline: the classifier on the pixels")
    parser.add_argument("--epochs", type=int, default=100, help="classifier epochs (default: 100, the papers')")
    parser.add_argument("--lr", type=float, default=0.1, help="peak LR of SGD + cosine (default: 0.1)")
    parser.add_argument("--batch-size", type=int, default=256, help="classifier batch size (default: 256)")
    parser.add_argument("--weight-decay", type=float, default=1e-6, help="classifier weight decay (default: 1e-6)")
    parser.add_argument("--seed", type=int, default=0, help="classifier init and data order (default: 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--data-dir", default=None, help="dataset root (default: the run's)")


def run(args: argparse.Namespace) -> int:
    from largebatch.train.linear_eval import linear_eval
    from largebatch.train.rundir import RunDirError

    features = "random-init" if args.random_init else "raw-pixels" if args.raw_pixels else "pretrained"
    try:
        r = linear_eval(args.run_dir, features, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                        weight_decay=args.weight_decay, seed=args.seed, device=args.device, data_dir=args.data_dir,
                        log=lambda s: print(s, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        print(f"largebatch linear-eval: {e}", file=sys.stderr)
        return 2
    except RunDirError as e:  # the run's folder could not be written (read-only, full disk)
        print(f"largebatch linear-eval: {e}", file=sys.stderr)
        return 1
    print(f"linear-eval {features}: {r['dataset']} epoch {r['epoch']} features {r['feature_dim']}: "
          f"top-1 {100 * r['top1']:.2f}% ({args.run_dir}/linear-eval/{features}.json)")
    return 0
