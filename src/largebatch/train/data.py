"""Datasets as uint8 tensors that live on the training device, plus batched on-device augmentation.

Every loader returns an :class:`ArrayDataset` (``N x C x H x W`` uint8 images, int64 labels). Data
this small (CIFAR: 150 MB) is kept whole on the accelerator, so a training step indexes a tensor
instead of running a DataLoader; augmentation (random crop with 4-pixel zero padding + horizontal
flip, per sample, as in the papers' CIFAR/Tiny ImageNet recipes) runs batched on the same device.

On-disk formats read (no other files are needed):

- ``cifar10`` / ``cifar100``: torchvision's extracted Python pickle batches
  (``cifar-10-batches-py/data_batch_{1..5}, test_batch``; ``cifar-100-python/train, test``), each a dict
  with ``b"data"`` (N x 3072 uint8 rows, 3x32x32) and ``b"labels"`` / ``b"fine_labels"``.
- ``tinyimagenet``: the standard ``tiny-imagenet-200`` folder (``wnids.txt``,
  ``train/<wnid>/images/*.JPEG``, ``val/images`` + ``val/val_annotations.txt``); the JPEGs are
  decoded once into a cache (see below).
- ``fashion-mnist``: the idx files (``train-images-idx3-ubyte[.gz]`` ...), as torchvision stores
  them under ``FashionMNIST/raw`` or as Debian's ``dataset-fashion-mnist`` installs them in
  ``/usr/share/datasets/fashion-mnist`` (searched automatically).
- ``mnist``: LeCun's idx files, as torchvision stores them (``MNIST/raw``) or in the root / ``mnist/``.
- ``fashion-mnist-val``: Fashion-MNIST's training set split 50,000 / 10,000 (fixed permutation) for tuning
  without reading the test set (the held-out 10,000 are its "test" split).
- ``digits``: scikit-learn's embedded 8x8 digits (always offline); a fixed 80/20 split.
- ``imagenet``: torchvision's ``ImageFolder`` layout (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``). The
  one dataset not held in memory (1.28M images at 224 x 224 would take 193 GB): its splits are
  :class:`ImageFiles`, decoded on demand with the papers' transforms (``RandomResizedCrop(224)`` + flip for
  training, ``Resize(256)`` + ``CenterCrop(224)`` for evaluation) and ImageNet's mean/std.

Damaged or inconsistent files (a truncated pickle or gzip, an idx header that does not match its data,
an undecodable or differently sized JPEG, a label outside ``0..num_classes-1`` in any split) raise
:class:`DataError`, a ``ValueError`` whose one-line message names the file and says what to do
(``largebatch train`` prints it and exits 2); a missing dataset raises :class:`DatasetNotFound`.

Tiny ImageNet cache: one file per image folder, ``largebatch-cache.npz`` inside the resolved
``tiny-imagenet-200`` folder (or, if that is read-only, ``~/.cache/largebatch/tinyimagenet-<hash of the
folder's real path>.npz``). It stores the decoded arrays and a key: the SHA-1 of every image's real path,
size, mtime (ns) and label. A load recomputes the key (one ``stat`` per image, no reading) and uses the
cache only if the stored key matches; otherwise it decodes again and replaces the file atomically
(written to a uniquely named temporary file next to it, then ``os.replace``), so an image replaced in
place invalidates it, relative/absolute/symlinked ``--data-dir`` spellings share it, and stale copies
never accumulate (the per-key ``largebatch-cache-<hash>.npz`` files of earlier versions are removed when
a cache is written). A cache that cannot be read (truncated, not a zip) is treated as absent, with a
one-line warning on stderr; one that cannot be written only costs a warning.

One module for one concept (every on-disk format the harness reads, and the one augmentation);
it is long because each format's reader, with its checks, is short and they share the
``ArrayDataset``, label-range and channel-statistics code.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
import sys
import uuid
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import safefile

SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def default_root() -> str:
    """``$LARGEBATCH_DATA`` or ``~/.cache/largebatch/data``."""
    return os.path.expanduser(os.environ.get("LARGEBATCH_DATA", "~/.cache/largebatch/data"))


class DatasetNotFound(FileNotFoundError):
    """The dataset is absent (and was not, or could not be, downloaded). The message says where to put it."""


class DataError(ValueError):
    """A dataset file is present but unusable: truncated, damaged, inconsistent with its header or the
    other files, or holding a label out of range. The one-line message names the file and says what to do."""


def _check_labels(y: np.ndarray, n_classes: int, path: str, advice: str) -> None:
    """Every label in ``0..n_classes-1``, else :class:`DataError` naming ``path`` and the first bad value."""
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: label {int(y[i])} (entry {i}) is outside 0..{n_classes - 1} for {n_classes} "
                        f"classes ({int(bad.sum())} of {y.size} labels out of range); {advice}")


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
            lo, hi = (int(y.min()), int(y.max())) if y.numel() else (0, 0)
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"{self.name}: {split} labels must be in 0..{self.num_classes - 1}, "
                                 f"found {lo if lo < 0 else hi}")
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


#: fixed input normalizations (mean, std per channel) a run may ask for instead of the data's own
NORMALIZATIONS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))}  # LALC App. B


def with_normalization(ds: "ArrayDataset", name: str) -> "ArrayDataset":
    """``ds`` (a copy) normalized with ``name``'s constants; ``data`` keeps the data's own statistics."""
    if name == "data":
        return ds
    mean, std = NORMALIZATIONS[name]
    if ds.shape[0] != len(mean):
        raise ValueError(f"normalize: {name} is for {len(mean)}-channel images, {ds.name} has {ds.shape[0]} channel(s); "
                         "use normalize: data")
    out = ArrayDataset.__new__(ArrayDataset)
    out.__dict__.update(ds.__dict__)
    out.mean = torch.tensor(mean, device=ds.train_x.device)
    out.std = torch.tensor(std, device=ds.train_x.device)
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
    loaders = {"digits": load_digits, "fashion-mnist": load_fashion_mnist, "fashion-mnist-val": load_fashion_mnist_val,
               "mnist": load_mnist, "cifar10": load_cifar10, "cifar100": load_cifar100,
               "tinyimagenet": load_tinyimagenet, "imagenet": load_imagenet}
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
def _read_cifar_batch(path: str, label_key: bytes, n_classes: int, advice: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch: images ``N x 3 x 32 x 32`` uint8 and labels int64, checked (DataError naming ``path``)."""
    try:
        with open(path, "rb") as f:  # arrays, lists, bytes only: a pickle that would run code is refused
            d = safefile.restricted_unpickle(f, safefile.numpy_array_globals(), encoding="bytes")
    except OSError:
        raise
    except Exception as e:  # truncated/garbage pickles raise UnpicklingError, EOFError, KeyError, ValueError ...
        raise DataError(f"{path}: not a readable pickle batch ({type(e).__name__}: {e}); {advice}") from None
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        found = sorted(map(repr, d))[:8] if isinstance(d, dict) else f"a {type(d).__name__}"
        raise DataError(f"{path}: expected a dict with b'data' and {label_key!r}, found {found}; {advice}")
    try:
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: b'data' or {label_key!r} is not numeric ({e}); {advice}") from None
    if x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[1] != 3072) or x.size % 3072:
        raise DataError(f"{path}: b'data' has shape {x.shape}, expected rows of 3072 values (3x32x32); {advice}")
    x = x.reshape(-1, 3, 32, 32)
    if y.shape != (x.shape[0],):
        raise DataError(f"{path}: {y.size} labels for {x.shape[0]} images; {advice}")
    _check_labels(y, n_classes, path, advice)
    return x, y


def _read_cifar_batches(folder: str, files: list[str], label_key: bytes, n_classes: int,
                        advice: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*(_read_cifar_batch(os.path.join(folder, fn), label_key, n_classes, advice) for fn in files))
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
    archive = "cifar-10-python.tar.gz" if n_classes == 10 else "cifar-100-python.tar.gz"
    advice = f"the file is damaged: delete {folder} and extract {archive} again (or pass --download)"
    xtr, ytr = _read_cifar_batches(folder, train_files, key, n_classes, advice)
    xte, yte = _read_cifar_batches(folder, test_files, key, n_classes, advice)
    return ArrayDataset(f"cifar{n_classes}", torch.from_numpy(xtr), torch.from_numpy(ytr),
                        torch.from_numpy(xte), torch.from_numpy(yte), n_classes, augment_default=True)


def load_cifar10(root: str | None = None, download: bool = False) -> ArrayDataset:
    return _load_cifar(root, download, 10)


def load_cifar100(root: str | None = None, download: bool = False) -> ArrayDataset:
    return _load_cifar(root, download, 100)


# --- Fashion-MNIST ---------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """Read a uint8 idx file (LeCun's MNIST format; gzip if the name ends in .gz); DataError if damaged."""
    advice = _idx_advice(path)
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not gzip, cut short, corrupt stream
        raise DataError(f"{path}: not a complete gzip file ({e}); {advice}") from None
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an idx header; {advice}")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        hint = " (gzip data: name it .gz)" if data[:2] == b"\x1f\x8b" else ""
        raise DataError(f"{path}: not a uint8 idx file (magic {data[:4].hex()}, expected 000008xx){hint}; {advice}")
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: idx header cut short ({len(data)} bytes for {ndim} dimensions); {advice}")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {arr.size}; {advice}")
    return arr.reshape(dims)


def _idx_advice(path: str) -> str:
    if os.path.abspath(path).startswith(SYSTEM_FASHION_MNIST + os.sep):
        return "the file is damaged: reinstall it (apt-get install --reinstall dataset-fashion-mnist)"
    return "the file is damaged: delete it and download it again (--download fetches it)"


_FMNIST = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: idx datasets: name -> (torchvision class, its folder under the root, another usual folder)
_IDX_DATASETS = {"fashion-mnist": ("FashionMNIST", "fashion-mnist"), "mnist": ("MNIST", "mnist")}


def _find_idx(folder: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    return None


def idx_candidates(name: str, root: str | None) -> list[str]:
    """Folders searched for the idx files of ``name`` (``fashion-mnist`` or ``mnist``): the root, torchvision's
    ``<root>/<Class>/raw``, ``<root>/<name>`` (and, for Fashion-MNIST, the Debian path)."""
    tv, sub = _IDX_DATASETS[name]
    r = root or default_root()
    out = [r, os.path.join(r, tv, "raw"), os.path.join(r, sub)]
    if name == "fashion-mnist":
        out.append(SYSTEM_FASHION_MNIST)
    return out


def fashion_mnist_candidates(root: str | None) -> list[str]:
    return idx_candidates("fashion-mnist", root)


def find_idx_folder(name: str, root: str | None = None) -> str | None:
    """The first candidate folder holding all four idx files of ``name``."""
    for folder in idx_candidates(name, root):
        if all(_find_idx(folder, s) for s in _FMNIST):
            return folder
    return None


def find_fashion_mnist(root: str | None = None) -> str | None:
    """The first folder holding all four Fashion-MNIST idx files (root, root/FashionMNIST/raw, the Debian path)."""
    return find_idx_folder("fashion-mnist", root)


def _load_idx(name: str, root: str | None, download: bool) -> tuple[np.ndarray, ...]:
    """(train images, train labels, test images, test labels) of an idx dataset, checked."""
    folder = find_idx_folder(name, root)
    if folder is None and download:
        import torchvision

        getattr(torchvision.datasets, _IDX_DATASETS[name][0])(root or default_root(), train=True, download=True)
        folder = find_idx_folder(name, root)
    if folder is None:
        install = "Install the Debian package dataset-fashion-mnist, put" if name == "fashion-mnist" else "Put"
        raise DatasetNotFound(
            f"{name}: not found. Looked in " + ", ".join(idx_candidates(name, root))
            + f" for {', '.join(_FMNIST)} (optionally .gz). {install} the files in --data-dir, or pass --download.")
    paths: list[str] = [_find_idx(folder, s) for s in _FMNIST]  # type: ignore[misc]
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)
    advice = _idx_advice(paths[0])
    for (x, px), (y, py) in (((xtr, paths[0]), (ytr, paths[1])), ((xte, paths[2]), (yte, paths[3]))):
        if x.ndim != 3:
            raise DataError(f"{px}: images must be N x H x W, found shape {x.shape}; {advice}")
        if y.ndim != 1:
            raise DataError(f"{py}: labels must be 1-D, found shape {y.shape}; {advice}")
        if len(y) != len(x):
            raise DataError(f"{py}: {len(y)} labels for the {len(x)} images of {px}; {advice}")
        _check_labels(y, 10, py, advice)
    if xte.shape[1:] != xtr.shape[1:]:
        raise DataError(f"{paths[2]}: images are {xte.shape[1]}x{xte.shape[2]}, the training images "
                        f"({paths[0]}) {xtr.shape[1]}x{xtr.shape[2]}; {advice}")
    return xtr, ytr, xte, yte


def _idx_dataset(name: str, xtr, ytr, xte, yte) -> ArrayDataset:
    return ArrayDataset(name, torch.from_numpy(xtr[:, None].copy()), torch.from_numpy(ytr.astype(np.int64)),
                        torch.from_numpy(xte[:, None].copy()), torch.from_numpy(yte.astype(np.int64)), 10,
                        augment_default=False)


def load_fashion_mnist(root: str | None = None, download: bool = False) -> ArrayDataset:
    return _idx_dataset("fashion-mnist", *_load_idx("fashion-mnist", root, download))


def load_mnist(root: str | None = None, download: bool = False) -> ArrayDataset:
    """LeCun's MNIST from torchvision's idx files (``<root>/MNIST/raw``, ``<root>/mnist`` or the root)."""
    return _idx_dataset("mnist", *_load_idx("mnist", root, download))


#: held-out images of ``fashion-mnist-val``
VALIDATION_SIZE = 10_000


def load_fashion_mnist_val(root: str | None = None, download: bool = False) -> ArrayDataset:
    """Fashion-MNIST's *training* set split for tuning: a fixed permutation (seed 0) keeps 50,000 images for
    training and holds out 10,000 as the "test" split. The real test set is not read."""
    xtr, ytr, _, _ = _load_idx("fashion-mnist", root, download)
    perm = np.random.RandomState(0).permutation(len(ytr))
    va, tr = perm[:VALIDATION_SIZE], perm[VALIDATION_SIZE:]
    return _idx_dataset("fashion-mnist-val", xtr[tr], ytr[tr], xtr[va], ytr[va])


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


def _decode_all(paths: list[str], advice: str, size: tuple[int, int] | None = None,
                size_of: str = "") -> np.ndarray:
    """Decode images into one ``N x 3 x H x W`` uint8 array. Every image must be ``size`` (default: the
    first image's size); DataError naming the image otherwise, or if it cannot be decoded."""
    out = np.empty((len(paths), 3, *(size or (0, 0))), np.uint8)
    for i, p in enumerate(paths):
        try:
            im = _decode(p)
        except FileNotFoundError:
            raise DatasetNotFound(f"tinyimagenet: missing image {p}; {advice}") from None
        except Exception as e:  # PIL: UnidentifiedImageError, "image file is truncated", ... (OSError, ValueError)
            raise DataError(f"tinyimagenet: cannot decode {p} ({type(e).__name__}: {e}); {advice}") from None
        if size is None:
            size, size_of = im.shape[:2], p
            out = np.empty((len(paths), 3, *size), np.uint8)
        elif im.shape[:2] != tuple(size):
            raise DataError(f"tinyimagenet: {p} is {im.shape[1]}x{im.shape[0]} pixels, but {size_of} is "
                            f"{size[1]}x{size[0]}; {advice}")
        out[i] = im.transpose(2, 0, 1)
    return out


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
    folder = os.path.realpath(folder)  # every path below (and so the cache key) is absolute and resolved
    advice = f"replace that file, or delete {folder} and extract tiny-imagenet-200.zip again (--download fetches it)"
    with open(os.path.join(folder, "wnids.txt")) as f:
        wnids = [line.strip() for line in f if line.strip()]
    if not wnids:
        raise DataError(f"tinyimagenet: {os.path.join(folder, 'wnids.txt')} lists no classes; {advice}")
    index = {w: i for i, w in enumerate(wnids)}
    train = []
    for w in wnids:
        d = os.path.join(folder, "train", w, "images")
        if not os.path.isdir(d):
            raise DatasetNotFound(f"tinyimagenet: missing folder {d}")
        train += [(os.path.join(d, fn), index[w]) for fn in sorted(os.listdir(d))
                  if fn.lower().endswith((".jpeg", ".jpg", ".png"))]
    if not train:
        raise DatasetNotFound(f"tinyimagenet: no images in {folder}/train/<wnid>/images; "
                              f"extract tiny-imagenet-200.zip again")
    val = []
    ann = os.path.join(folder, "val", "val_annotations.txt")
    if not os.path.isfile(ann):
        raise DatasetNotFound(f"tinyimagenet: missing {ann}")
    with open(ann) as f:
        for line in f:
            parts = line.strip().split("\t")
            if len(parts) >= 2:
                if parts[1] not in index:
                    raise DataError(f"tinyimagenet: {ann} names class {parts[1]!r} absent from wnids.txt; {advice}")
                val.append((os.path.join(folder, "val", "images", parts[0]), index[parts[1]]))
    ytr = np.array([c for _, c in train], dtype=np.int64)
    yte = np.array([c for _, c in val], dtype=np.int64)
    key = _cache_key(train, val, advice)
    cache = _cache_path(folder)
    arrays = _read_cache(cache, key, len(train), len(val)) if cache else None
    if arrays is None:
        xtr = _decode_all([p for p, _ in train], advice)
        xte = _decode_all([p for p, _ in val], advice, xtr.shape[2:], train[0][0])
        if cache:
            _write_cache(cache, key, xtr, xte)
    else:
        xtr, xte = arrays
    return ArrayDataset("tinyimagenet", torch.from_numpy(xtr), torch.from_numpy(ytr),
                        torch.from_numpy(xte), torch.from_numpy(yte), len(wnids), augment_default=True)


# --- Tiny ImageNet cache (design in the module docstring) ------------------------------------
CACHE_NAME = "largebatch-cache.npz"
_CACHE_VERSION = 2  # part of the key: bump when the stored layout changes
_LEGACY_CACHE = re.compile(r"largebatch-cache-[0-9a-f]{16}\.npz")  # one file per path list (version 1)


def _warn(msg: str) -> None:
    print(f"largebatch: {msg}", file=sys.stderr)


def _cache_key(train: list[tuple[str, int]], val: list[tuple[str, int]], advice: str) -> str:
    """SHA-1 over every image's (resolved) path, size, mtime_ns and label: one stat per image, no reads."""
    h = hashlib.sha1(f"largebatch tinyimagenet cache v{_CACHE_VERSION}\n".encode())
    for split, items in (("train", train), ("val", val)):
        for p, c in items:
            try:
                st = os.stat(p)
            except FileNotFoundError:
                raise DatasetNotFound(f"tinyimagenet: missing image {p}; {advice}") from None
            h.update(f"{split}\t{p}\t{st.st_size}\t{st.st_mtime_ns}\t{c}\n".encode())
    return h.hexdigest()


def _writable(folder: str) -> bool:
    return os.access(folder, os.W_OK)


def _cache_path(folder: str) -> str | None:
    """The cache of the (resolved) image folder: inside it if writable, else under ~/.cache/largebatch."""
    if _writable(folder):
        return os.path.join(folder, CACHE_NAME)
    alt = os.path.expanduser(os.path.join("~", ".cache", "largebatch"))
    try:
        os.makedirs(alt, exist_ok=True)
    except OSError:
        return None
    return os.path.join(alt, f"tinyimagenet-{hashlib.sha1(folder.encode()).hexdigest()[:16]}.npz")


def _read_cache(cache: str, key: str, n_train: int, n_val: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (train, val) images if ``cache`` holds ``key``; None if absent, stale or unreadable."""
    if not os.path.isfile(cache):
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) != key:
                _warn(f"tinyimagenet: images changed since {cache} was written; decoding them again")
                return None
            xtr, xte = z["xtr"], z["xte"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        _warn(f"ignoring unreadable cache {cache} ({type(e).__name__}: {e}); decoding the images again")
        return None
    ok = (xtr.dtype == xte.dtype == np.uint8 and xtr.ndim == xte.ndim == 4 and xtr.shape[1] == 3
          and xtr.shape[0] == n_train and xte.shape[0] == n_val and xtr.shape[1:] == xte.shape[1:])
    if not ok:
        _warn(f"ignoring inconsistent cache {cache} (arrays {xtr.shape}, {xte.shape}); decoding the images again")
        return None
    return xtr, xte


def _write_cache(cache: str, key: str, xtr: np.ndarray, xte: np.ndarray) -> None:
    """Write to a uniquely named temporary file next to ``cache``, then rename over it (atomic: concurrent
    readers and writers, e.g. DDP ranks, see the old file or the new one, never a partial one)."""
    tmp = f"{cache}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as f:
            np.savez(f, key=np.array(key), xtr=xtr, xte=xte)
        os.replace(tmp, cache)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if not isinstance(e, OSError):
            raise
        _warn(f"could not write the cache {cache} ({e}); the images will be decoded again next time")
        return
    folder = os.path.dirname(cache)
    for fn in os.listdir(folder):
        if _LEGACY_CACHE.fullmatch(fn):
            try:
                os.remove(os.path.join(folder, fn))
            except OSError:
                pass


# --- ImageNet (ImageFolder layout, streamed from the JPEG files) ------------------------------
#: the papers' normalization and transforms (LALC paper App. B; torchvision's ImageNet recipe)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CROP, IMAGENET_RESIZE = 224, 256
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
_DECODER = None  # the thread pool that decodes images (PIL releases the GIL while decoding)


def _decoder():
    global _DECODER
    if _DECODER is None:
        from concurrent.futures import ThreadPoolExecutor

        n = int(os.environ.get("LARGEBATCH_DECODE_THREADS", min(32, os.cpu_count() or 1)))
        _DECODER = ThreadPoolExecutor(max_workers=max(n, 1), thread_name_prefix="largebatch-decode")
    return _DECODER


class ImageFiles:
    """Images read from their files on demand, indexed like a uint8 ``N x 3 x 224 x 224`` tensor.

    ImageNet does not fit in memory as a uint8 tensor (1.28M x 3 x 224 x 224 = 193 GB), so
    :func:`load_imagenet`'s splits are this: ``x[idx]`` (an index tensor, a slice or an int list)
    decodes those images on a thread pool, applies the split's transform and returns a uint8 tensor
    on the dataset's device. Training split (``train=True``): torchvision's
    ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip()``, their random parameters drawn from
    torch's global generator in the calling thread, image by image, as torchvision draws them (so
    a run is reproducible and resumes exactly: checkpoints restore that generator). Test split:
    ``Resize(256)`` + ``CenterCrop(224)``. Nothing is cached; throughput is the decoding rate of
    the machine's cores (``$LARGEBATCH_DECODE_THREADS``, default min(32, cores)).
    """

    dtype = torch.uint8

    def __init__(self, paths: list[str], train: bool, device: torch.device | str = "cpu",
                 size: int = IMAGENET_CROP, resize: int = IMAGENET_RESIZE):
        self.paths, self.train, self.device = paths, train, torch.device(device)
        self.size, self.resize = size, resize

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), 3, self.size, self.size))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.paths)

    def to(self, device: torch.device | str) -> "ImageFiles":
        return ImageFiles(self.paths, self.train, device, self.size, self.resize)

    def split(self, n: int):
        """Decoded chunks of ``n`` images, in order (as ``Tensor.split``)."""
        return (self[i:i + n] for i in range(0, len(self.paths), n))

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            rows = range(*idx.indices(len(self.paths)))
        elif isinstance(idx, torch.Tensor):
            rows = idx.reshape(-1).cpu().tolist()
        else:
            rows = list(idx)
        from PIL import Image

        jobs = []
        for i in rows:  # random parameters in this thread, in order: torchvision's sequence of draws
            path = self.paths[i]
            try:
                with Image.open(path) as im:  # the header only
                    params = self._params(im) if self.train else None
            except FileNotFoundError:
                raise DatasetNotFound(f"imagenet: missing image {path}; the folder changed since it was listed") from None
            except Exception as e:  # PIL.UnidentifiedImageError, truncated headers, ...
                raise DataError(f"imagenet: cannot read {path} ({type(e).__name__}: {e}); replace or delete "
                                f"that file") from None
            jobs.append((path, params))
        out = list(_decoder().map(self._decode, jobs)) if len(jobs) > 1 else [self._decode(j) for j in jobs]
        x = torch.from_numpy(np.stack(out)) if out else torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)
        return x.to(self.device)

    def _params(self, im) -> tuple:
        import torchvision.transforms as T

        crop = T.RandomResizedCrop.get_params(im, [0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0])
        return crop, bool(torch.rand(1) < 0.5)

    def _decode(self, job: tuple) -> np.ndarray:
        import torchvision.transforms.functional as TF
        from PIL import Image

        path, params = job
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except Exception as e:
            raise DataError(f"imagenet: cannot decode {path} ({type(e).__name__}: {e}); replace or delete "
                            f"that file") from None
        if params is None:
            im = TF.center_crop(TF.resize(im, self.resize), self.size)
        else:
            (i, j, h, w), flip = params
            im = TF.resized_crop(im, i, j, h, w, [self.size, self.size])
            if flip:
                im = TF.hflip(im)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


@dataclass
class FileDataset(ArrayDataset):
    """An :class:`ArrayDataset` whose images are :class:`ImageFiles` (labels are tensors); ``mean`` and
    ``std`` are fixed (ImageNet's) instead of computed over the images."""

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            y = getattr(self, f"{split}_y")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{self.name}: {split} labels must be in 0..{self.num_classes - 1}")
        self.mean, self.std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)


def _image_folder(folder: str, classes: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """torchvision ``ImageFolder``'s listing: class = sorted sub-folder names (or ``classes``), files
    found recursively in sorted order with an image extension. Returns (paths, labels, classes)."""
    if classes is None:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    paths, labels = [], []
    for c, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(folder, name), followlinks=True)):
            for fn in sorted(files):
                if fn.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.path.join(dirpath, fn))
                    labels.append(c)
    return paths, labels, classes


def find_imagenet(root: str | None) -> str | None:
    """The first of ``root``, ``root/imagenet`` holding ``train/`` and ``val/`` folders."""
    r = root or default_root()
    for cand in (r, os.path.join(r, "imagenet")):
        if os.path.isdir(os.path.join(cand, "train")) and os.path.isdir(os.path.join(cand, "val")):
            return cand
    return None


def load_imagenet(root: str | None = None, download: bool = False) -> FileDataset:
    """ImageNet in torchvision's ``ImageFolder`` layout (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``),
    streamed from the files (:class:`ImageFiles`): the papers' transforms, ImageNet's mean and std."""
    folder = find_imagenet(root)
    if folder is None:
        r = root or default_root()
        raise DatasetNotFound(
            f"imagenet: not found. Put the ImageFolder layout train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the "
            f"validation images sorted into class folders) under {r} or {os.path.join(r, 'imagenet')} (--data-dir "
            f"or $LARGEBATCH_DATA)" + ("; ImageNet cannot be downloaded automatically" if download else ""))
    train, ytr, classes = _image_folder(os.path.join(folder, "train"))
    if not train:
        raise DatasetNotFound(f"imagenet: no images in {folder}/train/<class>/ (extensions {', '.join(IMG_EXTENSIONS)})")
    val_dir = os.path.join(folder, "val")
    stray = sorted(set(e.name for e in os.scandir(val_dir) if e.is_dir()) - set(classes))
    if stray:
        raise DataError(f"imagenet: {os.path.join(val_dir, stray[0])} is a class absent from {folder}/train "
                        f"({len(stray)} such folders); the val folders must use the training classes' names")
    val, yte, _ = _image_folder(val_dir, classes)
    if not val:
        raise DatasetNotFound(f"imagenet: no images in {val_dir}/<class>/; sort the validation images into class folders")
    return FileDataset("imagenet", ImageFiles(train, True), torch.tensor(ytr, dtype=torch.int64),  # type: ignore[arg-type]
                       ImageFiles(val, False), torch.tensor(yte, dtype=torch.int64), len(classes),  # type: ignore[arg-type]
                       augment_default=False)
