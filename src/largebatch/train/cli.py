"""``largebatch train``: flags are generated from :class:`TrainConfig`; ``--config FILE`` gives a
YAML/TOML/JSON file whose values the flags override. Also runs under
``torchrun --nproc-per-node N -m largebatch train ...`` (DDP)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .config import TrainConfig, resolve


def _parse_betas(s: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.999, got {s!r}") from None
    return a, b


def _type_of(annotation: str):
    t = annotation.replace(" ", "")
    if t.startswith("bool"):
        return bool
    if t.startswith("tuple"):
        return _parse_betas
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    return str


def _none_or(conv):
    def f(s: str):
        return None if s.lower() in ("none", "null", "") else conv(s)
    f.__name__ = getattr(conv, "__name__", "value")
    return f


def _shown(value) -> str:
    """A default as it is typed on the command line (``true``, ``0.9,0.999``, ``none``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def add_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """``--config FILE`` and one flag per field of ``cls`` (``TrainConfig`` or a subclass)."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML/TOML/JSON config file (flags override its values)")
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if "(default" not in help_:  # a help text that explains its default keeps its own words
            help_ += f" (default: {_shown(f.default)})"
        conv = _type_of(str(f.type))
        if conv is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_)
        else:
            if "None" in str(f.type):
                conv = _none_or(conv)
            parser.add_argument(flag, dest=f.name, type=conv, default=argparse.SUPPRESS, help=help_,
                                metavar=f.name.upper())


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig):
    names = {f.name for f in fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return resolve(getattr(args, "config", None), overrides, cls)


def run(args: argparse.Namespace) -> int:
    from .loop import train

    return execute(args, "train", TrainConfig, train)


class Terminated(BaseException):
    """SIGTERM (``kill``, a scheduler's time limit, torchrun stopping its workers), raised where the
    process is, as Ctrl-C raises ``KeyboardInterrupt``: checkpoints are replaced atomically, so
    the last one is intact wherever it lands."""


def _terminated(signum, frame):
    raise Terminated


def execute(args: argparse.Namespace, prog: str, cls: type, run_fn) -> int:
    """Resolve the configuration and run it; the exit codes of ``train`` and ``pretrain``: 0 finished
    or stopped as asked, 2 a user error (nothing written), 3 a non-finite loss (``failure.json``),
    1 the run directory could not be written, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."""
    import signal
    import threading

    try:
        cfg = config_from_args(args, cls)
    except (ValueError, OSError) as e:
        print(f"largebatch {prog}: invalid configuration: {e}", file=sys.stderr)
        return 2
    from .rundir import RunDirError

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        result = run_fn(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"largebatch {prog}: {e}", file=sys.stderr)
        return 2
    except RunDirError as e:
        print(f"largebatch {prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nlargebatch {prog}: interrupted; {cfg.out_dir} keeps the checkpoint of the last finished epoch: "
              f"continue with the same command plus --resume", file=sys.stderr)
        return 130
    except Terminated:
        import os

        if os.environ.get("RANK", "0") == "0":  # under torchrun every process gets it: one line, not N
            print(f"\nlargebatch {prog}: terminated (SIGTERM); {cfg.out_dir} keeps the checkpoint of the last "
                  f"finished epoch, intact: continue with the same command plus --resume", file=sys.stderr)
        return 143
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 3 if result.status == "nonfinite" else 0
