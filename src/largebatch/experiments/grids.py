"""Search grids that cannot end at an edge.

A search whose best value sits at the edge of its grid has not found the optimum: the grid is
extended by one point on that side (the edge value times or divided by ``factor``) and searched
again, until the best is interior or the grid holds ``cap`` points; then the search is reported as
ending at the "edge". Every optimizer of a comparison gets the same ``cap`` (equal budgets).
"""

from __future__ import annotations

from typing import Callable, Sequence

PENDING, INTERIOR, EDGE = "pending", "interior", "edge"


def next_point(grid: Sequence[float], score: Callable[[float], float], factor: float) -> float | None:
    """The point to add: beyond the lowest (``/ factor``) or highest (``x factor``) value when the best
    score is there, else None. Ties go to the interior (the first best in ascending order, then the edge
    only if no interior value equals it)."""
    g = sorted(grid)
    best = max(score(x) for x in g)
    tops = [x for x in g if score(x) == best]
    if any(x not in (g[0], g[-1]) for x in tops):
        return None
    if g[0] in tops:
        return g[0] / factor
    if g[-1] in tops:
        return g[-1] * factor
    return None


def extend(grid: Sequence[float], score: Callable[[float], float | None], factor: float, cap: int) -> tuple[list[float], str]:
    """The grid to run now and its state: ``pending`` (some point has no score yet: run them), ``interior``
    (the best is inside: done) or ``edge`` (the best is at an edge and the grid holds ``cap`` points).
    ``score(x)`` is None for a point not run yet; a diverged point should score ``-inf``."""
    g = sorted(grid)
    while True:
        scores = {x: score(x) for x in g}
        if any(v is None for v in scores.values()):
            return g, PENDING
        nxt = next_point(g, scores.__getitem__, factor)
        if nxt is None:
            return g, INTERIOR
        if len(g) >= cap:
            return g, EDGE
        g = sorted(g + [nxt])
