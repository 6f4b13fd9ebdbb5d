"""``largebatch reproduce ARTIFACT``: regenerate a table or figure of the papers (docs/reproductions.md).

    largebatch reproduce --list                            # every artifact, its scales and run counts
    largebatch reproduce tvlars-table1 --scale mini        # the command line of every run (for a cluster)
    largebatch reproduce tvlars-table1 --scale mini --run  # run / resume the missing runs, then collect
    largebatch reproduce tvlars-table1 --scale mini --collect   # OUT/tvlars-table1/mini/results.md + figure
    largebatch reproduce --glance --scale mini             # the at-a-glance table: every claim's verdict so far

Scales: ``paper`` (the papers' data, models and settings; GPUs), ``mini`` (Fashion-MNIST or digits and
small models, at most ~30 minutes per artifact on 2 CPU cores, 3 seeds), ``smoke`` (seconds: the
plumbing). The engine and the artifact definitions: ``largebatch.experiments.engine`` and
``largebatch.experiments.artifacts``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from .engine import SCALES, Ctx, UserError

DEFAULT_OUT = "runs/reproduce"


def _seeds(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")
    return n


def add_arguments(parser: argparse.ArgumentParser, artifact: str | None = None, scale: str = "mini") -> None:
    if artifact is None:
        parser.add_argument("artifact", nargs="?", metavar="ARTIFACT", help="an artifact id (--list shows them)")
    parser.set_defaults(fixed_artifact=artifact)
    parser.add_argument("--list", action="store_true", help="list the artifacts (with ARTIFACT: its scales and runs)")
    parser.add_argument("--scale", choices=SCALES, default=scale, help=f"paper, mini or smoke (default: {scale})")
    parser.add_argument("--run", action="store_true", help="run / resume the missing runs, then collect")
    parser.add_argument("--glance", action="store_true",
                        help="the at-a-glance table: the verdict of every claim of every collected artifact at --scale")
    parser.add_argument("--collect", action="store_true", help="write results.md (paper beside measured) and the figure")
    parser.add_argument("--retry-failed", action="store_true", help="with --run: run failed runs again")
    parser.add_argument("--seeds", type=_seeds, default=None, metavar="N",
                        help="seeds 0 .. N-1 (default: the scale's, 5 at mini)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"root of the artifacts' folders (default: {DEFAULT_OUT})")
    parser.add_argument("--only", default=None, metavar="PATTERNS",
                        help="only the runs whose names match these comma-separated shell patterns")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a configuration field of every run that has it (e.g. data_dir=~/data, "
                             "device=cuda, micro_batch_size=512)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every epoch of every run")


def parse_set(items: list[str]) -> dict:
    """``FIELD=VALUE`` pairs; values are YAML scalars (``1``, ``1e-4``, ``false``, ``none``, text)."""
    from dataclasses import fields

    import yaml

    from largebatch.train.config import _coerce
    from largebatch.train.pretrain import PretrainConfig

    names = [f.name for f in fields(PretrainConfig)]
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in names:
            raise UserError(f"--set {item!r}: expected FIELD=VALUE with FIELD a configuration field (largebatch train "
                            f"--help lists them)")
        try:
            out[key] = _coerce(key, None if value.lower() in ("none", "null") else yaml.safe_load(value), PretrainConfig)
        except (ValueError, yaml.YAMLError) as e:
            raise UserError(f"--set {item!r}: {e}") from None
    return out


def context(art, scale: str, seeds: int | None, out: str, overrides: dict) -> Ctx:
    if scale not in art.scales:
        raise UserError(f"{art.id} has no {scale} scale ({', '.join(art.scales)} only): {art.missing}")
    n = art.seeds[scale] if seeds is None else (seeds if art.seeds[scale] else 0)
    return Ctx(art, scale, list(range(n)), out, overrides)


def get(name: str | None):
    from .artifacts import ARTIFACTS

    if name not in ARTIFACTS:
        import difflib

        close = difflib.get_close_matches(name or "", ARTIFACTS, n=3)
        raise UserError(f"unknown artifact {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                        + "; largebatch reproduce --list shows them")
    return ARTIFACTS[name]


def run(args: argparse.Namespace) -> int:
    from largebatch.train.rundir import RunDirError

    try:
        return _run(args)
    except UserError as e:
        print(f"largebatch reproduce: {e}", file=sys.stderr)
        return 2
    except RunDirError as e:
        print(f"largebatch reproduce: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from . import engine

    name = args.fixed_artifact or args.artifact
    overrides = parse_set(args.set)
    if getattr(args, "glance", False):
        from .verdicts import glance

        print(glance(args.out, args.scale))
        return 0
    if name is None:
        if not args.list:
            raise UserError("name an artifact (largebatch reproduce --list shows them)")
        print(list_all(args.out))
        return 0
    ctx = context(get(name), args.scale, args.seeds, args.out, overrides)
    if args.list:
        print(describe(ctx, args.seeds))
        return 0
    if args.run:
        engine.run_all(ctx, args.only, args.retry_failed, verbose=args.verbose)
    if args.run or args.collect:
        text = engine.collect(ctx, args.only, command=invocation(ctx, args))
        print(text)
        print(f"wrote {ctx.root}/results.md", file=sys.stderr)
        return 0
    runs = engine.validate(ctx, engine.select(ctx.grid(), args.only))
    for r in runs:
        print(engine.command_line(ctx, r, args.set))
    states = [ctx.result(r).status for r in runs]
    print(f"# {len(runs)} runs ({', '.join(f'{states.count(s)} {s}' for s in dict.fromkeys(states))}); --run runs "
          f"the missing ones, --collect tabulates them", file=sys.stderr)
    return 0


def invocation(ctx: Ctx, args: argparse.Namespace) -> str:
    """The command that regenerates this collection."""
    parts = ["largebatch", "reproduce", ctx.artifact.id, "--scale", ctx.scale]
    if ctx.seeds and len(ctx.seeds) != ctx.artifact.seeds[ctx.scale]:
        parts += ["--seeds", str(len(ctx.seeds))]
    if ctx.out != DEFAULT_OUT:
        parts += ["--out", ctx.out]
    for s in args.set:
        parts += ["--set", s]
    if args.only:
        parts += ["--only", args.only]
    return shlex.join(parts + ["--run"])


def list_all(out: str) -> str:
    from .artifacts import ARTIFACTS

    lines = [f"{'ARTIFACT':<24} {'SCALES':<20} {'RUNS (seeds)':<42} WHAT"]
    for art in ARTIFACTS.values():
        counts = []
        for scale in art.scales:
            ctx = context(art, scale, None, out, {})
            counts.append(f"{scale} {len(ctx.grid())} ({len(ctx.seeds)})")
        lines.append(f"{art.id:<24} {', '.join(art.scales):<20} {'; '.join(counts):<42} {art.title}")
    return "\n".join(lines)


def describe(ctx: Ctx, seeds: int | None = None) -> str:
    art = ctx.artifact
    lines = [f"{art.id}: {art.title}", f"question: {art.question}", ""]
    for scale, what in art.scales.items():
        c = context(art, scale, seeds, ctx.out, ctx.overrides)
        lines.append(f"  {scale} (seeds: {len(c.seeds)}, runs: {len(c.grid())}): {what}")
    if art.missing:
        lines.append(f"  other scales: {art.missing}")
    runs = ctx.grid()
    lines += ["", f"runs at scale {ctx.scale} (in {ctx.root}):"]
    lines += [f"  {r.name:<48} {ctx.result(r).status}" + (f" (shared: in {r.home}'s folder)" if r.home else "")
              for r in runs]
    return "\n".join(lines)
