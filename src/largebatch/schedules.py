"""Learning-rate schedules and scaling rules (docs/algorithms.md, "Learning-rate schedules").

Every schedule is a function ``step -> multiplier`` of the base learning rate, so it plugs
into ``torch.optim.lr_scheduler.LambdaLR`` (call ``scheduler.step()`` once per optimizer
step)::

    sched = LambdaLR(opt, warmup_cosine(total_steps=T, warmup_steps=T_w))
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._validation import check, is_real

__all__ = ["warmup_cosine", "polynomial", "phi", "tvlars_phi", "tvlars_lambda", "scale_lr", "SCALING_RULES"]


def _check_steps(total_steps: int, warmup_steps: int) -> None:
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"invalid total_steps={total_steps!r}: expected an int >= 1")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"invalid warmup_steps={warmup_steps!r}: expected an int in [0, total_steps={total_steps}]")


def _check_ratio(name: str, x: float) -> None:
    if not (isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x <= 1):
        raise ValueError(f"invalid {name}={x!r}: expected a number in [0, 1]")


def _warmup_then(total_steps: int, warmup_steps: int, decay: Callable[[float], float]) -> Callable[[int], float]:
    """``t / T_w`` during warm-up, then ``decay(frac)`` with ``frac`` going 0 -> 1 over the
    remaining steps (held at ``decay(1)`` after ``total_steps``)."""

    def factor(t: int) -> float:
        if t < warmup_steps:
            return t / warmup_steps
        span = total_steps - warmup_steps
        return decay(min(t - warmup_steps, span) / span if span > 0 else 1.0)

    return factor


def warmup_cosine(total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up then cosine decay (ICLR TVLARS paper Appendix A; TVLARS paper eq. 4 is garbled).

    ``t < T_w``: ``t / T_w``; then with ``q = (1 + cos(pi (t - T_w) / (T - T_w))) / 2``:
    ``q + min_ratio (1 - q)``, i.e. ``lr_t = lr q + lr_min (1 - q)`` with
    ``lr_min = min_ratio * lr``. Held at ``min_ratio`` after ``total_steps``.
    """
    _check_steps(total_steps, warmup_steps)
    _check_ratio("min_ratio", min_ratio)

    def decay(frac: float) -> float:
        q = 0.5 * (1.0 + math.cos(math.pi * frac))
        return q + min_ratio * (1.0 - q)

    return _warmup_then(total_steps, warmup_steps, decay)


def polynomial(total_steps: int, warmup_steps: int = 0, power: float = 2.0, end_ratio: float = 0.0) -> Callable[[int], float]:
    """Optional linear warm-up, then polynomial decay (MLPerf's LARS schedule).

    After warm-up, with ``t' = t - T_w`` and ``T' = T - T_w``:
    ``(1 - end_ratio) (1 - t'/T')^power + end_ratio``, i.e.
    ``lr_t = (lr - lr_end)(1 - t'/T')^power + lr_end``. Held at ``end_ratio`` after ``T``.
    """
    _check_steps(total_steps, warmup_steps)
    _check_ratio("end_ratio", end_ratio)
    if not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
        raise ValueError(f"invalid power={power!r}: expected a number > 0")

    return _warmup_then(total_steps, warmup_steps, lambda frac: (1.0 - end_ratio) * (1.0 - frac) ** power + end_ratio)


def _check_phi(lam: float, alpha: float, delay: float, gamma_min: float) -> None:
    for name, x, ok, rng in (("lam", lam, lam >= 0, ">= 0"), ("alpha", alpha, alpha > -1, "> -1"),
                             ("delay", delay, delay >= 0, ">= 0"), ("gamma_min", gamma_min, gamma_min >= 0, ">= 0")):
        check(name, x, is_real(x) and ok, f"a finite number {rng}")
    check("alpha", alpha, alpha + math.exp(-lam * delay) > 0,
          f"alpha + exp(-lam * delay) > 0 (got {alpha + math.exp(-lam * delay):.3g}), otherwise phi has a pole")


def phi(t, lam: float, alpha: float, delay: float, gamma_min: float):
    """The formula of TVLARS's eq. 8, unchecked: ``1 / (alpha + exp(lam (t - delay))) +
    gamma_min``, for a number ``t`` or a floating tensor ``t`` (the optimizer's per-tensor
    step counters, converted to the parameters' compute dtype, in which ``phi`` is then
    computed: docs/algorithms.md section 8). The one place it is written; ``exp`` overflowing gives
    ``phi = gamma_min``."""
    x = lam * (t - delay)
    if isinstance(x, torch.Tensor):
        return 1.0 / (alpha + torch.exp(x)) + gamma_min
    return (0.0 if x > 700 else 1.0 / (alpha + math.exp(x))) + gamma_min


def tvlars_phi(t: float, lam: float = 1e-4, alpha: float = 1.0, delay: float = 0.0, gamma_min: float = 0.0) -> float:
    """TVLARS's time-varying factor, TVLARS paper eq. 8:
    ``phi(t) = 1 / (alpha + exp(lam (t - delay))) + gamma_min``.

    Non-increasing in ``t`` for ``lam >= 0``, and ``gamma_min <= phi(t) <= 1/(alpha +
    exp(-lam delay)) + gamma_min`` (eq. 9 / Appendix C bounds; the upper bound is phi(0)).
    """
    _check_phi(lam, alpha, delay, gamma_min)
    return phi(t, lam, alpha, delay, gamma_min)


def tvlars_lambda(lam: float = 1e-4, alpha: float = 1.0, delay: float = 0.0, gamma_min: float = 0.0) -> Callable[[int], float]:
    """``phi`` as a ``LambdaLR`` multiplier, to drive any optimizer with TVLARS's schedule."""
    _check_phi(lam, alpha, delay, gamma_min)
    return lambda t: tvlars_phi(t, lam, alpha, delay, gamma_min)


SCALING_RULES = ("linear", "sqrt", "none")


def scale_lr(base_lr: float, batch_size: int, base_batch_size: int, rule: str = "linear") -> float:
    """Scale a learning rate tuned at ``base_batch_size`` to ``batch_size``.

    ``linear``: ``base_lr * B / B_base`` (Goyal et al.; You et al.); ``sqrt``:
    ``base_lr * sqrt(B / B_base)`` (Krizhevsky 2014; TVLARS paper); ``none``: ``base_lr``.
    """
    if rule not in SCALING_RULES:
        raise ValueError(f"invalid rule={rule!r}: expected one of {SCALING_RULES}")
    for name, b in (("batch_size", batch_size), ("base_batch_size", base_batch_size)):
        if not isinstance(b, int) or b < 1:
            raise ValueError(f"invalid {name}={b!r}: expected an int >= 1")
    k = batch_size / base_batch_size
    return base_lr * {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[rule]
