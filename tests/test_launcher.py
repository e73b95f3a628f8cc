"""The launcher's edges, with real processes: `--nproc K` is checked before torch's launcher
starts anything; a cohort/world-size mismatch under plain torchrun is reported once; Ctrl-C
under `--nproc 2` is one line and exit 130, leaves no process behind, and the next run resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import yaml

from .cohort_runs import cli_each, sets
from .faults_helpers import CONFIG, REPO, env, free_port, lines, train, wait_for

BROKEN = "tests.model_factories:broken"  # raises ValueError("boom")
SIZE = 2  # CONFIG's cohort: 2 small CNNs on digits, 22 steps per epoch


def _one_line(proc: subprocess.CompletedProcess, *phrases: str) -> str:
    """The only thing the command wrote: one line on stderr, no traceback."""
    assert proc.stdout == "", proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    written = proc.stderr.strip().splitlines()
    assert len(written) == 1, proc.stderr
    for phrase in phrases:
        assert phrase in written[0], written[0]
    return written[0]


def test_nproc_must_be_the_cohort_size(tmp_path: Path) -> None:
    """0, -1 and a K that is not the cohort size: exit 2 with one line naming the right
    --nproc, before anything starts (no run folder)."""
    quiet = sets(f"run.out_dir={tmp_path}", "metrics.enabled=false")
    cases = [
        ["--nproc", "0"],
        ["--nproc", "-1"],
        ["--nproc", "3"],
        ["--nproc", "1", "--set", "bus.transport=torch"],
        ["--nproc", "2", "--max-restarts", "-1"],
    ]
    runs = cli_each([["train", CONFIG, *c, *quiet] for c in cases], tmp_path / "cases.json")
    for case, proc in zip(cases[:4], runs, strict=False):
        assert proc.returncode == 2, (case, proc.stderr)
        _one_line(proc, f"--nproc {case[1]}", f"--nproc {SIZE}")
    assert runs[4].returncode == 2
    _one_line(runs[4], "--max-restarts -1")
    assert not list(tmp_path.glob("digits-dml*")), "a refused launch wrote a run folder"
    # one real process: the status the shell sees
    proc = train("--nproc", "0", *quiet, timeout=60)
    assert proc.returncode == 2
    _one_line(proc, "--nproc 0", f"--nproc {SIZE}")


def test_a_peer_that_cannot_build_its_model_under_nproc_is_one_line(tmp_path: Path) -> None:
    """Only rank 1's model fails to build: rank 1 says why in one line (not rank 0, not the
    launcher, not torch), the status is 2, and the run folder its claim made is gone."""
    config = tmp_path / "bad-peer.yaml"
    peers = [{"name": "good", "model": "small_cnn"}, {"name": "bad", "model": BROKEN}]
    config.write_text(yaml.safe_dump({"data": {"name": "digits"}, "cohort": {"peers": peers}}))
    out = tmp_path / "runs"
    proc = train(
        "--nproc", "2", *sets(f"run.out_dir={out}", "metrics.enabled=false", "bus.transport=zmq"),
        config=str(config), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "bus inbox" not in line]
    assert len(said) == 1, proc.stderr
    assert "cohort.peers.1.model" in said[0] and "raised ValueError: boom" in said[0], said[0]
    assert not out.exists(), sorted(out.rglob("*"))


def test_a_world_size_mismatch_under_torchrun_is_reported_once(tmp_path: Path) -> None:
    """Plain torchrun with 3 processes for a cohort of 2: one line (local rank 0's) that names
    both ways to start it right, not one per worker; the others exit quietly."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=3", "--nnodes=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--monitor-interval=0.2", "-m", "dml_cluster", "train", CONFIG,
        *sets(f"run.out_dir={tmp_path}", "bus.transport=zmq", "metrics.enabled=false"),
    ]  # fmt: skip
    proc = subprocess.run(
        command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    reported = lines(output, "WORLD_SIZE is 3")
    assert len(reported) == 1, output
    assert f"--nproc {SIZE}" in reported[0] and f"--nproc-per-node {SIZE}" in reported[0]
    assert "exitcode  : 2" in output  # torchrun's own summary: the cause is the config error
    # torchrun prints its own traceback; none comes from a peer process
    assert not [line for line in output.splitlines() if "dml_cluster/" in line], output


def test_ctrl_c_under_nproc_stops_everything_in_one_line_and_the_next_run_resumes(
    tmp_path: Path,
) -> None:
    """Ctrl-C (SIGINT to the launcher's process group, peers and their loader workers included)
    in the middle of a `--nproc 2` run of the default local transport (which --nproc makes zmq,
    said in one line): exit 130, one line, no traceback, no process left; a run of the same
    folder resumes. The Ctrl-C comes at the epoch boundary, inside the loader's resuming of its
    persistent workers (2 per peer), where tracebacks were seen (issue 21, item 4; the other
    phases: tests/test_interrupts.py): `DML_CLUSTER_TEST_SIGINT_AT` makes rank 0 send it there,
    to the launcher's process group, as a terminal does."""
    name = "interrupted"
    args = sets(
        f"run.out_dir={tmp_path}", f"run.name={name}", "train.epochs=2", "data.workers=2",
        "data.train_subset.per_class=40",  # 6 steps an epoch: the boundary comes soon
        "metrics.enabled=false", "checkpoint.every_steps=2", "checkpoint.keep=100",
    )  # fmt: skip
    launcher = subprocess.Popen(
        [sys.executable, "-m", "dml_cluster", "train", CONFIG, *args, "--nproc", str(SIZE)],
        cwd=REPO, env=env(DML_CLUSTER_TEST_SIGINT_AT="epoch-boundary"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a shell's foreground job
    )  # fmt: skip
    try:
        wait_for(tmp_path / name / "checkpoints" / "step-000000002" / "manifest.json", launcher)
        started = psutil.Process(launcher.pid).children(recursive=True)
        assert len(started) >= SIZE * 3, started  # the peers and their loader workers
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    output = stdout + stderr
    assert launcher.returncode == 130, output
    assert "Traceback" not in output and "Exception ignored" not in output, output
    assert "[rank" not in output, output
    assert len(lines(output, "becomes zmq")) == 1, output
    stopped = lines(output, "stopped")
    assert len(stopped) == 1 and stopped[0].startswith("dml-cluster: stopped by SIGINT"), output
    others = [
        line for line in stderr.splitlines()
        if not any(said in line for said in ("stopped", "bus inbox", "becomes zmq"))
    ]  # fmt: skip
    assert others == [], stderr  # torch's relay lines ("closing signal") are left out too
    assert "epoch 1/2" in stdout and "epoch 2/2" not in stdout, stdout  # at the boundary
    assert not (tmp_path / name / "summary.json").exists(), "the run ended before Ctrl-C"
    _, left = psutil.wait_procs(started, timeout=10)  # loader workers see their peer go
    assert not left, f"processes outlived the launcher: {left}"

    resumed = train(*args, timeout=120)  # all peers in one process: checkpoints fit any layout
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming at step 6 (epoch 2, step 0 of it)" in resumed.stdout, resumed.stdout
    assert (tmp_path / name / "summary.json").exists()
