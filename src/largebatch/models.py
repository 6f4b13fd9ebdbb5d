"""Classifiers used in the papers' experiments, and the weight initialisations of the TVLARS paper's ablation.

- ``resnet18/34/50``: torchvision's ResNets with either the ImageNet stem (7x7 stride-2 conv +
  max-pool; what the TVLARS authors used on CIFAR) or the CIFAR stem (3x3 stride-1 conv, no
  max-pool; He et al. 2016, Sec. 4.2 practice).
- ``resnet20/32/44/56``: the small CIFAR ResNets of He et al. 2016 (Sec. 4.2: 3 stages of
  16/32/64 channels, ``n = (depth-2)/6`` basic blocks each), built from torchvision's
  ``BasicBlock`` with 1x1-conv projection shortcuts (option B).
- ``mlp``: Flatten -> [Linear -> BatchNorm1d -> activation] x depth -> Linear.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tvr

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU,
                "leaky_relu": nn.LeakyReLU, "identity": nn.Identity}


class MLP(nn.Sequential):
    """Flatten -> [Linear -> (BatchNorm1d) -> act] x ``depth`` -> Linear(num_classes)."""

    def __init__(self, in_features: int, num_classes: int, depth: int = 3, width: int = 256,
                 activation: str = "relu", batchnorm: bool = True):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: {activation!r} is not one of {', '.join(_ACTIVATIONS)}")
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for _ in range(depth):
            layers.append(nn.Linear(d, width, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(_ACTIVATIONS[activation]())
            d = width
        layers.append(nn.Linear(d, num_classes))
        super().__init__(*layers)


class CifarResNet(nn.Module):
    """He et al. 2016 Sec. 4.2 CIFAR ResNet (depth 6n+2) from torchvision BasicBlocks."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"model: CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 16
        self.layer1 = self._stage(16, n, 1)
        self.layer2 = self._stage(32, n, 2)
        self.layer3 = self._stage(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # torchvision's ResNet default init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            down = None
            if s != 1 or self.inplanes != planes:
                down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, s, bias=False), nn.BatchNorm2d(planes))
            layers.append(tvr.BasicBlock(self.inplanes, planes, s, down))
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(name: str, num_classes: int, in_shape: tuple[int, int, int], *, stem: str = "cifar",
                mlp_depth: int = 3, mlp_width: int = 256, activation: str = "relu",
                mlp_batchnorm: bool = True) -> nn.Module:
    """Build classifier ``name`` for inputs of shape ``in_shape`` (C, H, W)."""
    c, h, w = in_shape
    if name == "mlp":
        return MLP(c * h * w, num_classes, mlp_depth, mlp_width, activation, mlp_batchnorm)
    if name in ("resnet20", "resnet32", "resnet44", "resnet56"):
        return CifarResNet(int(name[6:]), num_classes, c)
    if name in ("resnet18", "resnet34", "resnet50"):
        model = getattr(tvr, name)(weights=None, num_classes=num_classes)
        if stem == "cifar":
            model.conv1 = nn.Conv2d(c, 64, 3, 1, 1, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
            model.maxpool = nn.Identity()
        elif stem == "imagenet-nopool":  # LALC App. B: "the first pooling layer and stride ... removed"
            model.conv1 = nn.Conv2d(c, 64, 7, 1, 3, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
            model.maxpool = nn.Identity()
        elif stem == "imagenet":
            if c != 3:
                model.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
                nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        else:
            raise ValueError(f"stem: {stem!r} is not one of cifar, imagenet, imagenet-nopool")
        return model
    raise ValueError(f"model: {name!r} is not one of mlp, resnet20/32/44/56, resnet18/34/50")


def init_weights(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise every Conv/Linear weight with ``scheme`` and zero its bias (the TVLARS paper's init ablation).

    ``default`` leaves the framework's initialisation alone. Kaiming variants use fan_in and the
    ReLU gain (He et al. 2015); Xavier variants the unit gain (Glorot & Bengio 2010).
    BatchNorm scales/shifts keep 1/0.
    """
    fns = {
        "xavier_uniform": nn.init.xavier_uniform_,
        "xavier_normal": nn.init.xavier_normal_,
        "kaiming_uniform": lambda t: nn.init.kaiming_uniform_(t, nonlinearity="relu"),
        "kaiming_normal": lambda t: nn.init.kaiming_normal_(t, nonlinearity="relu"),
    }
    if scheme == "default":
        return model
    if scheme not in fns:
        raise ValueError(f"init: {scheme!r} is not one of default, {', '.join(fns)}")
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            fns[scheme](m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
