"""Small self-contained test architectures for the explosion analysis (LALC paper, Fig. 1).

Every model returns the output of its last normalization layer, so that a loss built on a
random projection of that output has an upstream gradient independent of the input
(Theorem 1's assumption). The normalized blocks are the ``nn.BatchNorm*`` / ``nn.LayerNorm``
modules, found by :func:`norm_modules` in forward order.

* ``mlp-bn``: ``x^{n+1} = BN(W^n f(x^n))`` (Theorem 1's repetitive block), stem ``BN(W^0 x)``.
* ``mlp-ln``: the same with ``LayerNorm``.
* ``vgg-bn``: ``conv3x3 -> BN -> f`` layers in three stages (width ``w, 2w, 4w``, 2x2
  max-pooling between stages), the paper's "VGG-like" net of Fig. 1b (51 layers there).
* ``resnet-bn``: CIFAR-style ResNet of basic blocks ``f(x + BN(conv(f(BN(conv(x))))))``,
  three stages; ``depth`` is the number of residual blocks.
* ``transformer-ln``: pre-LN ``nn.TransformerEncoderLayer`` stack with a final ``LayerNorm``.
"""

from __future__ import annotations

from torch import nn

from .names import ACTIVATIONS, ARCHITECTURES
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def make_activation(name: str) -> nn.Module:
    """The Fig. 1b activation set (plus tanh). ``dropout`` is ``nn.Dropout(0.5)`` used as the
    activation (it must run in train mode), ``identity`` is no activation."""
    table = {
        "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "selu": nn.SELU,
        "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus,
        "dropout": lambda: nn.Dropout(0.5), "identity": nn.Identity, "tanh": nn.Tanh,
    }
    if name not in table:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}")
    return table[name]()


def _check_pos(**kw):
    for k, v in kw.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be an integer >= 1, got {v!r}")


def _check_stages(arch: str, depth: int, width: int, in_channels: int) -> None:
    _check_pos(depth=depth, width=width, in_channels=in_channels)
    if depth < 3:
        raise ValueError(f"depth must be >= 3 for {arch} (three stages), got {depth}")


class NormMLP(nn.Module):
    """``depth`` repetitive blocks ``x^{n+1} = Norm(W^n f(x^n))`` after a stem ``Norm(W^0 x)``."""

    def __init__(self, in_dim: int, width: int, depth: int, act: str = "relu", norm: str = "bn"):
        super().__init__()
        _check_pos(in_dim=in_dim, width=width, depth=depth)
        if norm not in ("bn", "ln"):
            raise ValueError(f"norm must be 'bn' or 'ln', got {norm!r}")
        mk = (lambda: nn.BatchNorm1d(width)) if norm == "bn" else (lambda: nn.LayerNorm(width))
        self.stem = nn.Sequential(nn.Linear(in_dim, width, bias=False), mk())
        self.blocks = nn.Sequential(*[
            nn.Sequential(make_activation(act), nn.Linear(width, width, bias=False), mk())
            for _ in range(depth)
        ])

    def forward(self, x):
        return self.blocks(self.stem(x))


class VGGBN(nn.Module):
    """VGG-like stack of ``depth`` ``conv3x3 -> BN -> f`` layers in three stages."""

    def __init__(self, depth: int, width: int = 16, act: str = "relu", in_channels: int = 3):
        super().__init__()
        _check_stages("vgg-bn", depth, width, in_channels)
        per = [depth // 3 + (1 if i < depth % 3 else 0) for i in range(3)]
        layers, c_in = [], in_channels
        for s, n in enumerate(per):
            c_out = width * 2 ** s
            if s > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(n):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                           make_activation(act)]
                c_in = c_out
        layers.pop()  # the output is the last BN's output
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


class BasicBlock(nn.Module):
    """ResNet v1 basic block ``f(shortcut(x) + BN(conv(f(BN(conv(x))))))``."""

    def __init__(self, c_in: int, c_out: int, stride: int, act: str, last: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = make_activation(act)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.act2 = nn.Identity() if last else make_activation(act)

    def forward(self, x):
        return self.act2(self.shortcut(x) + self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


class ResNetBN(nn.Module):
    """CIFAR-style ResNet: stem ``conv-BN-f`` then ``depth`` basic blocks in three stages."""

    def __init__(self, depth: int, width: int = 16, act: str = "relu", in_channels: int = 3):
        super().__init__()
        _check_stages("resnet-bn", depth, width, in_channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), make_activation(act))
        per = [depth // 3 + (1 if i < depth % 3 else 0) for i in range(3)]
        blocks, c_in = [], width
        for s, n in enumerate(per):
            for k in range(n):
                c_out = width * 2 ** s
                last = s == 2 and k == n - 1
                blocks.append(BasicBlock(c_in, c_out, 2 if (s > 0 and k == 0) else 1, act, last))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(self.stem(x))


class TransformerLN(nn.Module):
    """Pre-LN transformer encoder stack (``norm_first=True``) with a final ``LayerNorm``."""

    def __init__(self, in_dim: int, width: int, depth: int, act: str = "gelu", heads: int = 4):
        super().__init__()
        _check_pos(in_dim=in_dim, width=width, depth=depth, heads=heads)
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.embed = nn.Linear(in_dim, width)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation=make_activation(act),
                                       batch_first=True, norm_first=True)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


def build(arch: str, depth: int, width: int, act: str = "relu", in_dim: int = 64,
          image_size: int = 16, seq_len: int = 16) -> tuple[nn.Module, tuple[int, ...]]:
    """Build ``arch`` and return ``(model, per-sample input shape)``."""
    if arch == "mlp-bn":
        return NormMLP(in_dim, width, depth, act, "bn"), (in_dim,)
    if arch == "mlp-ln":
        return NormMLP(in_dim, width, depth, act, "ln"), (in_dim,)
    if arch == "vgg-bn":
        return VGGBN(depth, width, act), (3, image_size, image_size)
    if arch == "resnet-bn":
        return ResNetBN(depth, width, act), (3, image_size, image_size)
    if arch == "transformer-ln":
        return TransformerLN(in_dim, width, depth, act), (seq_len, in_dim)
    raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}; got {arch!r}")


def norm_modules(model: nn.Module, types=NORM_TYPES) -> list[tuple[str, nn.Module]]:
    """Normalization modules of ``model`` in registration order, as ``(name, module)``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
