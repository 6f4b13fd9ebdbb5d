"""What several artifacts share: the offline stand-ins for the papers' data and models, seeded runs,
the data sets' sizes (for the mapping of time knobs), the positive control's verdict, tiny generated
ImageNet folders for smoke runs."""

from __future__ import annotations

import os
from typing import Any

from ..engine import Ctx, Run

#: mini scale: Fashion-MNIST and a BN-MLP stand in for CIFAR-10 / Tiny ImageNet / ImageNet and their ResNets
MINI = dict(dataset="fashion-mnist", model="mlp", mlp_depth=3, mlp_width=256)
#: smoke scale: scikit-learn's digits (embedded) and a tiny BN-MLP
SMOKE = dict(dataset="digits", model="mlp", mlp_depth=2, mlp_width=32)
MINI_NOTE = "Fashion-MNIST (60k 28x28 images) and a BN-MLP 3 x 256 stand in for the paper's data and model"
SMOKE_NOTE = "plumbing only: a few epochs of a tiny BN-MLP on scikit-learn's digits"


def seeded(ctx: Ctx, name: str, cfg: dict[str, Any], kind: str = "train", **tags) -> list[Run]:
    """One run per seed of ``ctx``: ``name-s<seed>``, ``cfg`` with its ``seed``, ``tags`` with it."""
    return [Run(f"{name}-s{s}", {**cfg, "seed": s}, {**tags, "seed": s}, kind) for s in ctx.seeds]


#: training images per data set: the papers' (their run lengths) and the stand-ins' (the mapping of time knobs)
N_TRAIN = {"cifar10": 50_000, "tinyimagenet": 100_000, "imagenet": 1_281_167, "fashion-mnist": 60_000,
           "fashion-mnist-val": 50_000, "digits": 1437}


#: accuracy % a diverged run counts at in a claim (10 classes): divergence is an outcome, not a missing value
CHANCE = 10.0


def outcome(r) -> float | None:
    """A run's final test accuracy % for a claim: finished -> its accuracy, stopped by a non-finite loss
    (``failure.json``) -> chance, anything else (missing, unfinished, an exception) -> None."""
    from .. import engine as E

    if r.status == "finished":
        return E.test_acc(r)
    if r.status == "failed" and os.path.exists(os.path.join(r.path, "failure.json")):
        return CHANCE
    return None


def outcomes(results) -> list[float]:
    """``outcome`` of each run, the runs without one left out (one value per seed)."""
    return [v for v in map(outcome, results) if v is not None]


def control_verdict(ctx: Ctx, model: dict | None = None) -> str:
    """The warm-up positive control for an artifact whose runs use ``model`` (default: this scale's stand-in):
    ``warmup-control``'s verdict when its chosen regime uses the same model, else a reason it does not apply.
    A control established in another network says nothing about whether warm-up matters in this one."""
    from .. import verdicts as V

    got = V.load(os.path.join(ctx.out, "warmup-control", ctx.scale))
    verdict = next((v["verdict"] for v in (got or {}).get("verdicts", []) if v["claim"]["control"]), None)
    if verdict is None:
        return "not run"
    model = {"mlp_batchnorm": True, **(model if model is not None else {"mini": MINI, "smoke": SMOKE}.get(ctx.scale, {}))}
    theirs = got.get("model") or {}
    same = all(model.get(k, v) == v for k, v in theirs.items() if k in ("model", "mlp_depth", "mlp_width", "mlp_batchnorm"))
    if not same:
        return (f"absent in this artifact's network: warmup-control found its regime ({got.get('regime')}: {verdict}) in "
                "another network, so it does not apply here")
    return verdict


def verdict_section(ctx: Ctx, claims, samples: dict) -> str:
    """The verdicts of ``claims`` on ``samples`` (cell -> arm -> per-seed values; or arm -> values) with the positive
    control of this scale, saved next to results.md (the at-a-glance table reads them); the Markdown section."""
    from .. import engine as E
    from .. import verdicts as V

    ctl = control_verdict(ctx)
    verdicts = V.evaluate(claims, samples, control=ctl)
    V.save(ctx.root, ctx.artifact.id, verdicts, E.stamp(ctx))
    return "\n".join(["### Verdicts", "", f"Positive control (`warmup-control`, this scale): **{ctl}**. Claims about "
                      "warm-up need it; the others do not.", "", V.report(verdicts), ""])


def lr_label(lr: float) -> str:
    return f"{lr:g}"


def make_tiny_imagenet(folder: str, classes: int = 3, train: int = 6, val: int = 3, seed: int = 0) -> str:
    """A tiny ImageNet in the ImageFolder layout (random JPEGs of random sizes) for smoke runs and tests."""
    import numpy as np
    from PIL import Image

    if os.path.isdir(os.path.join(folder, "val")):
        return folder
    rng = np.random.RandomState(seed)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = os.path.join(folder, split, f"n{c:08d}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                h, w = rng.randint(24, 96, 2)
                img = rng.randint(0, 256, (h, w, 3), dtype=np.uint8) // 2 + 40 * c  # classes differ in brightness
                Image.fromarray(img.astype(np.uint8)).save(os.path.join(d, f"{split}_{c}_{i}.JPEG"), quality=90)
    return folder
