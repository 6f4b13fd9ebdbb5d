"""Verdicts decided by a rule, not by prose.

An artifact declares its claims as :class:`Claim` comparisons: the arm the paper says is better (or
equal), the arm it is compared with, the cell (batch, LR, ...), the direction, and the smallest
effect that matters (points of accuracy). :func:`evaluate` takes the per-seed results of each arm
and gives every claim a :class:`Verdict`:

- the difference of the means (``arm - baseline``), its 95% Welch confidence interval, and the
  two-sided Welch t-test's p-value, Holm-corrected over the artifact's claims (a positive control is
  the gate of the others, tested alone at 0.05 and not part of their Holm family);
- the verdict, by direction (``m`` = the smallest effect that matters, ``[lo, hi]`` the interval):

  =================  ================================================  ======================================
  direction          reproduced                                        contradicted
  =================  ================================================  ======================================
  ``greater``        Holm p < 0.05, difference > 0 and >= m            hi < m (an effect that matters excluded)
  ``less``           Holm p < 0.05, difference < 0 and <= -m           lo > -m
  ``noninferior``    lo > -m (the arm is not worse by m or more)       hi < -m (worse by more than m)
  ``equivalent``     -m < lo and hi < m                                lo > m or hi < -m
  =================  ================================================  ======================================

  anything else is ``inconclusive``; fewer than two seeds in an arm is ``inconclusive`` too, an arm
  without any result ``not run``.
- a **positive control** (``control=True``, e.g. "warm-up beats no warm-up") that is not reproduced
  makes every other claim of the artifact ``not testable at this scale``: the phenomenon the claim
  is about is absent, so neither outcome would say anything about the paper.

Other artifacts call :func:`compare` with their own per-seed arrays, or :func:`evaluate` with a dict
arm -> per-seed values. A quantity fitted to all seeds at once (not a per-seed value, e.g. a critical
batch size) comes with a precomputed interval instead: :func:`from_bootstrap` (replicates of the
difference: the 95% percentile interval and the two-sided bootstrap p-value of "no difference") or
:func:`from_interval` make its :class:`Verdict`, and :func:`conclude` applies the same Holm correction,
rule and positive-control gate. :func:`report` renders the table; :func:`save` / :func:`load` keep the
verdicts of an artifact next to its ``results.md`` so that :func:`glance` can build the at-a-glance
table of docs/reproductions.md.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

ALPHA = 0.05
DIRECTIONS = ("greater", "less", "noninferior", "equivalent")
REPRODUCED, CONTRADICTED, INCONCLUSIVE, NOT_TESTABLE, NOT_RUN = (
    "reproduced", "contradicted", "inconclusive", "not testable at this scale", "not run")
VERDICTS_FILE = "verdicts.json"


@dataclass(frozen=True)
class Claim:
    """``arm`` compared with ``baseline`` in one cell: ``direction`` (see the module docstring) by at least
    ``min_effect`` points. ``control``: a positive control that the artifact's other claims need."""

    id: str
    text: str
    arm: str
    baseline: str
    direction: str = "greater"
    min_effect: float = 1.0
    control: bool = False
    cell: str = ""
    needs_control: bool = True  # a failed positive control makes it not testable (False: a claim about something else)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"claim {self.id}: direction {self.direction!r} is not one of {', '.join(DIRECTIONS)}")
        if not self.min_effect > 0:
            raise ValueError(f"claim {self.id}: min_effect must be > 0, got {self.min_effect}")


@dataclass
class Verdict:
    claim: Claim
    n_arm: int
    n_base: int
    mean_arm: float
    mean_base: float
    sd_arm: float
    sd_base: float
    diff: float
    lo: float
    hi: float
    p: float
    p_holm: float = math.nan
    verdict: str = INCONCLUSIVE
    note: str = ""
    extra: dict = field(default_factory=dict)
    method: str = "welch"  # how diff, lo, hi and p came about: "welch" (per-seed values) or e.g. "bootstrap"


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean(a) - mean(b), lo, hi, p)``: the Welch interval at ``level`` and the two-sided Welch p-value.
    Both arms constant: the interval is the difference itself and p is 0 (different) or 1 (equal)."""
    from scipy import stats

    (ma, sa), (mb, sb) = _mean_sd(a), _mean_sd(b)
    d = ma - mb
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return d, d, d, (0.0 if d != 0 else 1.0)
    df = (va + vb) ** 2 / ((va * va / (len(a) - 1) if len(a) > 1 else 0.0) + (vb * vb / (len(b) - 1) if len(b) > 1 else 0.0))
    q = stats.t.ppf(0.5 + level / 2, df)
    p = 2.0 * stats.t.sf(abs(d) / se, df)
    return d, float(d - q * se), float(d + q * se), float(p)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN entries stay NaN and do not count)."""
    idx = sorted((i for i, p in enumerate(ps) if not math.isnan(p)), key=lambda i: ps[i])
    m, out, running = len(idx), [math.nan] * len(ps), 0.0
    for k, i in enumerate(idx):
        running = max(running, min(1.0, (m - k) * ps[i]))
        out[i] = running
    return out


def compare(claim: Claim, arm: Sequence[float], base: Sequence[float]) -> Verdict:
    """One claim on per-seed values, before the Holm correction (``p_holm`` = ``p``)."""
    arm, base = [float(x) for x in arm], [float(x) for x in base]
    (ma, sa), (mb, sb) = _mean_sd(arm), _mean_sd(base)
    if len(arm) < 2 or len(base) < 2:
        d = ma - mb if arm and base else math.nan
        v = Verdict(claim, len(arm), len(base), ma, mb, sa, sb, d, math.nan, math.nan, math.nan)
        if not arm or not base:
            v.verdict = NOT_RUN
        else:
            v.note = "fewer than 2 seeds in an arm"
        return v
    d, lo, hi, p = welch(arm, base)
    v = Verdict(claim, len(arm), len(base), ma, mb, sa, sb, d, lo, hi, p, p)
    v.verdict = decide(claim, d, lo, hi, p)
    return v


def from_interval(claim: Claim, diff: float, lo: float, hi: float, p: float, *, n_arm: int, n_base: int,
                  mean_arm: float = math.nan, mean_base: float = math.nan, method: str = "bootstrap",
                  extra: dict | None = None) -> Verdict:
    """One claim from a precomputed difference ``diff`` with its 95% interval ``[lo, hi]`` and two-sided p-value of
    "no difference", before the Holm correction; ``n_arm`` / ``n_base``: the seeds behind each arm (0: not run,
    1: inconclusive, as in :func:`compare`). A NaN interval or p-value is inconclusive."""
    v = Verdict(claim, n_arm, n_base, mean_arm, mean_base, math.nan, math.nan, diff, lo, hi, p, p,
                extra=dict(extra or {}), method=method)
    if not n_arm or not n_base:
        v.verdict, v.p = NOT_RUN, math.nan
    elif n_arm < 2 or n_base < 2:
        v.note, v.p = "fewer than 2 seeds in an arm", math.nan
    elif any(math.isnan(x) for x in (diff, lo, hi, p)):
        v.note, v.p = "no interval", math.nan
    else:
        v.verdict = decide(claim, diff, lo, hi, p)
    v.p_holm = v.p
    return v


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile (linear interpolation) of the non-NaN values of ``xs`` (may be infinite)."""
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi or xs[lo] == xs[hi]:
        return xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def bootstrap_p(replicates: Sequence[float], null: float = 0.0) -> float:
    """Two-sided bootstrap p-value of ``difference = null`` from the replicates of the difference (NaN left out):
    ``2 (min(#{x <= null}, #{x >= null}) + 1) / (n + 1)``, at most 1 (the ``+ 1``: a finite number of replicates
    never shows p = 0). It is below 0.05 about when the 95% percentile interval excludes ``null``."""
    xs = [x for x in replicates if not math.isnan(x)]
    if not xs:
        return math.nan
    k = min(sum(x <= null for x in xs), sum(x >= null for x in xs))
    return min(1.0, 2.0 * (k + 1) / (len(xs) + 1))


def from_bootstrap(claim: Claim, diff: float, replicates: Sequence[float], *, n_arm: int, n_base: int,
                   level: float = 0.95, **kw) -> Verdict:
    """:func:`from_interval` with the percentile interval at ``level`` and :func:`bootstrap_p` of ``replicates``
    (bootstrap replicates of the difference; NaN entries, replicates without a value, are left out)."""
    lo, hi = percentile(replicates, (1 - level) / 2), percentile(replicates, (1 + level) / 2)
    return from_interval(claim, diff, lo, hi, bootstrap_p(replicates), n_arm=n_arm, n_base=n_base, **kw)


def decide(claim: Claim, d: float, lo: float, hi: float, p_holm: float) -> str:
    """The rule of the module docstring."""
    m = claim.min_effect
    if claim.direction == "greater":
        if p_holm < ALPHA and d >= m:
            return REPRODUCED
        return CONTRADICTED if hi < m else INCONCLUSIVE
    if claim.direction == "less":
        if p_holm < ALPHA and d <= -m:
            return REPRODUCED
        return CONTRADICTED if lo > -m else INCONCLUSIVE
    if claim.direction == "noninferior":
        return REPRODUCED if lo > -m else CONTRADICTED if hi < -m else INCONCLUSIVE
    return REPRODUCED if -m < lo and hi < m else CONTRADICTED if (lo > m or hi < -m) else INCONCLUSIVE


def evaluate(claims: Sequence[Claim], samples: Mapping[str, Sequence[float]] | Mapping[str, Mapping[str, Sequence[float]]],
             control: "Verdict | str | None" = None) -> list[Verdict]:
    """Every claim of one artifact, Holm-corrected together.

    ``samples``: arm -> per-seed values, or cell -> (arm -> values) when claims name a ``cell``.
    ``control``: the verdict (or verdict string) of an external positive control; a control claim among
    ``claims`` counts too. Any control not reproduced makes the other claims that need it not testable."""
    def data(c: Claim, arm: str) -> list[float]:
        src = samples.get(c.cell, {}) if c.cell and isinstance(samples.get(c.cell), Mapping) else samples
        return list(src.get(arm, []))

    return conclude([compare(c, data(c, c.arm), data(c, c.baseline)) for c in claims], control)


def conclude(out: list[Verdict], control: "Verdict | str | None" = None) -> list[Verdict]:
    """The verdicts of one artifact's claims (from :func:`compare`, :func:`from_interval`, :func:`from_bootstrap`),
    Holm-corrected together and gated by the positive control as :func:`evaluate` describes; ``out`` is updated."""
    # gatekeeping: a positive control is a precondition tested alone at ALPHA; the claims it gates form the
    # Holm family
    ps = holm([math.nan if v.claim.control else v.p for v in out])
    for v, ph in zip(out, ps):
        v.p_holm = v.p if v.claim.control else ph
        if not math.isnan(v.p_holm):
            v.verdict = decide(v.claim, v.diff, v.lo, v.hi, v.p_holm)
    ext = control.verdict if isinstance(control, Verdict) else control
    failed = [v for v in out if v.claim.control and v.verdict != REPRODUCED]
    ext = "not run" if ext is None and control is not None else ext
    if ext is not None and ext != REPRODUCED:
        reason = f"the positive control is {ext}"
    elif failed:
        reason = f"the positive control ({failed[0].claim.id}) is {failed[0].verdict}"
    else:
        return out
    for v in out:
        if not v.claim.control and v.claim.needs_control and v.verdict != NOT_RUN:
            v.verdict, v.note = NOT_TESTABLE, reason
    return out


# ----------------------------------------------------------------------------- rendering
def _f(x: float, spec: str = "+.2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ms(m: float, s: float, n: int) -> str:
    return "-" if n == 0 else f"{m:.2f} (n={n})" if math.isnan(s) else f"{m:.2f} ± {s:.2f} (n={n})"


def report(verdicts: Sequence[Verdict]) -> str:
    """A Markdown table: one row per claim with both arms, the difference, its interval, Holm p and the verdict."""
    from .engine import table

    rows = [[f"{v.claim.text}" + (f" [{v.claim.cell}]" if v.claim.cell else ""), v.claim.arm, _ms(v.mean_arm, v.sd_arm, v.n_arm),
             v.claim.baseline, _ms(v.mean_base, v.sd_base, v.n_base), _f(v.diff),
             "-" if math.isnan(v.lo) else f"[{v.lo:+.2f}, {v.hi:+.2f}]", _f(v.p_holm, ".3g"),
             f"{v.claim.direction} {v.claim.min_effect:g}", f"**{v.verdict}**" + (f" ({v.note})" if v.note else "")]
            for v in verdicts]
    return table(["claim", "arm", "arm %", "vs", "vs %", "difference", "95% CI", "Holm p", "rule: direction, "
                  "smallest effect", "verdict"], rows) + (
        "\n\nVerdict rule: `largebatch.experiments.verdicts` (Welch test, Holm-corrected over this artifact's claims; "
        "95% Welch interval)." if all(v.method == "welch" for v in verdicts) else
        "\n\nVerdict rule: `largebatch.experiments.verdicts` (two-sided test of no difference, Holm-corrected over "
        f"this artifact's claims; 95% interval; {', '.join(sorted({v.method for v in verdicts}))}).")


def _nan_none(x):
    if isinstance(x, dict):
        return {k: _nan_none(y) for k, y in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_none(y) for y in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def to_dict(v: Verdict) -> dict:
    """The verdict as JSON-ready fields, NaN (also in ``extra``) as ``None``."""
    return _nan_none(asdict(v))


def save(folder: str, artifact: str, verdicts: Sequence[Verdict], stamp: str = "", **extra) -> str:
    """Write ``verdicts.json`` (the artifact id, the stamp, every verdict, ``extra`` fields) into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, VERDICTS_FILE)
    with open(path, "w") as f:
        json.dump({"artifact": artifact, "stamp": stamp, **extra, "verdicts": [to_dict(v) for v in verdicts]}, f, indent=1)
    return path


def load(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, VERDICTS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def glance(out: str, scale: str) -> str:
    """The at-a-glance table: every claim of every artifact under ``out`` that has ``verdicts.json`` at ``scale``."""
    from .engine import table

    rows = []
    if os.path.isdir(out):
        for art in sorted(os.listdir(out)):
            got = load(os.path.join(out, art, scale))
            if not got:
                continue
            for v in got["verdicts"]:
                c = v["claim"]
                diff = "-" if v["diff"] is None else f"{v['diff']:+.2f}"
                ci = "-" if v["lo"] is None else f"[{v['lo']:+.2f}, {v['hi']:+.2f}]"
                rows.append([f"`{art}`", c["text"] + (f" [{c['cell']}]" if c["cell"] else ""), diff, ci,
                             f"{v['verdict']}" + (f" ({v['note']})" if v["note"] else ""), got.get("stamp", "")])
    if not rows:
        return "(no artifact has verdicts at this scale yet: run --collect)"
    return table(["artifact", "claim", "difference", "95% CI", "verdict", "collected"], rows)
