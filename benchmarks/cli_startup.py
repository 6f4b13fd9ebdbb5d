"""Wall time of ``largebatch --help`` and of each sub-command's ``--help``.

Each command runs ``--repeats`` times in a fresh interpreter (``python -m largebatch ...``, the
same code path as the ``largebatch`` script); the table gives the median and the maximum in
seconds, and which heavy modules the command imported (torch, torchvision, scipy, sklearn,
matplotlib). The target is under 1 s each: ``--help`` must not import torch. This is a
measurement, not a test (tests/test_cli.py checks the imports, not the time).

    python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "torchvision", "scipy", "sklearn", "matplotlib")

# Prints the heavy modules that `python -m largebatch ARGS` imported, after it exits.
PROBE = """
import runpy, sys
sys.argv = ["largebatch"] + sys.argv[1:]
try:
    runpy.run_module("largebatch", run_name="__main__")
except SystemExit:
    pass
print("\\nIMPORTED:" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def commands() -> list[list[str]]:
    from largebatch.cli import COMMANDS

    return [["--help"], ["--version"]] + [[name, "--help"] for name in COMMANDS]


def time_one(args: list[str], repeats: int) -> tuple[float, float, str]:
    times = []
    imported = ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "largebatch", *args], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=os.environ)
        times.append(time.perf_counter() - t0)
    probe = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True)
    for line in probe.stderr.splitlines():
        if line.startswith("IMPORTED:"):
            imported = line[len("IMPORTED:"):] or "-"
    return statistics.median(times), max(times), imported


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"# {platform.node()} | {platform.processor() or platform.machine()} | Python {platform.python_version()} "
          f"| {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {args.repeats} repeats")
    print(f"{'command':<36} {'median s':>9} {'max s':>7}  heavy imports")
    for cmd in commands():
        med, mx, imported = time_one(cmd, args.repeats)
        print(f"{'largebatch ' + ' '.join(cmd):<36} {med:>9.2f} {mx:>7.2f}  {imported}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
