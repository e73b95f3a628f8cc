"""Bad input never crashes a run or damages its folder: a one-line message, a non-zero exit.

Each case starts from a run folder left by a good run, snapshots it (every file's sha256), feeds
the bad input to `dml-cluster train` and checks the message, the exit status and that the folder
is unchanged. Cases of several processes (peers, torchrun) or of a process set up apart (a file
size limit) start their own; the cases one process refuses at start-up run one after the other
in one process, each with its own exit status and output (tests/cohort_runs.py --each).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from .cohort_runs import train_each
from .conftest import assert_same_states
from .faults_helpers import (
    CONFIG,
    complete_steps,
    cut_back_to,
    lines,
    one_line_error,
    settings,
    snapshot,
    start_peers,
    train,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def good_run(runs: Path) -> Path:
    """A finished two-epoch run with checkpoints at 10, 20, 22, 30, 40, 44."""
    proc = train(*settings(runs, "good", epochs=2))
    assert proc.returncode == 0, proc.stderr
    return runs / "good"


@pytest.fixture
def existing(good_run: Path, tmp_path: Path) -> Path:
    """A private copy of the good run's folder, under tmp_path/runs/good, as if killed after its
    last checkpoint (a finished run started again has nothing to do: test_finished_runs.py)."""
    run_dir = tmp_path / "runs" / "good"
    shutil.copytree(good_run, run_dir)
    cut_back_to(run_dir, 44)
    return run_dir


def _again(run_dir: Path, *extra: str) -> list[str]:
    return settings(run_dir.parent, run_dir.name, *extra, epochs=2)


# -- configs and checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["zmq", "torch"])
def test_peers_given_different_configs_are_refused(existing: Path, transport: str) -> None:
    before = snapshot(existing)
    args = _again(existing, f"bus.transport={transport}")
    procs = start_peers([args, [*args, "--set", "optim.lr=0.07"]])
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 2, out + err
        assert "Traceback" not in out + err
        assert "runs a different config" in err and "every peer must be given the same" in err
    assert snapshot(existing) == before


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


NEWEST = Path("checkpoints") / "step-000000044" / "small_cnn-1.pt"  # in a copy of the good run
NEWEST_MANIFEST = NEWEST.with_name("manifest.json")
DAMAGED = {"corrupt": NEWEST, "truncated": NEWEST, "corrupt-manifest": NEWEST_MANIFEST}
"""The file each fallback case damages (relative to its run folder)."""


def _damage_every_step(run_dir: Path) -> None:
    """No complete step left that verifies: the newest's manifest is garbage, every step's
    small_cnn-0 file has a flipped byte."""
    (run_dir / NEWEST_MANIFEST).write_text("{not json")
    for path in (run_dir / "checkpoints").glob("step-*/small_cnn-0.pt"):
        _flip_a_byte(path)


# one process each, one after the other: (damage to the run folder, settings); refused at
# start-up, except the damaged newest checkpoints (DAMAGED): resumed from the step before it;
# {port} is `busy_port`
REFUSED = {
    "another-config": (None, ("optim.lr=0.07",)),
    "another-cohort-size": (None, ("cohort.size=3",)),
    "corrupt": (lambda run_dir: _flip_a_byte(run_dir / NEWEST), ()),
    "truncated": (lambda run_dir: _truncate(run_dir / NEWEST), ()),
    "corrupt-manifest": (lambda run_dir: (run_dir / NEWEST_MANIFEST).write_text("{not json"), ()),
    "all-corrupt": (_damage_every_step, ()),
    "metrics-port": (
        None, ("metrics.enabled=true", "metrics.port={port}", "metrics.address=127.0.0.1"),
    ),
}  # fmt: skip


@dataclass
class Refusal:
    """A REFUSED case: its copy of the good run, that folder's snapshot before, and what
    `dml-cluster train` did (exit status, stdout, stderr)."""

    run_dir: Path
    before: dict[str, str]
    proc: subprocess.CompletedProcess | None = None


@contextlib.contextmanager
def _port_in_use() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with _port_in_use() as port:
        yield port


@pytest.fixture(scope="module")
def refused(
    good_run: Path, busy_port: int, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Refusal]:
    """Every REFUSED case on its own copy of the good run, all fed to `dml-cluster train` in one
    process, one after the other."""
    root = tmp_path_factory.mktemp("refused")
    cases, runs = {}, []
    for name, (damage, extra) in REFUSED.items():
        run_dir = root / name / "good"
        shutil.copytree(good_run, run_dir)
        cut_back_to(run_dir, 44)  # unfinished: a finished run would not be resumed
        if damage is not None:
            damage(run_dir)
        cases[name] = Refusal(run_dir, snapshot(run_dir))
        runs.append([CONFIG, *_again(run_dir, *(e.format(port=busy_port) for e in extra))])
    for case, proc in zip(cases.values(), train_each(runs, root / "each.json"), strict=True):
        case.proc = proc
    return cases


def test_a_checkpoint_of_another_config_is_refused(refused: dict[str, Refusal]) -> None:
    case = refused["another-config"]
    assert case.proc.returncode == 2
    one_line_error(case.proc, "holds checkpoints of another config", "choose another run.name")
    assert snapshot(case.run_dir) == case.before


def test_a_checkpoint_of_another_cohort_size_is_refused(refused: dict[str, Refusal]) -> None:
    case = refused["another-cohort-size"]
    assert case.proc.returncode == 2
    one_line_error(case.proc, "holds checkpoints of a cohort of 2 peers", "this config has 3")
    assert snapshot(case.run_dir) == case.before


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_newest_checkpoint_falls_back_to_the_step_before(
    refused: dict[str, Refusal], good_run: Path, damage: str
) -> None:
    """Step 44 fails verification: one warning naming the bad file, the run resumes from step
    40 and ends as the uninterrupted run did, its checkpoints (step 44 saved again) included."""
    case = refused[damage]
    assert case.proc.returncode == 0, case.proc.stdout + case.proc.stderr
    warnings = lines(case.proc.stderr, "warning: checkpoint step 44 skipped")
    assert len(warnings) == 1, case.proc.stderr
    assert f"{case.run_dir / DAMAGED[damage]} is corrupt" in warnings[0], warnings
    assert "Traceback" not in case.proc.stderr
    assert "resuming at step 40 (epoch 2, step 18 of it)" in case.proc.stdout
    assert_same_states(case.run_dir, good_run)
    assert snapshot(case.run_dir / "checkpoints") == snapshot(good_run / "checkpoints")


def test_no_checkpoint_that_verifies_is_refused_and_nothing_changes(
    refused: dict[str, Refusal],
) -> None:
    case = refused["all-corrupt"]
    assert case.proc.returncode == 2, case.proc.stdout + case.proc.stderr
    one_line_error(
        case.proc, "holds no checkpoint that can be loaded: step 44: ",
        "step-000000044/manifest.json is corrupt", "older steps 40, 30, 22, 20, 10 cannot be",
        "restore the damaged or missing files, or remove",
    )  # fmt: skip
    assert len(case.proc.stderr.strip().splitlines()) == 1, case.proc.stderr
    assert snapshot(case.run_dir) == case.before


def test_every_peer_process_falls_back_when_one_finds_its_file_corrupt(
    existing: Path, good_run: Path
) -> None:
    """Only small_cnn-1's process finds the damage in step 44; the cohort agrees to skip it, and
    both processes resume from step 40 (the reporting process names the file, once)."""
    _flip_a_byte(existing / NEWEST)
    proc = train(*_again(existing, "bus.transport=zmq"), "--nproc", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = lines(proc.stderr, "warning: checkpoint step 44 skipped")
    assert len(warnings) == 1, proc.stderr
    assert f"{existing / NEWEST} is corrupt or truncated" in warnings[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    resumed = [
        json.loads(line)["step"]
        for log in sorted((existing / "peers").glob("*.jsonl"))
        for line in log.read_text().splitlines()
        if json.loads(line)["event"] == "resume"
    ]
    assert resumed == [40, 40]  # small_cnn-0, small_cnn-1
    assert_same_states(existing, good_run)


# -- data -----------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist_folder(folder: Path) -> Path:
    """A small MNIST-format dataset (IDX files): 256 training images, 64 test images."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 64)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 64, (n, 28, 28)) + labels[:, None, None] * 19
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


def _mnist_args(root: Path) -> list[str]:
    """A one-epoch run on the MNIST-format folder root/mnist, into root/runs/mnist."""
    return settings(
        root / "runs", "mnist", "data.name=mnist", f"data.root={root / 'mnist'}",
        "data.batch_size=64", epochs=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run on a good MNIST-format folder: root/mnist (the data), root/runs/mnist."""
    root = tmp_path_factory.mktemp("mnist")
    _mnist_folder(root / "mnist")
    proc = train(*_mnist_args(root))
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_dataset_folder_with_missing_or_truncated_files_is_refused(
    mnist_run: Path, damage: str
) -> None:
    run_dir = mnist_run / "runs" / f"mnist-{damage}"  # unfinished: a finished run reads no data
    shutil.copytree(mnist_run / "runs" / "mnist", run_dir)
    cut_back_to(run_dir, 0)
    before = snapshot(run_dir)
    labels = mnist_run / "mnist" / "t10k-labels-idx1-ubyte"
    good = labels.read_bytes()
    try:  # the data folder is shared by both cases: damaged here, restored after
        if damage == "missing":
            labels.unlink()
            expected = "t10k-labels-idx1-ubyte[.gz] missing in"
        else:
            labels.write_bytes(good[:-10])
            expected = "is truncated"
        proc = train(*_mnist_args(mnist_run), "--set", f"run.name={run_dir.name}")
    finally:
        labels.write_bytes(good)
    assert proc.returncode == 2
    one_line_error(proc, expected)
    assert snapshot(run_dir) == before


# -- ports ----------------------------------------------------------------------------------------


def test_a_bus_port_in_use_is_refused(existing: Path) -> None:
    before = snapshot(existing)
    with _port_in_use() as port:
        proc = train(*_again(existing, "bus.transport=zmq", f"bus.port={port}"), "--nproc", "2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    one_line_error(proc, f"cannot bind an inbox on 127.0.0.1:{port}: Address already in use")
    assert snapshot(existing) == before


def test_a_metrics_port_in_use_is_a_one_line_error(
    refused: dict[str, Refusal], busy_port: int
) -> None:
    """A port the config asks for and cannot have stops the run before it touches anything."""
    case = refused["metrics-port"]
    assert case.proc.returncode == 2, case.proc.stdout + case.proc.stderr
    one_line_error(case.proc, f"metrics: cannot serve on 127.0.0.1:{busy_port}")
    assert snapshot(case.run_dir) == case.before


# -- the run folder and its disk ------------------------------------------------------------------


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path | None]:
    """A 16 MB tmpfs (None when this machine cannot mount one: not root, no CAP_SYS_ADMIN)."""
    folder = tmp_path / "disk"
    mounted = _mount_tmpfs(folder, "16m")
    yield folder if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_an_unwritable_run_folder_is_refused(
    good_run: Path, small_disk: Path | None, tmp_path: Path
) -> None:
    if small_disk is None and os.geteuid() == 0:
        pytest.skip("root without a way to mount a read-only folder (mount -t tmpfs failed)")
    runs = small_disk or tmp_path / "readonly"
    shutil.copytree(good_run, runs / "good")
    if small_disk is not None:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    else:
        for p in [runs, *runs.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    before = snapshot(runs / "good")
    proc = train(*_again(runs / "good"))
    assert proc.returncode == 2
    one_line_error(proc, f"run folder {runs / 'good'} is not writable")
    assert snapshot(runs / "good") == before
    fresh = train(*settings(runs, "fresh", epochs=1))  # a new run folder cannot even be made
    assert fresh.returncode == 2
    one_line_error(fresh, "is not writable")
    assert not (runs / "fresh").exists()


def test_a_disk_that_fills_during_a_save(
    good_run: Path, small_disk: Path | None, tmp_path: Path
) -> None:
    """The save of step 30 finds the disk full: the run stops with one line, the complete
    checkpoints are untouched, and with space again the run resumes and ends as it should."""
    runs = small_disk or tmp_path / "runs-limited"
    run_dir = runs / "good"
    shutil.copytree(good_run, run_dir)
    cut_back_to(run_dir, 22)  # as if stopped after the first epoch
    checkpoints = snapshot(run_dir / "checkpoints")
    limit: dict[str, object] = {}
    filler = runs / "filler"
    if small_disk is not None:  # a real ENOSPC: fill the tmpfs to 128 KiB of free space
        free = os.statvfs(runs).f_bavail * os.statvfs(runs).f_frsize
        filler.write_bytes(b"\0" * (free - 128 * 1024))
    else:  # no mount here: a file size limit (EFBIG) stands in for a full disk
        largest = max(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
        size = largest // 2 + 64 * 1024  # logs fit, a checkpoint file does not

        def preexec() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

        limit["preexec_fn"] = preexec
    proc = _train_with(limit, *_again(run_dir))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    one_line_error(proc, "cannot save the checkpoint of step 30", "the run folder keeps step 22")
    assert snapshot(run_dir / "checkpoints") == checkpoints
    assert not list(run_dir.rglob("*.tmp"))
    filler.unlink(missing_ok=True)
    again = train(*_again(run_dir))
    assert again.returncode == 0, again.stderr
    assert "resuming at step 22" in again.stdout
    assert complete_steps(run_dir) == complete_steps(good_run)
    assert_same_states(run_dir, good_run)


def _train_with(popen_options: dict[str, object], *args: str) -> subprocess.CompletedProcess:
    if not popen_options:
        return train(*args)
    from .faults_helpers import REPO, command, env

    return subprocess.run(
        command(*args), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
        **popen_options,
    )  # fmt: skip
