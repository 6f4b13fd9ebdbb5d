"""What several artifacts share: the offline stand-ins for the papers' data and models, seeded runs,
the optimizers' recipes as fractions of a run, tiny generated ImageNet folders for smoke runs."""

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


def warmup_cosine(epochs: int, fraction: float) -> dict[str, Any]:
    """Linear warm-up over ``fraction`` of the run, then cosine to 0 (TVLARS App. A: 20 of 100 epochs)."""
    return dict(schedule="cosine", warmup_epochs=round(fraction * epochs, 3), epochs=epochs)


def tvlars(epochs: int, lam: float = 1e-4, delay: float = 0.1) -> dict[str, Any]:
    """TVLARS as in Table 1: no schedule, ``phi(t)`` with ``lam`` (per step) after ``delay`` x the run."""
    return dict(optimizer="tvlars", schedule="none", tvlars_lam=lam, tvlars_delay_epochs=round(delay * epochs, 3),
                epochs=epochs)


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
