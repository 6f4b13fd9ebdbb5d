"""Datasets in their real on-disk formats (tiny generated files) and on-device augmentation."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from largebatch.train import data


def _cifar_batch(path, n, seed, label_key):
    rng = np.random.RandomState(seed)
    x = rng.randint(0, 256, size=(n, 3072), dtype=np.uint8)
    y = rng.randint(0, 10, size=n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"data": x, label_key: y, b"batch_label": b"x"}, f)
    return x.reshape(n, 3, 32, 32), np.array(y)


def test_cifar10_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    xs, ys = zip(*[_cifar_batch(folder / f"data_batch_{i}", 3, i, b"labels") for i in range(1, 6)])
    xt, yt = _cifar_batch(folder / "test_batch", 4, 9, b"labels")
    ds = data.load("cifar10", str(tmp_path))
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert np.array_equal(ds.train_x.numpy(), np.concatenate(xs))
    assert np.array_equal(ds.train_y.numpy(), np.concatenate(ys))
    assert np.array_equal(ds.test_x.numpy(), xt) and np.array_equal(ds.test_y.numpy(), yt)
    assert ds.num_classes == 10 and ds.augment_default


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x, y = _cifar_batch(folder / "train", 5, 1, b"fine_labels")
    _cifar_batch(folder / "test", 2, 2, b"fine_labels")
    ds = data.load("cifar100", str(tmp_path))
    assert ds.num_classes == 100
    assert np.array_equal(ds.train_x.numpy(), x) and np.array_equal(ds.train_y.numpy(), y)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tinyimagenet", "fashion-mnist"])
def test_missing_dataset_says_where(tmp_path, monkeypatch, name):
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(data.DatasetNotFound) as e:
        data.load(name, str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(e.value) and name in str(e.value)


def _write_idx(path, arr, gz):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize("layout,gz", [("flat", True), ("torchvision", False)])
def test_fashion_mnist_idx(tmp_path, monkeypatch, layout, gz):
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", str(tmp_path / "nowhere"))
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    arrays = {"train-images-idx3-ubyte": rng.randint(0, 256, (6, 28, 28)), "train-labels-idx1-ubyte": rng.randint(0, 10, 6),
              "t10k-images-idx3-ubyte": rng.randint(0, 256, (3, 28, 28)), "t10k-labels-idx1-ubyte": rng.randint(0, 10, 3)}
    for name, arr in arrays.items():
        _write_idx(str(folder / (name + (".gz" if gz else ""))), arr, gz)
    ds = data.load("fashion-mnist", str(tmp_path))
    assert ds.train_x.shape == (6, 1, 28, 28) and ds.test_x.shape == (3, 1, 28, 28)
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_idx_rejects_truncated_file(tmp_path):
    p = tmp_path / "bad-idx3-ubyte"
    p.write_bytes(struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 2, 28, 28) + b"\0" * 10)
    with pytest.raises(ValueError, match="expected 1568 values"):
        data.read_idx(str(p))


@pytest.mark.skipif(not os.path.isdir(data.SYSTEM_FASHION_MNIST), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_found_at_debian_path(tmp_path):
    assert data.find_fashion_mnist(str(tmp_path)) == data.SYSTEM_FASHION_MNIST


def test_tinyimagenet_folder_and_cache(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n001", "n002"]
    (root).mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.RandomState(0)
    for w in wnids:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    Image.fromarray(rng.randint(0, 256, (64, 64), dtype=np.uint8)).save(root / "val" / "images" / "val_0.JPEG")  # grayscale
    Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "val" / "images" / "val_1.JPEG")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn002\t0\t0\t63\t63\nval_1.JPEG\tn001\t1\t1\t60\t60\n")
    ds = data.load("tinyimagenet", str(tmp_path))
    assert ds.train_x.shape == (4, 3, 64, 64) and ds.test_x.shape == (2, 3, 64, 64)
    assert ds.train_y.tolist() == [0, 0, 1, 1] and ds.test_y.tolist() == [1, 0]
    ref = np.asarray(Image.open(root / "train" / "n002" / "images" / "n002_1.JPEG").convert("RGB"))
    assert np.array_equal(ds.train_x[3].permute(1, 2, 0).numpy(), ref)
    caches = list(root.glob("largebatch-cache-*.npz"))
    assert len(caches) == 1
    # The second load reads the cache: delete an image and the arrays are still the same.
    os.remove(root / "train" / "n001" / "images" / "n001_0.JPEG")
    (root / "train" / "n001" / "images" / "n001_0.JPEG").write_bytes(b"")  # same listing, unreadable content
    ds2 = data.load("tinyimagenet", str(tmp_path))
    assert torch.equal(ds2.train_x, ds.train_x) and torch.equal(ds2.test_y, ds.test_y)


def test_digits_offline():
    ds = data.load("digits")
    assert ds.train_x.shape == (1438, 1, 8, 8) and ds.test_x.shape == (359, 1, 8, 8)
    assert ds.train_x.dtype == torch.uint8 and int(ds.train_x.max()) == 255
    assert set(ds.train_y.tolist()) == set(range(10)) and not ds.augment_default


def test_random_crop_flip_is_a_per_sample_crop_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 2, 6, 5), dtype=torch.uint8, generator=g)
    out = data.random_crop_flip(x, torch.Generator().manual_seed(1), pad=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(x.shape[0]):
        matches = [(oy, ox, f) for oy in range(5) for ox in range(5) for f in (0, 1)
                   if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, oy:oy + 6, ox:ox + 5]))]
        assert matches, f"sample {i} is not a crop/flip of its padded image"
        seen.add(matches[0])
    assert len(seen) > 10  # randomness is per sample, not one offset for the batch
    assert any(m[2] for m in seen) and any(not m[2] for m in seen)


def test_normalize_matches_formula():
    x = torch.randint(0, 256, (3, 2, 4, 4), dtype=torch.uint8)
    mean, std = torch.tensor([0.2, 0.6]), torch.tensor([0.5, 0.25])
    ref = (x.float() / 255 - mean.view(1, 2, 1, 1)) / std.view(1, 2, 1, 1)
    assert torch.allclose(data.normalize(x, mean, std), ref, atol=1e-6)


def test_channel_stats_match_torch():
    x = torch.randint(0, 256, (37, 3, 5, 4), dtype=torch.uint8)
    mean, std = data.channel_stats(x, chunk=8)
    xs = x.double() / 255
    assert torch.allclose(mean.double(), xs.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(std.double(), xs.std(dim=(0, 2, 3)), atol=1e-6)
