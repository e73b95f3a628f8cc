"""The data path in one process: the step sampler, worker reads equal to in-process reads,
resume without reading skipped batches, the readers (ImageFolder, factories, torchvision's
MNIST layout), normalisation recorded once, unreadable images named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dml_cluster.data import load_dataset
from dml_cluster.data.loader import BatchReader, DataPath, InOrder, StepSampler, read_batches
from dml_cluster.data.sampler import batch_indices, epoch_order
from dml_cluster.data.stats import DATA_FILE, record_data, resolve_normalisation
from dml_cluster.errors import DataError

from .imagefolder_helpers import CLASSES, write_imagefolder
from .test_data import write_mnist_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("images"), per_class=20, val_per_class=5)


def _path(dataset, workers: int, **extra) -> DataPath:
    settings = dict(batch_size=16, eval_batch_size=32, seed=3, workers=workers, prefetch=2,
                    crop_padding=1, flip=True) | extra  # fmt: skip
    stats = resolve_normalisation(dataset, Path("/nonexistent") / DATA_FILE, 0)
    return DataPath(dataset, stats, torch.device("cpu"), **settings)


def test_step_sampler_starts_at_the_resume_step() -> None:
    order = epoch_order(100, 7, 2)
    whole = list(StepSampler(100, 16, 7, 2, 0, 6))
    assert whole == [batch_indices(order, s, 16).tolist() for s in range(6)]
    assert list(StepSampler(100, 16, 7, 2, 4, 6)) == whole[4:]
    assert len(StepSampler(100, 16, 7, 2, 4, 6)) == 2


def test_imagefolder_reads_classes_sizes_and_uint8(folder: Path) -> None:
    ds = load_dataset("imagefolder", str(folder), image_size=8)
    assert ds.class_names == CLASSES and ds.num_classes == 4 and ds.flip
    assert ds.input_shape == (3, 8, 8) and len(ds.train) == 80 and len(ds.test) == 20
    x, y = ds.train[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 8, 8) and y == 0
    as_is = load_dataset("imagefolder", str(folder))  # 12 x 10 PNGs, no resize
    assert as_is.input_shape == (3, 10, 12)


def test_workers_read_the_same_batches_and_resume_skips_ahead(folder: Path) -> None:
    """Two worker processes give bitwise the batches the peer reads itself, augmentation
    included; a resumed epoch yields exactly the remaining steps; torch's global RNG (saved in
    checkpoints) is not touched by the loaders."""
    ds = load_dataset("imagefolder", str(folder), image_size=8)
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    inline = list(_path(ds, 0).epoch(1, 0, 5))
    assert torch.equal(torch.get_rng_state(), rng)
    workers = list(_path(ds, 2).epoch(1, 0, 5))
    resumed = list(_path(ds, 2).epoch(1, 3, 5))
    for a, b in zip(inline, workers, strict=True):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
        assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert [r[0] for r in resumed] == [3, 4]
    for a, b in zip(inline[3:], resumed, strict=True):
        assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    test_x = torch.cat([x for x, _ in _path(ds, 2).test_batches()])
    assert test_x.shape == (20, 3, 8, 8) and test_x.dtype == torch.float32


def test_normalisation_is_computed_once_and_recorded(folder: Path, tmp_path: Path) -> None:
    ds = load_dataset("imagefolder", str(folder), image_size=8)
    stats = resolve_normalisation(ds, tmp_path / DATA_FILE, 2)
    pixels = torch.stack([ds.train[i][0] for i in range(len(ds.train))]).double()
    expected = pixels.mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(stats.mean, dtype=torch.float64), expected)
    record_data(tmp_path / DATA_FILE, ds, stats)
    fake = tmp_path / "fake.json"  # a recorded file is what a resumed run reads
    fake.write_text((tmp_path / DATA_FILE).read_text().replace(str(stats.mean[0]), "1.5"))
    assert resolve_normalisation(ds, fake, 0).mean[0] == 1.5
    given = load_dataset(
        "imagefolder", str(folder), image_size=8, normalize={"mean": [0.5] * 3, "std": [0.25] * 3}
    )
    assert given.normalisation.mean == (127.5,) * 3 and given.normalisation.std == (63.75,) * 3


def test_a_corrupt_image_is_named(folder: Path, tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "bad", per_class=3, val_per_class=1)
    broken = root / "train" / CLASSES[1] / "0001.png"
    broken.write_bytes(broken.read_bytes()[:40])
    ds = load_dataset("imagefolder", str(root))
    for workers in (0, 2):
        with pytest.raises(DataError, match=f"{broken}: cannot read the image"):
            list(_path(ds, workers, batch_size=4).epoch(0, 0, 3))


def test_a_factory_dataset_loads_and_pillow_items_become_tensors(tmp_path: Path) -> None:
    ds = load_dataset("python", None, factory="tests.data_factories:blobs", n=30)
    assert ds.num_classes == 3 and ds.class_names == ("level0", "level1", "level2")
    assert ds.input_shape == (1, 6, 6) and len(ds.train) == 30 and len(ds.test) == 15
    assert ds.normalisation is None  # computed when a run starts
    tv = load_dataset(
        "python", str(tmp_path / "f"), factory="tests.data_factories:torchvision_folder",
        image_size=6,
    )  # fmt: skip
    x, y = tv.train[0]
    assert tv.input_shape == (3, 6, 6) and x.dtype == torch.uint8 and tv.class_names == CLASSES
    batch = next(_path(tv, 0, batch_size=8).epoch(0, 0, 1))
    assert batch[2].shape == (8, 3, 6, 6)


def test_mnist_in_torchvision_layout_is_read_by_torchvision(tmp_path: Path) -> None:
    """root/MNIST/raw/ (what torchvision's download leaves) is read by torchvision, and gives
    the same dataset as the flat folder this project's reader reads."""
    arrays = write_mnist_folder(tmp_path / "MNIST" / "raw")
    write_mnist_folder(tmp_path / "flat")
    via_tv = load_dataset("mnist", str(tmp_path))
    flat = load_dataset("mnist", str(tmp_path / "flat"))
    assert torch.equal(via_tv.train.x, flat.train.x) and via_tv.normalisation == flat.normalisation
    assert via_tv.train.targets.tolist() == np.asarray(arrays["train-labels-idx1-ubyte"]).tolist()


def test_a_loader_worker_ending_does_not_stop_the_run() -> None:
    """The stop-signal watcher reads every signal Python handles from the wakeup pipe; the
    SIGCHLD of a DataLoader worker that ends (torch handles it) is not a stop signal."""
    code = (
        "import os, signal, time; from dml_cluster import signals; signals.HARD_STOP_S = 0.05; "
        "signals.stop_on_signals(); signal.signal(signal.SIGCHLD, lambda *a: None); "
        "os.kill(os.getpid(), signal.SIGCHLD); time.sleep(0.5); print('still running')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "still running" in done.stdout, done.stderr


class _SignalsItself(torch.utils.data.Dataset):
    """Each item read sends SIGTERM and SIGINT to the process reading it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        return torch.zeros(1, 2, 2, dtype=torch.uint8), index % 2


def test_loader_workers_ignore_the_stop_signals_their_peer_handles() -> None:
    """torchrun's killpg reaches the workers too: they must leave the stop to the peer."""
    reader = BatchReader(_SignalsItself(), "train", "signals")
    batches = list(read_batches(reader, InOrder(8, 4), 1))
    assert [b.indices.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
