"""Linear evaluation on cached frozen features (docs/algorithms.md section 11: SGD + cosine, 100 epochs).

Features are standardized with the training set's per-dimension mean and standard deviation, the
fixed-statistics form of the affine-free BatchNorm that MAE (He et al. 2022, App. A.2) and MoCo v3
put before the linear head; it makes one learning rate fit any backbone's feature scale. The
rest follows the Barlow Twins reference's linear evaluation: SGD with momentum 0.9, cosine
decay to 0 (per step), batch 256, weight decay 1e-6, head initialized ``N(0, 0.01^2)`` with zero
bias; the learning rate 0.1 suits standardized features (the reference uses 0.3 on raw ResNet-50
features). Deterministic for a ``seed`` (initialization and shuffling come from it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LinearEvalResult", "train_linear"]


@dataclass
class LinearEvalResult:
    top1: float                          # test accuracy after the last epoch, in [0, 1]
    history: list[dict] = field(default_factory=list)   # per epoch: epoch, lr, train_loss, train_acc, test_acc
    classifier: nn.Linear | None = None  # acts on standardized features: (f - mean) / std
    mean: Tensor | None = None
    std: Tensor | None = None


@torch.no_grad()
def _accuracy(head: nn.Linear, x: Tensor, y: Tensor, batch_size: int) -> float:
    correct = sum((head(part).argmax(1) == t).sum().item() for part, t in zip(x.split(batch_size), y.split(batch_size)))
    return correct / max(len(y), 1)


def train_linear(train_feats: Tensor, train_y: Tensor, test_feats: Tensor, test_y: Tensor, num_classes: int, *,
                 epochs: int = 100, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 1e-6,
                 momentum: float = 0.9, standardize: bool = True, seed: int = 0) -> LinearEvalResult:
    """Train a linear classifier on ``train_feats`` (N, F) and report top-1 on ``test_feats`` (see module doc)."""
    if train_feats.dim() != 2 or test_feats.dim() != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"linear-eval: features must be N x F with one F, got {tuple(train_feats.shape)} "
                         f"and {tuple(test_feats.shape)}")
    if train_y.shape != (len(train_feats),) or test_y.shape != (len(test_feats),):
        raise ValueError("linear-eval: one label per feature row is needed")
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("num_classes", num_classes)):
        if not (isinstance(v, int) and v > 0):
            raise ValueError(f"linear-eval: {name} must be a positive int, got {v!r}")
    if not lr > 0 or not weight_decay >= 0 or not 0 <= momentum < 1:
        raise ValueError(f"linear-eval: need lr > 0, weight_decay >= 0, 0 <= momentum < 1 "
                         f"(got {lr}, {weight_decay}, {momentum})")
    dev = train_feats.device
    x_tr, x_te = train_feats.float(), test_feats.float().to(dev)
    y_tr, y_te = train_y.to(dev), test_y.to(dev)
    if standardize:
        mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(x_tr.shape[1], device=dev), torch.ones(x_tr.shape[1], device=dev)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std

    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(x_tr.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    head.to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_tr) / batch_size)
    total, step = epochs * steps_per_epoch, 0
    history = []
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(x_tr), generator=gen).to(dev)
        loss_sum = torch.zeros((), device=dev)   # device accumulators: one host sync per epoch
        correct = torch.zeros((), device=dev, dtype=torch.long)
        for idx in perm.split(batch_size):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = head(x_tr[idx])
            loss = F.cross_entropy(logits, y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == y_tr[idx]).sum()
        history.append({"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum.item() / len(x_tr),
                        "train_acc": correct.item() / len(x_tr), "test_acc": _accuracy(head, x_te, y_te, 4096)})
    return LinearEvalResult(history[-1]["test_acc"], history, head, mean, std)
