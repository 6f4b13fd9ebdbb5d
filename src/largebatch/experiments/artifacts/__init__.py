"""Every table and figure of the three papers (and the fair-baselines comparison) as an
:class:`~largebatch.experiments.engine.Artifact`, in the order of the catalogue (docs/reproductions.md).

``ARTIFACTS`` (id -> artifact) is built on first use: the artifact modules import torch and the training
loop, which ``largebatch --help`` should not pay for."""

from __future__ import annotations

from functools import cache


@cache
def _registry() -> dict:
    from . import batch_scaling, clars, control, fair, lalc, tvlars

    return {a.id: a for a in (*tvlars.ARTIFACTS, *lalc.ARTIFACTS, *clars.ARTIFACTS, fair.ARTIFACT, control.ARTIFACT,
                              batch_scaling.ARTIFACT)}


def __getattr__(name: str):
    if name == "ARTIFACTS":
        return _registry()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
