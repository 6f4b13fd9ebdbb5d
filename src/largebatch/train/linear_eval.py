"""``largebatch linear-eval RUN_DIR``: linear evaluation of a run's frozen backbone (docs/algorithms.md section 11 "Barlow
Twins", Evaluation; the TVLARS papers' SSL accuracy).

The backbone of ``RUN_DIR`` (a ``largebatch pretrain`` run, or a ``train`` run with its head
removed) is rebuilt from ``config.yaml``, loaded from its checkpoint (the previous one if the
latest cannot be read) and put in eval mode; its pooled features of the training and test images
(no augmentation) are computed once and cached in ``RUN_DIR/linear-eval/``; a linear classifier
is trained on them with SGD (momentum 0.9) and a cosine schedule (``largebatch.ssl.train_linear``;
the papers: 100 epochs) and its top-1 test accuracy is written to
``RUN_DIR/linear-eval/<features>.json`` and printed.

Baselines every SSL number needs, from the same run directory:

- ``--random-init``: the same architecture at its initialization (the seed of the run, i.e.
  the starting point of pre-training), never trained;
- ``--raw-pixels``: the classifier on the normalized pixels themselves.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from largebatch import ssl

from . import data as data_mod
from . import fsdp
from .config import TrainConfig, load_file, resolve
from .distributed import pick_device
from .models import init_weights
from .rundir import RunDir

FEATURES = ("pretrained", "random-init", "raw-pixels")


def run_config(run_dir: str):
    """The resolved configuration of a run directory (``PretrainConfig`` for pre-training runs)."""
    from .pretrain import PretrainConfig

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"run_dir: {run_dir} has no config.yaml; pass a directory written by largebatch "
                         f"pretrain or train")
    saved = load_file(path)
    return resolve(None, saved, PretrainConfig if "projector" in saved else TrainConfig)


def build_backbone(cfg, shape: tuple[int, int, int], state: dict | None) -> nn.Module:
    """The run's backbone: initialized as the run started (its seed and ``init``), then loaded
    from the checkpoint ``state`` when given (pre-training: ``backbone.*``; a classifier: all but
    its head)."""
    torch.manual_seed(cfg.seed)
    backbone, _ = ssl.build_backbone(cfg.model, shape, stem=cfg.stem, mlp_depth=cfg.mlp_depth,
                                     mlp_width=cfg.mlp_width, activation=cfg.activation,
                                     mlp_batchnorm=cfg.mlp_batchnorm)
    init_weights(backbone, cfg.init)
    if state is not None:
        weights = state["model"] if "model" in state else fsdp.read_model(state["dcp"])  # --fsdp: a DCP folder
        if any(k.startswith("backbone.") for k in weights):
            weights = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
        else:
            weights = {k: v for k, v in weights.items() if k in backbone.state_dict()}
        backbone.load_state_dict(weights)
    return backbone


def features_of(backbone: nn.Module | None, ds: data_mod.ArrayDataset, batch: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test features (float32, on ``device``): the backbone's pooled features in eval mode,
    or the normalized pixels, flattened."""
    if backbone is None:
        flat = lambda x: data_mod.normalize(x.to(device), ds.mean.to(device), ds.std.to(device)).flatten(1)  # noqa: E731
        return flat(ds.train_x), flat(ds.test_x)
    backbone.to(device)
    return (ssl.extract_features(backbone, ds.train_x, ds.mean, ds.std, batch, device),
            ssl.extract_features(backbone, ds.test_x, ds.mean, ds.std, batch, device))


def linear_eval(run_dir: str, features: str = "pretrained", *, epochs: int = 100, lr: float = 0.1,
                batch_size: int = 256, weight_decay: float = 1e-6, seed: int = 0, device: str = "auto",
                data_dir: str | None = None, log=print) -> dict:
    """Evaluate ``run_dir``'s backbone (or a baseline, ``features``); returns and writes the result."""
    if features not in FEATURES:
        raise ValueError(f"features: {features!r} is not one of {', '.join(FEATURES)}")
    cfg = run_config(run_dir)
    ds = data_mod.load(cfg.dataset, data_dir or cfg.data_dir, False)
    backbone, info = None, {"epoch": 0, "global_step": 0}
    if features != "raw-pixels":
        state = None
        if features == "pretrained":
            state = RunDir(run_dir, cfg.metrics_format, True)._read_checkpoint(log)
            if state is None:
                raise ValueError(f"run_dir: {run_dir} has no checkpoint (run with --no-checkpoint, or stopped in "
                                 f"its first epoch); only --random-init or --raw-pixels can be evaluated")
            info = {"epoch": state["epoch"], "global_step": state["global_step"]}
        backbone = build_backbone(cfg, ds.shape, state)
    dev = pick_device(device)
    out = os.path.join(run_dir, "linear-eval")
    os.makedirs(out, exist_ok=True)
    key = {"features": features, "dataset": cfg.dataset, "epoch": info["epoch"],
           "global_step": info["global_step"], "train": int(ds.train_x.shape[0]), "test": int(ds.test_x.shape[0])}
    cache = os.path.join(out, f"features-{features}.pt")
    cached = _read_cache(cache, key)
    if cached is None:
        tr, te = features_of(backbone, ds, 512, dev)
        tmp = cache + ".tmp"
        torch.save({"key": key, "train": tr.cpu(), "test": te.cpu()}, tmp)
        os.replace(tmp, cache)
    else:
        tr, te = cached["train"].to(dev), cached["test"].to(dev)
    res = ssl.train_linear(tr, ds.train_y.to(dev), te, ds.test_y.to(dev), ds.num_classes, epochs=epochs, lr=lr,
                           batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    result = {"run_dir": run_dir, **key, "feature_dim": int(tr.shape[1]), "top1": res.top1,
              "settings": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
                           "seed": seed, "optimizer": "SGD momentum 0.9, cosine", "standardized": True},
              "history": res.history}
    path = os.path.join(out, f"{features}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    return result


def _read_cache(path: str, key: dict) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        c = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable cache is recomputed
        return None
    return c if isinstance(c, dict) and c.get("key") == key else None
