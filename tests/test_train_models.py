"""Model shapes, stems and weight initialisations."""

import math

import pytest
import torch
from torch import nn

from largebatch.models import MLP, build_model, init_weights


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("name,stem", [("resnet18", "cifar"), ("resnet18", "imagenet"), ("resnet34", "cifar"),
                                       ("resnet50", "cifar"), ("resnet50", "imagenet"), ("resnet20", "cifar"),
                                       ("mlp", "cifar")])
def test_output_shape(name, stem):
    torch.manual_seed(0)
    m = build_model(name, 7, (3, 16, 16), stem=stem, mlp_depth=2, mlp_width=16).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 16, 16)).shape == (1, 7)


def test_stems():
    cifar = build_model("resnet18", 10, (3, 32, 32), stem="cifar")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1) and isinstance(cifar.maxpool, nn.Identity)
    imnet = build_model("resnet18", 10, (3, 32, 32), stem="imagenet")
    assert imnet.conv1.kernel_size == (7, 7) and imnet.conv1.stride == (2, 2) and isinstance(imnet.maxpool, nn.MaxPool2d)
    gray = build_model("resnet18", 10, (1, 28, 28), stem="cifar")
    assert gray.conv1.in_channels == 1
    # CIFAR stem keeps 32x32 resolution into layer1; ImageNet stem reduces it to 8x8.
    with torch.no_grad():
        assert cifar.maxpool(cifar.conv1(torch.zeros(1, 3, 32, 32))).shape[-1] == 32
        assert imnet.maxpool(imnet.conv1(torch.zeros(1, 3, 32, 32))).shape[-1] == 8


def test_resnet20_size_matches_he_et_al():
    n = sum(p.numel() for p in build_model("resnet20", 10, (3, 32, 32)).parameters())
    assert 0.26e6 < n < 0.28e6  # He et al. 2016 Table 6: 0.27M
    blocks = [m for m in build_model("resnet32", 10, (3, 32, 32)).modules() if m.__class__.__name__ == "BasicBlock"]
    assert len(blocks) == 15


def test_mlp_structure():
    m = build_model("mlp", 10, (1, 8, 8), mlp_depth=3, mlp_width=40, activation="tanh")
    lin = [x for x in m if isinstance(x, nn.Linear)]
    assert [l.in_features for l in lin] == [64, 40, 40, 40] and lin[-1].out_features == 10
    assert sum(isinstance(x, nn.BatchNorm1d) for x in m) == 3 and sum(isinstance(x, nn.Tanh) for x in m) == 3
    plain = MLP(64, 10, depth=2, width=8, batchnorm=False)
    assert not any(isinstance(x, nn.BatchNorm1d) for x in plain) and all(l.bias is not None for l in plain if isinstance(l, nn.Linear))
    with pytest.raises(ValueError, match="activation"):
        MLP(4, 2, activation="swishy")


@pytest.mark.parametrize("scheme,std_fn", [
    ("xavier_uniform", lambda fi, fo: math.sqrt(2.0 / (fi + fo))),
    ("xavier_normal", lambda fi, fo: math.sqrt(2.0 / (fi + fo))),
    ("kaiming_uniform", lambda fi, fo: math.sqrt(2.0 / fi)),
    ("kaiming_normal", lambda fi, fo: math.sqrt(2.0 / fi)),
])
def test_init_std(scheme, std_fn):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(400, 300), nn.Conv2d(8, 16, 3))
    init_weights(m, scheme)
    lin, conv = m[0], m[1]
    assert abs(lin.weight.std().item() / std_fn(400, 300) - 1) < 0.03
    assert abs(conv.weight.std().item() / std_fn(8 * 9, 16 * 9) - 1) < 0.1
    assert torch.count_nonzero(lin.bias) == 0 and torch.count_nonzero(conv.bias) == 0
    if scheme.endswith("uniform"):
        bound = std_fn(400, 300) * math.sqrt(3)
        assert lin.weight.abs().max() <= bound + 1e-6


def test_init_default_keeps_weights_and_rejects_unknown():
    torch.manual_seed(0)
    m = build_model("resnet20", 10, (3, 32, 32))
    before = [p.clone() for p in m.parameters()]
    init_weights(m, "default")
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    init_weights(m, "xavier_normal")
    assert not torch.equal(before[0], next(m.parameters()))
    bn = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)][0]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    with pytest.raises(ValueError, match="init"):
        init_weights(m, "orthogonal")
