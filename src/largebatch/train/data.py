"""Datasets as uint8 tensors that live on the training device, plus batched on-device augmentation.

Every loader returns an :class:`ArrayDataset` (``N x C x H x W`` uint8 images, int64 labels). Data
this small (CIFAR: 150 MB) is kept whole on the accelerator, so a training step indexes a tensor
instead of running a DataLoader; augmentation (random crop with 4-pixel zero padding + horizontal
flip, per sample, as in the papers' CIFAR/Tiny ImageNet recipes) runs batched on the same device.

On-disk formats read (no other files are needed):

- ``cifar10`` / ``cifar100``: torchvision's extracted Python pickle batches
  (``cifar-10-batches-py/data_batch_{1..5}, test_batch``; ``cifar-100-python/train, test``).
- ``tinyimagenet``: the standard ``tiny-imagenet-200`` folder (``wnids.txt``,
  ``train/<wnid>/images/*.JPEG``, ``val/images`` + ``val/val_annotations.txt``); the JPEGs are
  decoded once into ``largebatch-cache.npz`` next to them (or under ``~/.cache/largebatch``).
- ``fashion-mnist``: the idx files (``train-images-idx3-ubyte[.gz]`` ...), as torchvision stores
  them under ``FashionMNIST/raw`` or as Debian's ``dataset-fashion-mnist`` installs them in
  ``/usr/share/datasets/fashion-mnist`` (searched automatically).
- ``digits``: scikit-learn's embedded 8x8 digits (always offline); a fixed 80/20 split.

One module for one concept (every on-disk format the harness reads, and the one augmentation);
it is a little over 300 lines because each format's reader is short and they share the
``ArrayDataset`` and channel-statistics code.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def default_root() -> str:
    """``$LARGEBATCH_DATA`` or ``~/.cache/largebatch/data``."""
    return os.path.expanduser(os.environ.get("LARGEBATCH_DATA", "~/.cache/largebatch/data"))


class DatasetNotFound(FileNotFoundError):
    """The dataset is absent (and was not, or could not be, downloaded). The message says where to put it."""


@dataclass
class ArrayDataset:
    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment_default: bool = False

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{self.name}: {split} images must be uint8 N x C x H x W, got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: {split} labels must be int64 of length {x.shape[0]}")
        self.mean, self.std = channel_stats(self.train_x)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "ArrayDataset":
        out = ArrayDataset.__new__(ArrayDataset)
        out.__dict__.update(self.__dict__)
        for k in ("train_x", "train_y", "test_x", "test_y", "mean", "std"):
            setattr(out, k, getattr(self, k).to(device))
        return out


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std of uint8 images in [0, 1] units, accumulated in float64
    over chunks of images (no full-size float copy of the data set)."""
    c = x.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for part in x.split(chunk):
        v = part.transpose(0, 1).reshape(c, -1).double()
        s1 += v.sum(1).cpu()
        s2 += (v * v).sum(1).cpu()
    n = x.numel() // c
    mean = s1 / n
    var = (s2 - n * mean * mean) / max(n - 1, 1)
    return (mean / 255.0).float(), (var.clamp_min(0).sqrt() / 255.0).clamp_min(1e-3).float()


# ----------------------------------------------------------------------------- augmentation
def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float ``(x/255 - mean) / std`` per channel."""
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)
    return torch.addcmul(-shift, x.float(), scale)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None, pad: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Per-sample random crop of the zero-padded image (offsets uniform in [0, 2*pad]) and flip (p=1/2).

    One gather on the device for the whole batch; no host synchronization.
    """
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    oy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    rows = oy + torch.arange(h, device=dev)  # [b, h]
    cols = ox + torch.arange(w, device=dev)  # [b, w]
    if flip:
        do_flip = torch.rand(b, 1, device=dev, generator=generator) < 0.5
        cols = torch.where(do_flip, cols.flip(1), cols)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


# ----------------------------------------------------------------------------- loaders
def load(name: str, root: str | None = None, download: bool = False) -> ArrayDataset:
    """Load dataset ``name`` (see module docstring) as CPU tensors."""
    loaders = {"digits": load_digits, "fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10,
               "cifar100": load_cifar100, "tinyimagenet": load_tinyimagenet}
    if name not in loaders:
        raise ValueError(f"dataset: {name!r} is not one of {', '.join(loaders)}")
    if name == "digits":
        return load_digits()
    return loaders[name](root, download)


def load_digits() -> ArrayDataset:
    """scikit-learn's 1797 8x8 digits (values 0..16 scaled to 0..255), fixed split: 1437 train / 360 test."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(y))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return ArrayDataset("digits", torch.from_numpy(x[tr]), torch.from_numpy(y[tr]),
                        torch.from_numpy(x[te]), torch.from_numpy(y[te]), 10, augment_default=False)


# --- CIFAR ---------------------------------------------------------------------------------
def _read_cifar_batches(folder: str, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for fn in files:
        with open(os.path.join(folder, fn), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _load_cifar(root: str | None, download: bool, n_classes: int) -> ArrayDataset:
    root = root or default_root()
    if n_classes == 10:
        sub, train_files, test_files, key, tv = ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                                                 ["test_batch"], b"labels", "CIFAR10")
    else:
        sub, train_files, test_files, key, tv = "cifar-100-python", ["train"], ["test"], b"fine_labels", "CIFAR100"
    folder = os.path.join(root, sub)
    needed = [os.path.join(folder, f) for f in train_files + test_files]
    if not all(os.path.isfile(p) for p in needed):
        if download:
            import torchvision

            getattr(torchvision.datasets, tv)(root, train=True, download=True)
        else:
            raise DatasetNotFound(
                f"cifar{n_classes}: not found. Put torchvision's extracted folder {sub}/ (files "
                f"{', '.join(train_files + test_files)}) under {root} (--data-dir or $LARGEBATCH_DATA), "
                f"or pass --download.")
    xtr, ytr = _read_cifar_batches(folder, train_files, key)
    xte, yte = _read_cifar_batches(folder, test_files, key)
    return ArrayDataset(f"cifar{n_classes}", torch.from_numpy(xtr), torch.from_numpy(ytr),
                        torch.from_numpy(xte), torch.from_numpy(yte), n_classes, augment_default=True)


def load_cifar10(root: str | None = None, download: bool = False) -> ArrayDataset:
    return _load_cifar(root, download, 10)


def load_cifar100(root: str | None = None, download: bool = False) -> ArrayDataset:
    return _load_cifar(root, download, 100)


# --- Fashion-MNIST ---------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format; gzip if the name ends in .gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {arr.size}")
    return arr.reshape(dims)


_FMNIST = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx(folder: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    return None


def fashion_mnist_candidates(root: str | None) -> list[str]:
    roots = [root] if root else [default_root()]
    out = []
    for r in roots:
        out += [r, os.path.join(r, "FashionMNIST", "raw"), os.path.join(r, "fashion-mnist")]
    out.append(SYSTEM_FASHION_MNIST)
    return out


def find_fashion_mnist(root: str | None = None) -> str | None:
    """The first folder holding all four Fashion-MNIST idx files (root, root/FashionMNIST/raw, the Debian path)."""
    for folder in fashion_mnist_candidates(root):
        if all(_find_idx(folder, s) for s in _FMNIST):
            return folder
    return None


def load_fashion_mnist(root: str | None = None, download: bool = False) -> ArrayDataset:
    folder = find_fashion_mnist(root)
    if folder is None and download:
        import torchvision

        torchvision.datasets.FashionMNIST(root or default_root(), train=True, download=True)
        folder = find_fashion_mnist(root)
    if folder is None:
        raise DatasetNotFound(
            "fashion-mnist: not found. Looked in " + ", ".join(fashion_mnist_candidates(root))
            + f" for {', '.join(_FMNIST)} (optionally .gz). Install the Debian package dataset-fashion-mnist, "
              "put the files in --data-dir, or pass --download.")
    xtr, ytr, xte, yte = (read_idx(_find_idx(folder, s)) for s in _FMNIST)  # type: ignore[arg-type]
    return ArrayDataset("fashion-mnist", torch.from_numpy(xtr[:, None].copy()), torch.from_numpy(ytr.astype(np.int64)),
                        torch.from_numpy(xte[:, None].copy()), torch.from_numpy(yte.astype(np.int64)), 10,
                        augment_default=False)


# --- Tiny ImageNet ---------------------------------------------------------------------------
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _tiny_folder(root: str) -> str:
    for cand in (os.path.join(root, "tiny-imagenet-200"), root):
        if os.path.isfile(os.path.join(cand, "wnids.txt")):
            return cand
    return os.path.join(root, "tiny-imagenet-200")


def _decode(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_tinyimagenet(root: str | None = None, download: bool = False) -> ArrayDataset:
    """Tiny ImageNet 200 (64x64); the validation split (labels in val_annotations.txt) is the test set."""
    root = root or default_root()
    folder = _tiny_folder(root)
    if not os.path.isfile(os.path.join(folder, "wnids.txt")):
        if download:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(TINY_URL, root)
            folder = _tiny_folder(root)
        else:
            raise DatasetNotFound(
                f"tinyimagenet: not found. Put the extracted tiny-imagenet-200/ folder (wnids.txt, "
                f"train/<wnid>/images/*.JPEG, val/images/, val/val_annotations.txt) under {root} "
                f"(--data-dir or $LARGEBATCH_DATA), or pass --download.")
    with open(os.path.join(folder, "wnids.txt")) as f:
        wnids = [line.strip() for line in f if line.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    train = []
    for w in wnids:
        d = os.path.join(folder, "train", w, "images")
        if not os.path.isdir(d):
            raise DatasetNotFound(f"tinyimagenet: missing folder {d}")
        train += [(os.path.join(d, fn), index[w]) for fn in sorted(os.listdir(d))
                  if fn.lower().endswith((".jpeg", ".jpg", ".png"))]
    val = []
    ann = os.path.join(folder, "val", "val_annotations.txt")
    if not os.path.isfile(ann):
        raise DatasetNotFound(f"tinyimagenet: missing {ann}")
    with open(ann) as f:
        for line in f:
            parts = line.strip().split("\t")
            if len(parts) >= 2:
                if parts[1] not in index:
                    raise ValueError(f"tinyimagenet: {ann} names class {parts[1]!r} absent from wnids.txt")
                val.append((os.path.join(folder, "val", "images", parts[0]), index[parts[1]]))
    key = hashlib.sha1("\n".join(p for p, _ in train + val).encode()).hexdigest()[:16]
    cache = _cache_path(folder, key)
    if cache and os.path.isfile(cache):
        z = np.load(cache)
        xtr, ytr, xte, yte = z["xtr"], z["ytr"], z["xte"], z["yte"]
    else:
        xtr = np.stack([_decode(p) for p, _ in train]).transpose(0, 3, 1, 2).copy()
        xte = np.stack([_decode(p) for p, _ in val]).transpose(0, 3, 1, 2).copy()
        ytr = np.array([c for _, c in train], dtype=np.int64)
        yte = np.array([c for _, c in val], dtype=np.int64)
        if cache:
            tmp = cache + ".tmp.npz"
            np.savez(tmp, xtr=xtr, ytr=ytr, xte=xte, yte=yte)
            os.replace(tmp, cache)
    return ArrayDataset("tinyimagenet", torch.from_numpy(xtr), torch.from_numpy(ytr),
                        torch.from_numpy(xte), torch.from_numpy(yte), len(wnids), augment_default=True)


def _cache_path(folder: str, key: str) -> str | None:
    """Decoded-array cache next to the images if writable, else under ~/.cache/largebatch."""
    name = f"largebatch-cache-{key}.npz"
    if os.access(folder, os.W_OK):
        return os.path.join(folder, name)
    alt = os.path.expanduser(os.path.join("~", ".cache", "largebatch"))
    try:
        os.makedirs(alt, exist_ok=True)
    except OSError:
        return None
    return os.path.join(alt, name)
