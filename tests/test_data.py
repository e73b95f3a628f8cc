"""Tests of the data layer: loaders, shared sampler, seeded augmentation, labelled splits."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dml_cluster.data import (
    Dataset,
    augment_batch,
    batch_indices,
    dataset_names,
    epoch_order,
    fingerprint,
    labelled_mask,
    load_dataset,
    mask_labels,
    steps_per_epoch,
)
from dml_cluster.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, read_idx
from dml_cluster.errors import DataError

# --------------------------------------------------------------------------- file writers


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False, cut: int = 0) -> Path:
    """Write `array` (uint8) as an IDX file; `cut` drops that many bytes from the end."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if cut:
        data = data[:-cut]
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_mnist_folder(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = False):
    """Four small IDX files in the MNIST layout; returns the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=gz)
    return arrays


def write_cifar(path: Path, images: np.ndarray, labels: list[np.ndarray], cut: int = 0) -> None:
    """CIFAR binary records: the label bytes, then R plane, G plane, B plane (row-major 32x32)."""
    records = [
        bytes(int(lab[i]) for lab in labels) + images[i].astype(np.uint8).tobytes()
        for i in range(images.shape[0])
    ]
    data = b"".join(records)
    path.write_bytes(data[: len(data) - cut])


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def as_seen(ds: Dataset, split: str) -> torch.Tensor:
    """A split's images as the peer sees them: float32, normalised with train statistics."""
    return ds.normalisation.apply(getattr(ds, split).x)


def unnormalise(x: torch.Tensor, raw_train: torch.Tensor) -> torch.Tensor:
    """Invert the per-channel normalisation using the raw train pixels."""
    raw = raw_train.to(torch.float32)
    std, mean = torch.std_mean(raw, dim=(0, 2, 3), correction=0, keepdim=True)
    return x * std + mean


# --------------------------------------------------------------------------- registry


def test_registry_names_and_unknown():
    names = dataset_names()
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic"} <= set(names)
    with pytest.raises(DataError, match="known: .*digits"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="no option bogus"):
        load_dataset("digits", bogus=1)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_normalisation():
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10 and not ds.flip
    assert ds.input_shape == (1, 8, 8)
    assert as_seen(ds, "train").dtype == torch.float32 and ds.train.targets.dtype == torch.int64
    assert as_seen(ds, "train").shape[0] + as_seen(ds, "test").shape[0] == 1797
    assert as_seen(ds, "test").shape[0] == 360  # ceil(0.2 * 1797)
    assert abs(as_seen(ds, "train").mean().item()) < 1e-4
    assert abs(as_seen(ds, "train").std(correction=0).item() - 1.0) < 1e-3
    # stratified: every class in both splits, in proportion
    assert ds.test.targets.bincount(minlength=10).min() >= 30
    again = load_dataset("digits")
    assert torch.equal(ds.test.targets, again.test.targets) and torch.equal(
        as_seen(ds, "train"), as_seen(again, "train")
    )
    other = load_dataset("digits", test_fraction=0.5, split_seed=3)
    assert as_seen(other, "test").shape[0] in (898, 899)
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)


def test_digits_split_cache_gives_sklearns_split_and_survives_a_bad_file(tmp_path, monkeypatch):
    from dml_cluster.data import digits

    monkeypatch.setenv("DML_CLUSTER_CACHE", str(tmp_path))
    fresh = digits.make_split(0.3, 5)
    first = load_dataset("digits", test_fraction=0.3, split_seed=5)  # made, then kept
    path = digits.split_cache_file(0.3, 5)
    assert path is not None and path.parent == tmp_path
    for made, kept in zip(fresh, digits.read_split(path), strict=True):
        assert np.array_equal(made, kept)
    again = load_dataset("digits", test_fraction=0.3, split_seed=5)  # read from the cache
    assert torch.equal(as_seen(first, "train"), as_seen(again, "train"))
    assert torch.equal(first.test.targets, again.test.targets)
    path.write_bytes(b"not a zip")  # torn or foreign: made again, and the file replaced
    third = load_dataset("digits", test_fraction=0.3, split_seed=5)
    assert torch.equal(as_seen(first, "train"), as_seen(third, "train"))
    assert digits.read_split(path) is not None
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_plain_and_gzip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "a-idx3-ubyte", array, gz=gz)
    out = read_idx(path)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 4)
    assert torch.equal(out, torch.from_numpy(array))


def test_idx_reader_big_endian_int32(tmp_path):
    values = np.array([1, -2, 70000], dtype=">i4")
    path = tmp_path / "ints"
    path.write_bytes(struct.pack(">BBBBI", 0, 0, 0x0C, 1, 3) + values.tobytes())
    assert read_idx(path).tolist() == [1, -2, 70000]


def test_idx_truncated_and_bad_magic(tmp_path):
    array = np.zeros((3, 28, 28), dtype=np.uint8)
    truncated = write_idx(tmp_path / "trunc-idx3-ubyte", array, cut=10)
    with pytest.raises(DataError, match="trunc-idx3-ubyte.*truncated"):
        read_idx(truncated)
    truncated_gz = write_idx(tmp_path / "truncgz-idx3-ubyte", array, gz=True, cut=5)
    with pytest.raises(DataError, match="truncgz-idx3-ubyte"):
        read_idx(truncated_gz)
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 40)
    with pytest.raises(DataError, match="bad-idx3-ubyte.*magic"):
        read_idx(bad)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_folder_loads(tmp_path, gz):
    arrays = write_mnist_folder(tmp_path, gz=gz)
    ds = load_dataset("mnist", root=str(tmp_path))
    assert ds.input_shape == (1, 28, 28) and not ds.flip
    assert as_seen(ds, "train").shape[0] == 12 and as_seen(ds, "test").shape[0] == 5
    assert ds.train.targets.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    raw = torch.from_numpy(arrays["train-images-idx3-ubyte"]).unsqueeze(1)
    assert torch.allclose(unnormalise(as_seen(ds, "train"), raw), raw.float(), atol=1e-3)


def test_fashion_mnist_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist", root=str(tmp_path / "nowhere"))
    assert "train-images-idx3-ubyte" in str(info.value) and "\n" not in str(info.value)


def test_mnist_missing_file_named(tmp_path):
    write_mnist_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=str(tmp_path))


def test_mnist_truncated_file_in_folder(tmp_path):
    write_mnist_folder(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-1])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", root=str(tmp_path))


@pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT).is_dir(),
    reason=f"Fashion-MNIST not installed at {FASHION_MNIST_ROOT} (apt-get install "
    "dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist")
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert ds.train.x.dtype == torch.uint8  # kept compact: normalised per batch on the device
    assert ds.train.targets.shape == (60000,) and ds.test.targets.shape == (10000,)
    assert ds.class_names == FASHION_MNIST_CLASSES and ds.num_classes == 10
    assert ds.train.targets.bincount().tolist() == [6000] * 10


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_binary(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    batches = []
    for i in range(1, 6):
        images = cifar_images(3, seed=i)
        labels = np.array([i, (i + 3) % 10, 9], dtype=np.uint8)
        write_cifar(folder / f"data_batch_{i}.bin", images, [labels])
        batches.append((images, labels))
    test_images = cifar_images(2, seed=99)
    write_cifar(folder / "test_batch.bin", test_images, [np.array([4, 7], dtype=np.uint8)])

    ds = load_dataset("cifar10", root=str(tmp_path))  # finds the sub-folder
    assert ds.flip and ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    assert ds.train.targets.tolist() == np.concatenate([b[1] for b in batches]).tolist()
    assert ds.test.targets.tolist() == [4, 7]
    raw_train = torch.from_numpy(np.concatenate([b[0] for b in batches]))
    assert torch.allclose(
        unnormalise(as_seen(ds, "train"), raw_train), raw_train.float(), atol=1e-3
    )

    # Pixel order: byte 1 + (c * 1024 + r * 32 + col) of a record is channel c, row r, column col.
    record = (folder / "data_batch_1.bin").read_bytes()[:3073]
    sample = unnormalise(as_seen(ds, "train"), raw_train)[0].round().to(torch.uint8)
    assert sample[0, 0, 1].item() == record[1 + 1]  # R, row 0, column 1
    assert sample[1, 2, 5].item() == record[1 + 1024 + 2 * 32 + 5]  # G, row 2, column 5
    assert sample[2, 31, 31].item() == record[3072]  # B, last pixel

    ds_direct = load_dataset("cifar10", root=str(folder))
    assert torch.equal(as_seen(ds_direct, "train"), as_seen(ds, "train"))


def test_cifar100_binary_fine_labels(tmp_path):
    train_images, test_images = cifar_images(4, seed=1), cifar_images(2, seed=2)
    coarse = np.array([19, 0, 5, 7], dtype=np.uint8)
    fine = np.array([99, 0, 42, 57], dtype=np.uint8)
    write_cifar(tmp_path / "train.bin", train_images, [coarse, fine])
    write_cifar(tmp_path / "test.bin", test_images, [coarse[:2], np.array([3, 88], np.uint8)])
    ds = load_dataset("cifar100", root=str(tmp_path))
    assert ds.num_classes == 100 and len(ds.class_names) == 100 and ds.flip
    assert ds.train.targets.tolist() == fine.tolist() and ds.test.targets.tolist() == [3, 88]
    raw = torch.from_numpy(train_images)
    back = unnormalise(as_seen(ds, "train"), raw).round().to(torch.uint8)
    record = (tmp_path / "train.bin").read_bytes()[3074 : 2 * 3074]  # second record
    assert back[1, 0, 0, 0].item() == record[2]  # R plane starts after the two label bytes
    assert back[1, 1, 0, 0].item() == record[2 + 1024]
    assert back[1, 2, 3, 4].item() == record[2 + 2048 + 3 * 32 + 4]


def test_cifar_truncated_and_missing(tmp_path):
    write_cifar(tmp_path / "train.bin", cifar_images(2, 1), [np.zeros(2), np.zeros(2)], cut=7)
    write_cifar(tmp_path / "test.bin", cifar_images(1, 2), [np.zeros(1), np.zeros(1)])
    with pytest.raises(DataError, match="train.bin.*truncated"):
        load_dataset("cifar100", root=str(tmp_path))
    with pytest.raises(DataError, match="data_batch_1.bin.*test_batch.bin"):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(DataError, match="data.root"):
        load_dataset("cifar10")


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_learnable():
    a = load_dataset("synthetic", shape=[1, 6, 6], num_classes=4, train_size=400, test_size=100)
    b = load_dataset("synthetic", shape=(1, 6, 6), num_classes=4, train_size=400, test_size=100)
    c = load_dataset("synthetic", shape=(1, 6, 6), num_classes=4, train_size=400, seed=1)
    assert a.input_shape == (1, 6, 6) and a.num_classes == 4 and as_seen(a, "test").shape[0] == 100
    assert torch.equal(as_seen(a, "train"), as_seen(b, "train")) and torch.equal(
        a.test.targets, b.test.targets
    )
    assert not torch.equal(as_seen(a, "train")[:100], as_seen(c, "train")[:100])
    # nearest class mean (from train) classifies the test split well above chance
    means = torch.stack([as_seen(a, "train")[a.train.targets == k].mean(0) for k in range(4)])
    dist = ((as_seen(a, "test")[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (dist.argmin(1) == a.test.targets).float().mean() > 0.8
    with pytest.raises(DataError, match="num_classes"):
        load_dataset("synthetic", num_classes=1)


# --------------------------------------------------------------------------- sampler


def test_epoch_order_shared_and_changes_per_epoch():
    a, b = epoch_order(1000, seed=7, epoch=3), epoch_order(1000, seed=7, epoch=3)
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert torch.equal(a.sort().values, torch.arange(1000))
    assert not torch.equal(a, epoch_order(1000, seed=7, epoch=4))
    assert not torch.equal(a, epoch_order(1000, seed=8, epoch=3))


def test_steps_and_batches():
    assert steps_per_epoch(10, 4) == 2 and steps_per_epoch(10, 4, drop_last=False) == 3
    assert steps_per_epoch(8, 4) == 2 and steps_per_epoch(3, 4) == 0
    order = epoch_order(10, seed=0, epoch=0)
    assert torch.equal(batch_indices(order, 1, 4), order[4:8])
    assert batch_indices(order, 2, 4).tolist() == order[8:].tolist()
    with pytest.raises(IndexError):
        batch_indices(order, 3, 4)


def test_fingerprint():
    idx = torch.tensor([3, 1, 2, 0])
    fp = fingerprint(idx)
    assert fp == fingerprint(torch.tensor([3, 1, 2, 0], dtype=torch.int32))  # dtype-independent
    assert 0 <= fp < 2**64
    assert fp != fingerprint(torch.tensor([1, 3, 2, 0]))
    assert fp != fingerprint(idx[:3])
    expected = hashlib.blake2b(np.array([3, 1, 2, 0], "<i8").tobytes(), digest_size=8).digest()
    assert fp == int.from_bytes(expected, "little")


# --------------------------------------------------------------------------- augmentation


def test_augment_identity_without_options():
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(augment_batch(x, seed=0, epoch=0, step=0), x)


def test_augment_deterministic_per_step():
    x = torch.randn(64, 3, 16, 16)
    kwargs = {"crop_padding": 2, "flip": True}
    a = augment_batch(x, seed=1, epoch=2, step=3, **kwargs)
    b = augment_batch(x.clone(), seed=1, epoch=2, step=3, **kwargs)
    c = augment_batch(x, seed=1, epoch=2, step=4, **kwargs)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def hand_crop(img: torch.Tensor, p: int, top: int, left: int) -> torch.Tensor:
    """The H x W window at (top, left) of `img` zero-padded by p on every side."""
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * p, w + 2 * p)
    padded[:, p : p + h, p : p + w] = img
    return padded[:, top : top + h, left : left + w]


def test_augment_crop_matches_a_hand_computed_crop():
    p = 3
    x = torch.arange(8 * 2 * 6 * 5, dtype=torch.float32).reshape(8, 2, 6, 5) + 1
    # the hand crop itself: window (top=0, left=2p) shows p rows of padding, then shifted content
    window = hand_crop(x[0], p, 0, 2 * p)
    assert torch.equal(window[:, :p], torch.zeros(2, p, 5))
    assert torch.equal(window[:, p:, : 5 - p], x[0, :, : 6 - p, p:])

    out = augment_batch(x, seed=5, epoch=0, step=0, crop_padding=p)
    offsets = []
    for i in range(x.shape[0]):
        matches = [
            (top, left)
            for top in range(2 * p + 1)
            for left in range(2 * p + 1)
            if torch.equal(out[i], hand_crop(x[i], p, top, left))
        ]
        assert len(matches) == 1, "each output must be exactly one padded crop of its input"
        offsets.append(matches[0])
    assert len(set(offsets)) > 1  # per-sample offsets
    assert any(o != (p, p) for o in offsets)  # content is shifted


def test_augment_flip():
    x = torch.randn(128, 1, 4, 6)
    out = augment_batch(x, seed=0, epoch=0, step=0, flip=True)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(128)]
    kept = [torch.equal(out[i], x[i]) for i in range(128)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 30 < sum(flipped) < 98


# --------------------------------------------------------------------------- labelled split


def test_labelled_mask_stratified_and_seeded():
    y = torch.cat([torch.full((n,), k) for k, n in enumerate([100, 50, 7, 3])])
    y = y[torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(0))]
    mask = labelled_mask(y, 0.1, seed=0)
    assert mask.dtype == torch.bool and mask.shape == y.shape
    counts = [int(mask[y == k].sum()) for k in range(4)]
    assert counts == [10, 5, 1, 1]  # round(0.1 * n), at least one per class
    assert torch.equal(mask, labelled_mask(y, 0.1, seed=0))
    assert not torch.equal(mask, labelled_mask(y, 0.1, seed=1))
    assert labelled_mask(y, 1.0, seed=0).all() and not labelled_mask(y, 0.0, seed=0).any()
    with pytest.raises(DataError):
        labelled_mask(y, 1.5, seed=0)

    masked = mask_labels(y, mask)
    assert torch.equal(masked[mask], y[mask]) and (masked[~mask] == -1).all()
    assert (y >= 0).all()  # the input is not modified
