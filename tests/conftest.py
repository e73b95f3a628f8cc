"""Shared test helpers: run the real CLI in a subprocess, load final weights, compare them; the
session's reference runs (each trained once, shared by every module that compares with it)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import itertools
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from .cohort_runs import sets, train_many

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dml_cluster"]


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder of this test session that every pytest-xdist worker shares (the session's base
    folder when the tests run in one process)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # each worker's base is a child of the session's
    folder = base / name
    folder.mkdir(exist_ok=True)
    return folder


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold `folder`'s lock (one process, of any worker, at a time)."""
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory: pytest.TempPathFactory):
    """One cache of made dataset splits for the session's processes (data/digits.py), not the
    user's own."""
    os.environ["DML_CLUSTER_CACHE"] = str(shared_dir(tmp_path_factory, "dataset-cache"))
    yield


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def cli_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> tuple[int, str, str]:
    """`dml-cluster ARGS` in this process: (exit status, stdout, stderr)."""
    from dml_cluster.cli import main

    monkeypatch.setattr(sys, "argv", ["dml-cluster", *args])
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_here(commands: Sequence[Sequence[str]]) -> list[subprocess.CompletedProcess]:
    """Each `dml-cluster COMMAND` in this process, one after the other, whatever the others did
    (no process start to pay; for a module's fixture, which cannot have capsys): the exit status,
    and what Python wrote to stdout and stderr. torch's process-wide switches are put back."""
    from dml_cluster.cli import main

    results = []
    for command in commands:
        out, err, code = io.StringIO(), io.StringIO(), 0
        argv, sys.argv = sys.argv, ["dml-cluster", *command]
        try:
            with (
                torch_switches_kept(),
                contextlib.redirect_stdout(out),
                contextlib.redirect_stderr(err),
            ):
                main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        finally:
            sys.argv = argv
        results.append(subprocess.CompletedProcess(command, code, out.getvalue(), err.getvalue()))
    return results


@contextlib.contextmanager
def torch_switches_kept() -> Iterator[None]:
    """An in-process run sets process-wide torch switches (threads, determinism, cuDNN): put
    them back afterwards, for the other tests."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


@pytest.fixture
def restore_torch() -> Iterator[None]:
    """`torch_switches_kept` around a test."""
    with torch_switches_kept():
        yield


def run_cli(*args: str, timeout: float = 240, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`dml-cluster ARGS` as a real process; stdout and stderr captured as text."""
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def run_spawned(target: Callable[..., None], args: Sequence[tuple], timeout: float = 120) -> None:
    """One real (spawned) process per argument tuple, all at once; every one must exit 0."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=a) for a in args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * len(procs)


def final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        p.stem: torch.load(p, weights_only=True) for p in sorted((run_dir / "final").glob("*.pt"))
    }


def max_weight_diff(
    a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]
) -> float:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    worst = 0.0
    for peer in a:
        assert a[peer].keys() == b[peer].keys()
        for k in a[peer]:
            diff = (a[peer][k].double() - b[peer][k].double()).abs().max().item()
            worst = max(worst, diff)
    return worst


PER_PROCESS = ("rng",)
"""Entries of a peer's checkpoint file that belong to its process, not to the peer: the
process's global RNGs (Python's, numpy's, torch's), which co-hosted peers share and which no
draw made on a peer's behalf comes from (each peer has its own stream, saved as `stream`)."""


def saved_states(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every peer's state in the run's newest complete checkpoint (its manifest written)."""
    manifests = sorted((run_dir / "checkpoints").glob("step-*/manifest.json"))
    assert manifests, f"{run_dir} holds no complete checkpoint"
    folder = manifests[-1].parent
    return {
        p.stem: {"step": folder.name, **torch.load(p, map_location="cpu", weights_only=True)}
        for p in sorted(folder.glob("*.pt"))
    }


def _assert_same_tree(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b)
        for key in a:
            _assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def assert_same_states(a: Path, b: Path) -> None:
    """Two run folders trained the same numbers, bit for bit: every peer's final weights, and
    every tensor of every peer's state in the newest checkpoint (model, optimizer, schedule,
    the method's extra modules, the loss scaler, its random stream; its position and the
    evaluation history too) are equal (`torch.equal`). Only the process's own RNGs
    (PER_PROCESS) are left out."""
    wa, wb = final_weights(a), final_weights(b)
    assert wa and wa.keys() == wb.keys()
    _assert_same_tree(wa, wb, "final")
    sa, sb = saved_states(a), saved_states(b)
    assert sa.keys() == wa.keys() == sb.keys()
    for peer in sa:
        mine = {k: v for k, v in sa[peer].items() if k not in PER_PROCESS}
        other = {k: v for k, v in sb[peer].items() if k not in PER_PROCESS}
        assert "stream" in mine and "model" in mine, sorted(mine)
        _assert_same_tree(mine, other, peer)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


class References:
    """The one-process engine's run folders, the oracle of the multi-process tests.

    A reference is asked for as (CONFIG, KEY=VALUE, ...) and known by its config hash (what
    decides the trained numbers; where results go, the bus, metrics and checkpoints do not), so
    a module asking for a run another module trained gets that folder. The runs asked for in
    one call that are not trained yet train in one process (tests/cohort_runs.py). The folder is
    shared by the session's pytest-xdist workers: one trains a reference (under the folder's
    lock), the others find it done."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *runs: tuple[str, ...]) -> list[Path]:
        keys = self._keys(runs)
        with exclusive(self.root):
            todo = self._todo(keys, runs)
            if todo:
                proc = train_many(self._batch(todo), self._spec())
                assert proc.returncode == 0, proc.stderr[-3000:]
                self._done(todo)
        return [self.root / key for key in keys]

    def then_killed(
        self, runs: Sequence[tuple[str, ...]], killed: Sequence[str], fault: str
    ) -> tuple[list[Path], subprocess.CompletedProcess]:
        """The references of `runs`, as a call gives them, trained in one process that then
        trains `killed` (arguments after `train`) until `fault` SIGKILLs it
        (tests/fault_injection.py): one process start for both. Also returns that process."""
        keys = self._keys(runs)
        with exclusive(self.root):
            todo = self._todo(keys, runs)
            batch = [*self._batch(todo), list(killed)]
            proc = train_many(batch, self._spec(), fault=fault)
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
            self._done(todo)
        return [self.root / key for key in keys], proc

    @staticmethod
    def _keys(runs: Sequence[tuple[str, ...]]) -> list[str]:
        from dml_cluster.config import load_config

        return [load_config(REPO / run[0], list(run[1:])).hash() for run in runs]

    def _todo(self, keys: list[str], runs: Sequence[tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        """The runs not trained yet (by this worker or another), by key."""
        return {
            key: run
            for key, run in zip(keys, runs, strict=True)
            if not (self.root / f"{key}.done").exists()
        }

    def _done(self, todo: dict[str, tuple[str, ...]]) -> None:
        for key in todo:
            (self.root / f"{key}.done").touch()

    def _spec(self) -> Path:
        return self.root / f"batch-{os.getpid()}-{next(_batches)}.json"

    def _batch(self, todo: dict[str, tuple[str, ...]]) -> list[list[str]]:
        return [
            [config, *sets(*items, f"run.out_dir={self.root}", f"run.name={key}",
                           "bus.transport=local", "metrics.enabled=false")]
            for key, (config, *items) in todo.items()
        ]  # fmt: skip


_batches = itertools.count()


@pytest.fixture(scope="session")
def references(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(shared_dir(tmp_path_factory, "references"))


@pytest.fixture(scope="session")
def forked_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of tests/forked_runs.py's jobs (the runs interrupted in each phase, the cohort
    with a factory importing torchvision), forked from one fresh interpreter once per session
    (by whichever worker asks first)."""
    shared = shared_dir(tmp_path_factory, "forked-runs")
    root = shared / "jobs"
    with exclusive(shared):
        if not (root / "codes.json").exists():
            shutil.rmtree(root, ignore_errors=True)  # what a failed attempt left
            root.mkdir()
            code = f"from tests.forked_runs import drive; drive({str(root)!r})"
            proc = subprocess.run(
                [sys.executable, "-c", code], cwd=REPO, env=cli_env(),
                capture_output=True, text=True, timeout=240,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture(scope="session")
def two_peer_launch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One torchrun launch of two peer processes for the modules whose cohorts need one
    (tests/test_imagefolder.py's zmq and torch cohorts; tests/test_finished_runs.py's finished,
    longer and --init-from runs), their entries one after the other (tests/cohort_runs.py): the
    launch's start-up (torchrun's launcher, two interpreters) is paid once a session, by
    whichever worker asks first. Each module makes its entries in the subfolder of its name
    (its `launch_entries(folder)`); the launch's stdout, stderr and exit status are in
    launch.out, launch.err and launch.code."""
    from . import test_finished_runs, test_imagefolder

    root = shared_dir(tmp_path_factory, "two-peer-launch")
    with exclusive(root):
        if not (root / "launch.code").exists():
            entries = []
            for module in (test_imagefolder, test_finished_runs):
                folder = root / module.__name__.rsplit(".", 1)[-1]
                shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
                folder.mkdir()
                entries += module.launch_entries(folder)
            proc = train_many(entries, root / "launch.json", nproc=2)
            (root / "launch.out").write_text(proc.stdout)
            (root / "launch.err").write_text(proc.stderr)
            (root / "launch.code").write_text(str(proc.returncode))
    return root


CHECKPOINTED_EPOCHS = 4  # 22 steps per epoch: checkpoints at 10, 20, 22, 30, 40, 44, ... 88


@pytest.fixture(scope="session")
def checkpointed_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/digits-dml.yaml in one process for 88 steps with every checkpoint kept (settings of
    tests/faults_helpers.py): the uninterrupted run that checkpoint, fault and CURVE tests end
    like. Read-only: copy it to change it."""
    from .faults_helpers import settings, train

    runs = shared_dir(tmp_path_factory, "checkpointed")  # one training for every worker
    with exclusive(runs):
        if not (runs / "reference.done").exists():
            proc = train(*settings(runs, "reference", epochs=CHECKPOINTED_EPOCHS))
            assert proc.returncode == 0, proc.stderr
            (runs / "reference.done").touch()
    return runs / "reference"
