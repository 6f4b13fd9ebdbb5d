"""Frozen-feature extraction and the weighted k-nearest-neighbour monitor of SSL pre-training.

The kNN classifier of Wu et al. 2018 (InstDisc, Sec. 3.4), as in common CIFAR benchmarks
(solo-learn, the MoCo CIFAR demo): cosine similarity of L2-normalized features, the ``k = 200``
nearest training samples vote for their class with weight ``exp(sim / T)``, ``T = 0.1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["extract_features", "knn_predict", "knn_accuracy"]


@torch.no_grad()
def extract_features(backbone: nn.Module, x: Tensor, mean: Tensor, std: Tensor, batch_size: int = 512,
                     device: torch.device | str | None = None) -> Tensor:
    """Features of uint8 images ``x`` (N, C, H, W) normalized with per-channel ``mean``/``std`` (in [0, 1]
    units), in eval mode (the module's mode is restored) and without gradients: float32 (N, F) on
    ``device`` (default: the backbone's)."""
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"extract_features: expected uint8 N x C x H x W images, got {x.dtype} {tuple(x.shape)}")
    if device is None:
        device = next(backbone.parameters()).device
    dtype = next(backbone.parameters()).dtype
    m = mean.to(device, dtype).view(1, -1, 1, 1)
    s = std.to(device, dtype).view(1, -1, 1, 1)
    was_training = backbone.training
    backbone.eval()
    try:
        out = [backbone((part.to(device).to(dtype) / 255 - m) / s).float() for part in x.split(batch_size)]
    finally:
        backbone.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_predict(train_feats: Tensor, train_y: Tensor, query_feats: Tensor, num_classes: int, k: int = 200,
                temperature: float = 0.1, chunk_size: int = 1024) -> Tensor:
    """Weighted-vote kNN class predictions for ``query_feats``; ``chunk_size`` queries at a time bound the
    similarity matrix to ``chunk_size x N_train``. ``k`` larger than the training set uses all of it."""
    if not (isinstance(k, int) and k > 0):
        raise ValueError(f"knn: k must be a positive int, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"knn: temperature must be > 0, got {temperature!r}")
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_y.to(train.device)
    k = min(k, train.shape[0])
    preds = []
    for q in query_feats.split(chunk_size):
        sim = F.normalize(q.to(train.device).float(), dim=1) @ train.T
        top_sim, idx = sim.topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_feats: Tensor, train_y: Tensor, test_feats: Tensor, test_y: Tensor, num_classes: int,
                 k: int = 200, temperature: float = 0.1, chunk_size: int = 1024) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of :func:`knn_predict` on ``test_feats``."""
    pred = knn_predict(train_feats, train_y, test_feats, num_classes, k, temperature, chunk_size)
    return (pred == test_y.to(pred.device)).float().mean().item()
