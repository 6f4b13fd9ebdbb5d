"""Optimizer, LR schedule and step arithmetic of a run, from its :class:`TrainConfig`."""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig

def steps_per_epoch(n_train: int, batch_size: int, world_size: int, drop_last: bool = True) -> int:
    """Optimizer steps per epoch for ``n_train`` samples at global batch ``batch_size``."""
    per_rank_n = -(-n_train // world_size)
    per_rank_b = batch_size // world_size
    spe = per_rank_n // per_rank_b if drop_last else -(-per_rank_n // per_rank_b)
    if spe < 1:
        raise ValueError(f"batch_size: {batch_size} exceeds the training set ({n_train} samples) with "
                         f"drop_last; lower batch_size or pass --no-drop-last")
    return spe


def build_optimizer(cfg: TrainConfig, model: nn.Module, spe: int) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optimizer``'s registry entry over ``param_groups(model, weight_decay)``.

    Biases and normalization parameters (ndim <= 1) get no weight decay and, for the layer-wise
    optimizers, no trust ratio (docs/algorithms.md); SGD uses the same groups. Config fields
    set to ``None`` (``eta``, ``eps``, ...) leave the constructor's default.
    """
    from largebatch.optim import param_groups, registry

    groups = param_groups(model, weight_decay=cfg.weight_decay)
    return registry.get(cfg.optimizer).build(groups, effective_lr(cfg), cfg.to_dict(), spe, model=model)


def lr_applied(opt: torch.optim.Optimizer, step: int) -> float:
    """The base LR applied at optimizer step ``step``, before any trust ratio: the first group's
    ``lr`` times the optimizer's own time factor (TVLARS: ``phi(t)``, eq. 8)."""
    from largebatch.optim import LayerwiseOptimizer

    g = opt.param_groups[0]
    return g["lr"] * (opt.lr_multiplier(g, step) if isinstance(opt, LayerwiseOptimizer) else 1.0)


def effective_lr(cfg: TrainConfig) -> float:
    """Peak LR after the scaling rule (docs/algorithms.md, "Learning-rate schedules")."""
    if cfg.lr_scaling == "none":
        return cfg.lr
    from largebatch.schedules import scale_lr

    return float(scale_lr(cfg.lr, cfg.batch_size, cfg.base_batch_size, rule=cfg.lr_scaling))


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, spe: int):
    """LambdaLR over ``largebatch.schedules`` (``None`` for schedule 'none')."""
    if cfg.schedule == "none":
        return None
    from largebatch import schedules

    total = cfg.epochs * spe
    warm = int(round(cfg.warmup_epochs * spe))
    if cfg.schedule == "cosine":
        fn = schedules.warmup_cosine(total, warm, min_ratio=cfg.min_lr_ratio)
    else:
        fn = schedules.polynomial(total, warm, power=cfg.poly_power, end_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)


def build_single_process(cfg: TrainConfig, ds, device: torch.device, spe: int):
    """Model (seeded with ``cfg.seed``, initialized, on ``device``, in train mode), optimizer and
    scheduler of ``cfg`` for one process, without a run directory: the short measurements of
    ``largebatch noise-scale`` and the batch-scaling study's trials."""
    from ..models import build_model, init_weights

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, ds.num_classes, ds.shape, stem=cfg.stem, mlp_depth=cfg.mlp_depth,
                        mlp_width=cfg.mlp_width, activation=cfg.activation, mlp_batchnorm=cfg.mlp_batchnorm)
    init_weights(model, cfg.init)
    model.to(device).train()
    opt = build_optimizer(cfg, model, spe)
    return model, opt, build_scheduler(cfg, opt, spe)
