"""Where a number came from: the git commit of the package's source and the CPU model, written
into each run's ``.largebatch-run`` marker (``train/rundir.py``) and every collected table's
stamp (``experiments/engine.py``), and printed by the benchmarks."""

from __future__ import annotations

import functools
import os
import subprocess

__all__ = ["commit", "cpu_model"]


def commit() -> str:
    """The git commit of this package's source tree (``+dirty`` with uncommitted changes), or
    ``unknown`` (an installed package, no git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()
