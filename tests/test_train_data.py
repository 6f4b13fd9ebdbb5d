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


def _tiny_imagenet(tmp_path, ext="JPEG"):
    """A 2-class ``tiny-imagenet-200`` folder under tmp_path: 2 train images per class, 2 val images (one
    grayscale). ``ext="png"`` saves uncompressed PNGs (lossless, and the size depends only on the shape)."""
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n001", "n002"]
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.RandomState(0)
    opts = {"compress_level": 0} if ext == "png" else {}
    for w in wnids:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{i}.{ext}", **opts)
    (root / "val" / "images").mkdir(parents=True)
    Image.fromarray(rng.randint(0, 256, (64, 64), dtype=np.uint8)).save(root / "val" / "images" / f"val_0.{ext}", **opts)
    Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "val" / "images" / f"val_1.{ext}", **opts)
    (root / "val" / "val_annotations.txt").write_text(
        f"val_0.{ext}\tn002\t0\t0\t63\t63\nval_1.{ext}\tn001\t1\t1\t60\t60\n")
    return root


def _no_decoding(monkeypatch):
    """Make decoding an image fail the test: what is loaded next must come from the cache."""
    def boom(path):
        raise AssertionError(f"decoded {path}: the cache was not used")
    monkeypatch.setattr(data, "_decode", boom)


def test_tinyimagenet_folder_and_cache(tmp_path, monkeypatch):
    from PIL import Image

    root = _tiny_imagenet(tmp_path)
    ds = data.load("tinyimagenet", str(tmp_path))
    assert ds.train_x.shape == (4, 3, 64, 64) and ds.test_x.shape == (2, 3, 64, 64)
    assert ds.train_y.tolist() == [0, 0, 1, 1] and ds.test_y.tolist() == [1, 0]
    ref = np.asarray(Image.open(root / "train" / "n002" / "images" / "n002_1.JPEG").convert("RGB"))
    assert np.array_equal(ds.train_x[3].permute(1, 2, 0).numpy(), ref)
    assert [p.name for p in root.glob("largebatch-cache*")] == ["largebatch-cache.npz"]
    # Nothing changed: the second load reads the cache and decodes nothing.
    _no_decoding(monkeypatch)
    ds2 = data.load("tinyimagenet", str(tmp_path))
    assert torch.equal(ds2.train_x, ds.train_x) and torch.equal(ds2.test_x, ds.test_x)
    assert torch.equal(ds2.train_y, ds.train_y) and torch.equal(ds2.test_y, ds.test_y)


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


# ----------------------------------------------------------------------------- Tiny ImageNet cache
def test_tinyimagenet_cache_follows_images_replaced_in_place(tmp_path):
    """The cache key holds each file's size and mtime: a replaced image is decoded again."""
    from PIL import Image

    root = _tiny_imagenet(tmp_path, ext="png")
    data.load("tinyimagenet", str(tmp_path))
    p = root / "train" / "n001" / "images" / "n001_0.png"
    st = p.stat()
    # Same size (uncompressed PNG of the same shape), newer mtime.
    new = np.full((64, 64, 3), 7, np.uint8)
    Image.fromarray(new).save(p, compress_level=0)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert p.stat().st_size == st.st_size
    ds = data.load("tinyimagenet", str(tmp_path))
    assert np.array_equal(ds.train_x[0].permute(1, 2, 0).numpy(), new)
    # Other size, same mtime as before.
    new2 = np.full((64, 64, 3), 200, np.uint8)
    Image.fromarray(new2).save(p)  # compressed: smaller
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert p.stat().st_size != st.st_size
    ds = data.load("tinyimagenet", str(tmp_path))
    assert np.array_equal(ds.train_x[0].permute(1, 2, 0).numpy(), new2)
    assert sorted(f.name for f in root.iterdir() if f.is_file()) == ["largebatch-cache.npz", "wnids.txt"]  # no stale copies


def test_tinyimagenet_cache_shared_by_relative_absolute_and_symlinked_paths(tmp_path, monkeypatch):
    root = _tiny_imagenet(tmp_path)
    ds = data.load("tinyimagenet", str(tmp_path))
    os.symlink(root, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    _no_decoding(monkeypatch)
    for r in (".", "tiny-imagenet-200", "link", str(tmp_path / "link"), "link/../tiny-imagenet-200"):
        assert torch.equal(data.load("tinyimagenet", r).train_x, ds.train_x), r
    assert [p.name for p in root.glob("largebatch-cache*")] == ["largebatch-cache.npz"]


def test_tinyimagenet_cache_under_home_when_folder_is_not_writable(tmp_path, monkeypatch):
    root = _tiny_imagenet(tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(data, "_writable", lambda folder: False)
    ds = data.load("tinyimagenet", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    _no_decoding(monkeypatch)
    assert torch.equal(data.load("tinyimagenet", "data").train_x, ds.train_x)
    assert not list(root.glob("largebatch-cache*"))
    assert len(list((tmp_path / "home" / ".cache" / "largebatch").iterdir())) == 1  # one file per folder


def test_tinyimagenet_cache_write_removes_the_per_key_caches_of_earlier_versions(tmp_path):
    root = _tiny_imagenet(tmp_path)
    (root / "largebatch-cache-0123456789abcdef.npz").write_bytes(b"old")
    (root / "largebatch-cache-notes.npz").write_bytes(b"not ours")
    data.load("tinyimagenet", str(tmp_path))
    assert sorted(p.name for p in root.glob("largebatch-cache*")) == ["largebatch-cache-notes.npz", "largebatch-cache.npz"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a zip"])
def test_tinyimagenet_unreadable_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, capsys, damage):
    root = _tiny_imagenet(tmp_path)
    ds = data.load("tinyimagenet", str(tmp_path))
    (cache,) = root.glob("largebatch-cache*.npz")
    raw = cache.read_bytes()
    cache.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"", "not a zip": b"hello\n" * 100}[damage])
    capsys.readouterr()
    ds2 = data.load("tinyimagenet", str(tmp_path))
    assert torch.equal(ds2.train_x, ds.train_x) and torch.equal(ds2.test_x, ds.test_x)
    err = capsys.readouterr().err
    assert cache.name in err and err.count("\n") == 1, err
    _no_decoding(monkeypatch)  # rebuilt: the next load reads it
    assert torch.equal(data.load("tinyimagenet", str(tmp_path)).train_x, ds.train_x)


# ----------------------------------------------------------------------------- damaged files
def _cifar10(tmp_path, n=3):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _cifar_batch(folder / f"data_batch_{i}", n, i, b"labels")
    _cifar_batch(folder / "test_batch", n, 9, b"labels")
    return folder


def _pickle_to(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


CIFAR_DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "not a pickle": lambda p: p.write_bytes(b"<html>404 Not Found</html>\n"),
    "no labels": lambda p: _pickle_to(p, {b"data": np.zeros((3, 3072), np.uint8), b"batch_label": b"x"}),
    "not a dict": lambda p: _pickle_to(p, [1, 2, 3]),
    "wrong row size": lambda p: _pickle_to(p, {b"data": np.zeros((3, 3000), np.uint8), b"labels": [0, 1, 2]}),
    "labels count": lambda p: _pickle_to(p, {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}),
}


def _says_what_to_do(msg):
    return "delete" in msg or "re-download" in msg or "re-extract" in msg


@pytest.mark.parametrize("damage", list(CIFAR_DAMAGE))
def test_cifar_damaged_batch_is_a_data_error_naming_the_file(tmp_path, damage):
    bad = _cifar10(tmp_path) / "data_batch_3"
    CIFAR_DAMAGE[damage](bad)
    with pytest.raises(data.DataError) as e:
        data.load("cifar10", str(tmp_path))
    assert isinstance(e.value, ValueError)
    assert str(bad) in str(e.value) and _says_what_to_do(str(e.value)) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,file,label", [("cifar10", "data_batch_2", 12), ("cifar10", "test_batch", -1),
                                             ("cifar100", "train", 100), ("cifar100", "test", -3)])
def test_cifar_label_out_of_range(tmp_path, name, file, label):
    if name == "cifar10":
        folder = _cifar10(tmp_path)
        key = b"labels"
    else:
        folder = tmp_path / "cifar-100-python"
        folder.mkdir()
        key = b"fine_labels"
        for f in ("train", "test"):
            _cifar_batch(folder / f, 3, 1, key)
    _pickle_to(folder / file, {b"data": np.zeros((3, 3072), np.uint8), key: [0, label, 1]})
    with pytest.raises(data.DataError) as e:
        data.load(name, str(tmp_path))
    assert str(folder / file) in str(e.value) and str(label) in str(e.value)


def _idx_header(*dims):
    return struct.pack(">HBB", 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


IDX_DAMAGE = {  # file name -> content
    "t.gz": lambda: gzip.compress(_idx_header(2, 2, 2) + bytes(8))[:-12],  # truncated gzip stream
    "fake.gz": lambda: _idx_header(2, 2, 2) + bytes(8),  # not gzip at all
    "garbage.gz": lambda: b"\x1f\x8b\x08\x00" + b"\xff" * 40,  # gzip magic, broken deflate data
    "short": lambda: b"\0\0",  # header under 4 bytes
    "empty": lambda: b"",
    "magic": lambda: b"PK\x03\x04" + bytes(20),  # a zip, not an idx file
    "dims": lambda: _idx_header(2, 28, 28)[:9],  # header cut inside the dimensions
    "size": lambda: _idx_header(2, 28, 28) + bytes(28 * 28 + 5),
}


@pytest.mark.parametrize("name", list(IDX_DAMAGE))
def test_idx_damage_is_a_data_error_naming_the_file(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(IDX_DAMAGE[name]())
    with pytest.raises(data.DataError) as e:
        data.read_idx(str(p))
    assert str(p) in str(e.value) and _says_what_to_do(str(e.value)) and "\n" not in str(e.value)


def _fashion(folder, **override):
    rng = np.random.RandomState(0)
    arrays = {"train-images-idx3-ubyte": rng.randint(0, 256, (6, 28, 28)), "train-labels-idx1-ubyte": rng.randint(0, 10, 6),
              "t10k-images-idx3-ubyte": rng.randint(0, 256, (3, 28, 28)), "t10k-labels-idx1-ubyte": rng.randint(0, 10, 3)}
    arrays.update(override)
    for name, arr in arrays.items():
        _write_idx(str(folder / name), np.asarray(arr), False)


@pytest.mark.parametrize("bad,arr,says", [
    ("train-labels-idx1-ubyte", [0, 1, 10, 2, 3, 4], "10"),  # label 10 with 10 classes
    ("t10k-labels-idx1-ubyte", [0, 255, 1], "255"),  # a -1 written as uint8
    ("t10k-labels-idx1-ubyte", [0, 1], "2 labels"),  # 3 test images
    ("train-labels-idx1-ubyte", np.zeros((6, 1)), "1-D"),
    ("t10k-images-idx3-ubyte", np.zeros((3, 27, 27)), "28"),  # not the training images' size
    ("train-images-idx3-ubyte", np.zeros((6, 784)), "N x H x W"),
])
def test_fashion_mnist_inconsistent_files_name_the_file(tmp_path, monkeypatch, bad, arr, says):
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", str(tmp_path / "nowhere"))
    _fashion(tmp_path, **{bad: arr})
    with pytest.raises(data.DataError) as e:
        data.load("fashion-mnist", str(tmp_path))
    assert str(tmp_path / bad) in str(e.value) and says in str(e.value)


TINY_DAMAGE = {
    "truncated jpeg": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "not an image": lambda p: p.write_text("<html>404 Not Found</html>\n"),
    "empty": lambda p: p.write_bytes(b""),
    "other size": lambda p: __import__("PIL.Image").Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(p, "JPEG"),
}


@pytest.mark.parametrize("where", ["train/n002/images/n002_1.JPEG", "val/images/val_1.JPEG"])
@pytest.mark.parametrize("damage", list(TINY_DAMAGE))
def test_tinyimagenet_damaged_image_is_a_data_error_naming_it(tmp_path, damage, where):
    root = _tiny_imagenet(tmp_path)
    bad = root / where
    TINY_DAMAGE[damage](bad)
    with pytest.raises(data.DataError) as e:
        data.load("tinyimagenet", str(tmp_path))
    assert str(bad) in str(e.value) and _says_what_to_do(str(e.value)) and "\n" not in str(e.value)
    assert not list(root.glob("largebatch-cache*"))  # nothing cached from a failed decode


def test_tinyimagenet_val_class_absent_from_wnids(tmp_path):
    root = _tiny_imagenet(tmp_path)
    ann = root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text().replace("n001", "n999"))
    with pytest.raises(data.DataError, match="n999") as e:
        data.load("tinyimagenet", str(tmp_path))
    assert str(ann) in str(e.value)


def test_array_dataset_refuses_labels_out_of_range():
    x = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="test labels"):
        data.ArrayDataset("t", x, torch.tensor([0, 1, 2]), x, torch.tensor([0, -1, 2]), 3)
    with pytest.raises(ValueError, match="train labels"):
        data.ArrayDataset("t", x, torch.tensor([0, 3, 2]), x, torch.tensor([0, 1, 2]), 3)


def _damage_cifar_empty(tmp_path):
    bad = _cifar10(tmp_path) / "test_batch"
    bad.write_bytes(b"")
    return "cifar10", bad


def _damage_cifar_label(tmp_path):
    bad = _cifar10(tmp_path) / "data_batch_5"
    _pickle_to(bad, {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 12, 1]})
    return "cifar10", bad


def _damage_fashion_gz(tmp_path):
    _fashion(tmp_path)
    os.rename(tmp_path / "train-images-idx3-ubyte", tmp_path / "train-images-idx3-ubyte.gz")  # not gzip
    return "fashion-mnist", tmp_path / "train-images-idx3-ubyte.gz"


def _damage_tiny_jpeg(tmp_path):
    bad = _tiny_imagenet(tmp_path) / "train" / "n001" / "images" / "n001_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])
    return "tinyimagenet", bad


@pytest.mark.parametrize("damage", [_damage_cifar_empty, _damage_cifar_label, _damage_fashion_gz, _damage_tiny_jpeg])
def test_cli_data_error_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, damage):
    from largebatch.cli import main

    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", str(tmp_path / "nowhere"))
    name, bad = damage(tmp_path)
    rc = main(["train", "--dataset", name, "--data-dir", str(tmp_path), "--model", "mlp", "--epochs", "1",
               "--batch-size", "2", "--device", "cpu", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and err.count("\n") == 1, err
