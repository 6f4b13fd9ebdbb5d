"""Reading files other people made and writing files without leaving half of one.

A run directory may come from someone else (a shared folder, a downloaded checkpoint): nothing
read from it may run code, allocate what its header claims, or follow a link out of it.

- :func:`load_tensors`: ``torch.load(weights_only=True)``: tensors and plain Python values
  (dict, list, tuple, str, numbers, None) only; the few NumPy types of the random-number state
  that checkpoints of earlier versions hold are the only other objects accepted. Anything else
  is refused with :class:`NotOurs`, and nothing in the file is run.
- :func:`restricted_unpickle`: a pickle whose classes must be on an allow-list (the
  ``.metadata`` of a ``torch.distributed.checkpoint`` folder, CIFAR's pickle batches).
- :func:`atomic_write`: write ``path.tmp``, then ``os.replace``; a failure (full disk) removes
  the ``.tmp`` and re-raises the ``OSError``. A ``.tmp`` left by a crash (or a link planted
  there) is removed first, never written through.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import shutil
from typing import IO, Any, Callable

import numpy as np
import torch


class NotOurs(ValueError):
    """A file holds objects a checkpoint of ours never holds (refused before any of them is made)."""


def _numpy_rng_globals() -> list:
    """What ``np.random.get_state()`` pickles to (checkpoints written before the RNG state was
    stored as tensors): an array of uint32 and its dtype; no function that runs code."""
    out = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(Exception):
            out.append(importlib.import_module(mod)._reconstruct)
            break
    return out


def _legacy_rng_globals() -> list:
    """:func:`_numpy_rng_globals` for ``torch.serialization.safe_globals``, with the NumPy 1
    spelling of ``_reconstruct`` too (a checkpoint written under NumPy 1)."""
    out = _numpy_rng_globals()
    return out + [(out[-1], "numpy.core.multiarray._reconstruct")]


def load_tensors(path: str) -> Any:
    """``torch.load`` of ``path`` on the CPU with ``weights_only=True``. Raises :class:`NotOurs`
    for a pickle of any other object (nothing in it is run), ``OSError`` / ``RuntimeError`` for
    a file that is not a readable torch file."""
    _regular_file(path)
    try:
        with torch.serialization.safe_globals(_legacy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = str(e).split("GLOBAL ", 1)[1].split(" ", 1)[0] if "GLOBAL " in str(e) else "objects"
        raise NotOurs(f"it holds {what} besides tensors and plain values: refused, nothing in it was run") from None


def _regular_file(path: str) -> None:
    """Refuse a FIFO, a device or a directory where a file is read (reading one could block forever)."""
    import stat

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotOurs("not a regular file")


class _Restricted(pickle.Unpickler):
    def __init__(self, f: IO[bytes], allowed: dict[tuple[str, str], Any], **kw):
        super().__init__(f, **kw)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        obj = self.allowed.get((module, name))
        if obj is None:
            raise NotOurs(f"it holds {module}.{name}, which this file never holds: refused, nothing in it was run")
        return obj


def restricted_unpickle(f: IO[bytes], allowed: dict[tuple[str, str], Any], **kw) -> Any:
    """``pickle.load(f)`` that makes only the objects ``allowed`` names by ``(module, name)`` as a
    pickle refers to them (plus the containers and scalars pickle builds without a lookup);
    any other reference is :class:`NotOurs`, before anything is made."""
    return _Restricted(f, allowed, **kw).load()


def by_name(*objects: Any) -> dict[tuple[str, str], Any]:
    """``{(module, qualified name): object}`` of classes and functions, for :func:`restricted_unpickle`."""
    return {(o.__module__, o.__qualname__): o for o in objects}


def numpy_array_globals() -> dict[tuple[str, str], Any]:
    """What a pickled plain NumPy array refers to, as NumPy 1 and 2 write it (CIFAR's batches)."""
    rec = _numpy_rng_globals()[-1]
    return {("numpy.core.multiarray", "_reconstruct"): rec, ("numpy._core.multiarray", "_reconstruct"): rec,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


def check_size(obj: Any, limit: int, what: str) -> None:
    """``ValueError`` if ``obj`` holds more than ``limit`` values counted with repetition: YAML
    anchors and pickle's memo let a few hundred bytes stand for a list of 10^9 items (a "billion
    laughs"), which comparing, copying or printing it would expand. Tensors count as one value."""
    stack, seen = [obj], 0
    while stack:
        o = stack.pop()
        seen += 1
        if seen > limit:
            raise ValueError(f"{what} holds more than {limit} values (nested or repeated references, e.g. "
                             f"YAML anchors); refused")
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)


# ----------------------------------------------------------------------------- writing
def clear(path: str) -> None:
    """Remove ``path`` if present: a file or a link is unlinked (a link's target is untouched),
    a directory removed with its contents."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """``write(f)`` into ``path + ".tmp"`` (created anew, never through a link), then rename it
    to ``path``. On an ``OSError`` (full disk, permissions) the ``.tmp`` is removed and the
    error re-raised; ``path`` is as it was."""
    tmp = path + ".tmp"
    try:
        clear(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with (open(fd, "wb") if binary else open(fd, "w", newline="")) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            clear(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = path  # a failed write says which file
        raise


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))
