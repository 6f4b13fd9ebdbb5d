"""Argument checks shared by the optimizers and the schedules: one error type that names
the offending argument, so every front end (the classes, config files, the command line)
accepts exactly the same values and can say which field to change."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["HyperparameterError", "check", "is_real", "check_nonneg", "check_unit"]


class HyperparameterError(ValueError):
    """A hyper-parameter outside its accepted range; ``.arg`` names the constructor argument."""

    def __init__(self, arg: str, message: str):
        super().__init__(message)
        self.arg = arg


def check(name: str, value: Any, ok: bool, accepted: str) -> None:
    """Raise ``HyperparameterError`` "invalid name=value: expected accepted" unless ``ok``."""
    if not ok:
        raise HyperparameterError(name.split("[")[0].split(" ")[0], f"invalid {name}={value!r}: expected {accepted}")


def is_real(x: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_nonneg(name: str, x: Any) -> None:
    check(name, x, is_real(x) and x >= 0, "a finite number >= 0")


def check_unit(name: str, x: Any, closed: bool = False) -> None:
    ok = is_real(x) and 0 <= x and (x <= 1 if closed else x < 1)
    check(name, x, ok, "a number in [0, 1]" if closed else "a number in [0, 1)")
