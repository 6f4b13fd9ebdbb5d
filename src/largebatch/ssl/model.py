"""Barlow Twins network: a backbone without its classification head, a projector, the loss (docs/algorithms.md section 11).

The backbones are the harness's classifiers (``largebatch.models.build_model``: MLP, CIFAR
ResNet-20/32/44/56, torchvision ResNet-18/34/50 with either stem) with the head, the last
``nn.Linear`` (``fc`` of the ResNets, the last layer of the ``MLP``), replaced by ``nn.Identity``:
the backbone outputs the pooled features the head would have seen.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .._validation import check_nonneg
from ..models import build_model
from .loss import barlow_twins_loss

__all__ = ["Projector", "parse_projector", "BarlowTwins", "feature_backbone", "build_backbone"]


def parse_projector(dims: str | Sequence[int]) -> tuple[int, ...]:
    """``"2048-2048-4096"`` or a sequence of ints -> a tuple of positive layer widths."""
    if isinstance(dims, str):
        try:
            dims = [int(d) for d in dims.split("-")]
        except ValueError:
            raise ValueError(f"projector: {dims!r} is not a dash-separated list of layer widths "
                             f"such as 2048-2048-4096") from None
    dims = tuple(dims)
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ValueError(f"projector: expected one or more positive int layer widths, got {dims!r}")
    return dims


class Projector(nn.Sequential):
    """``Linear(in, d1) BN ReLU ... Linear(d_{k-1}, d_k)`` (docs/algorithms.md section 11; the reference's projector): BatchNorm and
    ReLU after every layer but the last. Linear layers have no bias where BatchNorm follows, nor the last
    (the loss standardizes each dimension, so a bias there has no effect), as in the reference.
    ``batchnorm=False`` drops the BatchNorms (hidden layers then get a bias).
    """

    def __init__(self, in_dim: int, dims: str | Sequence[int] = (2048, 2048, 4096), batchnorm: bool = True):
        if not (isinstance(in_dim, int) and not isinstance(in_dim, bool) and in_dim > 0):
            raise ValueError(f"projector: input width must be a positive int, got {in_dim!r}")
        sizes = (in_dim, *parse_projector(dims))
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers.append(nn.Linear(a, b, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        super().__init__(*layers)
        self.out_dim = sizes[-1]


class BarlowTwins(nn.Module):
    """``backbone -> projector -> barlow_twins_loss`` (Zbontar et al. 2021, Fig. 1).

    ``forward(v1, v2)`` is the loss of two views (each view through the network separately, so
    BatchNorm sees one view at a time, as in the reference); ``embed(x)`` the embeddings ``z``;
    ``loss(z1, z2)`` the loss of given embeddings (on the global batch under ``torch.distributed``,
    in ``group``).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, projector_dims: str | Sequence[int] = (2048, 2048, 4096),
                 lambd: float = 0.0051, projector_batchnorm: bool = True, group=None):
        super().__init__()
        check_nonneg("lambd", lambd)
        self.backbone = backbone
        self.projector = Projector(feature_dim, projector_dims, projector_batchnorm)
        self.lambd = float(lambd)
        self.group = group

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        return barlow_twins_loss(z1, z2, self.lambd, self.group)

    def forward(self, v1: Tensor, v2: Tensor) -> Tensor:
        return self.loss(self.embed(v1), self.embed(v2))


def feature_backbone(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the classification head of a harness classifier by ``nn.Identity`` (in place).

    Returns ``(model, feature_dim)``. The head is ``model.fc`` (ResNets) or the last layer of an
    ``nn.Sequential`` (``MLP``), an ``nn.Linear``.
    """
    if isinstance(getattr(model, "fc", None), nn.Linear):
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return model, dim
    if isinstance(model, nn.Sequential) and len(model) and isinstance(model[-1], nn.Linear):
        dim = model[-1].in_features
        model[-1] = nn.Identity()
        return model, dim
    raise ValueError(f"backbone: cannot find the classification head of {type(model).__name__} "
                     f"(expected an nn.Linear as .fc or as the last layer of an nn.Sequential)")


def build_backbone(name: str, in_shape: tuple[int, int, int], **kwargs) -> tuple[nn.Module, int]:
    """``build_model(name, ...)`` of the harness without its head: ``(backbone, feature_dim)``.
    ``kwargs`` go to ``build_model`` (``stem``, ``mlp_depth``, ``mlp_width``, ...)."""
    return feature_backbone(build_model(name, 10, in_shape, **kwargs))
