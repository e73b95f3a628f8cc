"""The control channel: self-checking frames, in one process and over a real 2-process gloo group.

Frames are checked field by field in process; then two real processes (spawned, gloo over
loopback TCP) gather integers and bytes, one of them sends tampered frames (a flipped byte, the
wrong topic, the wrong step, a truncated frame) that the other refuses with a one-line
PeerError, a checkpoint whose confirmation is corrupted in transit gets no manifest, a good one
is saved and restored through the same channel, and a peer that vanishes is reported as lost.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from dml_cluster.control import (
    FRAME,
    Control,
    FrameError,
    LocalControl,
    Payload,
    Topic,
    TorchControl,
    pack_frame,
    unpack_frame,
)
from dml_cluster.errors import PeerError

from .conftest import run_spawned

NAMES = ["alpha", "beta"]


# -- frames, in process ---------------------------------------------------------------------------


def test_a_frame_round_trips_and_every_field_is_checked() -> None:
    digest = bytes(range(32))
    frame = pack_frame(Payload.BYTES, Topic.SAVED, 30, digest)
    assert len(frame) == FRAME.size + 32
    assert unpack_frame(frame, Payload.BYTES, Topic.SAVED, 30) == digest
    with pytest.raises(FrameError, match="truncated"):
        unpack_frame(frame[:10], Payload.BYTES, Topic.SAVED, 30)
    with pytest.raises(FrameError, match="payload bytes, the header says 32"):
        unpack_frame(frame[:-1], Payload.BYTES, Topic.SAVED, 30)
    with pytest.raises(FrameError, match="bad magic"):
        unpack_frame(b"XXXX" + frame[4:], Payload.BYTES, Topic.SAVED, 30)
    with pytest.raises(FrameError, match="a SAVED message where CONFIG was expected"):
        unpack_frame(frame, Payload.BYTES, Topic.CONFIG, 30)
    with pytest.raises(FrameError, match="about step 30, this process is at step 31"):
        unpack_frame(frame, Payload.BYTES, Topic.SAVED, 31)
    with pytest.raises(FrameError, match="payload type 2, expected ints"):
        unpack_frame(frame, Payload.INTS, Topic.SAVED, 30)


@pytest.mark.parametrize("where", [5, 8, 14, FRAME.size - 1, FRAME.size, FRAME.size + 31])
def test_a_flipped_byte_anywhere_is_detected(where: int) -> None:
    """Version, topic, step, checksum or payload: one flipped bit never passes."""
    frame = bytearray(pack_frame(Payload.BYTES, Topic.SAVED, 30, bytes(range(32))))
    frame[where] ^= 0x01
    with pytest.raises(FrameError):
        unpack_frame(bytes(frame), Payload.BYTES, Topic.SAVED, 30)


def test_local_control_gathers_its_own_values() -> None:
    control = LocalControl()
    assert control.all_gather_ints(Topic.RESUME_SCAN, 0, [3, -1, 2**62]) == [[3, -1, 2**62]]
    assert control.all_gather_ints(Topic.RESUME_LOAD, 7, []) == [[]]
    assert control.all_gather_bytes(Topic.CONFIG, 0, b"0123abcd") == [b"0123abcd"]


# -- two real processes ---------------------------------------------------------------------------


class _Tampering(Control):
    """Sends what `tamper` makes of every frame over a real channel (a fault on the wire)."""

    def __init__(self, inner: TorchControl, tamper: Callable[[bytes], bytes]) -> None:
        self.inner, self.tamper = inner, tamper
        self.names, self.rank = inner.names, inner.rank

    def _all_gather_frames(self, frame: bytes, topic: Topic, about: int) -> list[bytes]:
        return self.inner._all_gather_frames(self.tamper(frame), topic, about)


def _flip_last(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 0xFF])


def _retag(topic: Topic, about: int) -> Callable[[bytes], bytes]:
    def tamper(frame: bytes) -> bytes:  # a well-formed frame about something else
        kind = Payload(frame[5])
        return pack_frame(kind, topic, about, frame[FRAME.size :])

    return tamper


TAMPERING = {
    "flipped": _flip_last,
    "wrong-topic": _retag(Topic.RESUME_LOAD, 30),
    "wrong-step": _retag(Topic.SAVED, 31),
    "truncated": lambda frame: frame[: FRAME.size + 3],
}


def _config(run_dir: Path, window: int = 4):
    from dml_cluster.config import parse_config

    return parse_config({
        "run": {"out_dir": str(run_dir.parent), "name": run_dir.name},
        "cohort": {"peers": [{"name": n, "model": "mlp", "args": {"hidden": [8]}} for n in NAMES]},
        "checkpoint": {"keep": 5},
        "bus": {"transport": "zmq", "window": window},
    })  # fmt: skip


def _checkpoints(run_dir: Path, rank: int):
    from dml_cluster.checkpoint import CohortCheckpoints
    from dml_cluster.cohort import build_peer

    cfg = _config(run_dir)
    peer = build_peer(cfg, rank, (1, 8, 8), 10, torch.device("cpu"))
    return CohortCheckpoints(cfg, run_dir), {rank: peer}


def _worker(rank: int, port: int, out: str) -> None:
    from dml_cluster.checkpoint import Position
    from dml_cluster.errors import CheckpointError, ConfigError
    from dml_cluster.launch.peer import _check_same_config

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=30),
    )  # fmt: skip
    control = TorchControl(NAMES, timeout_s=5.0)
    result: dict[str, object] = {}
    result["ints"] = control.all_gather_ints(Topic.RESUME_SCAN, 0, [rank] * (1 + 2 * rank))
    result["bytes"] = [b.hex() for b in control.all_gather_bytes(Topic.CONFIG, 0, b"h%d" % rank)]
    # the start-up check: the same config passes; another window (outside the hash) does not
    _check_same_config(_config(Path(out) / "run"), control)
    try:
        _check_same_config(_config(Path(out) / "run", window=4 if rank == 0 else 2), control)
        result["config"] = "accepted"
    except ConfigError as err:
        result["config"] = str(err)
    for name, tamper in TAMPERING.items():
        channel = _Tampering(control, tamper) if rank == 1 else control
        try:
            channel.all_gather_bytes(Topic.SAVED, 30, bytes(range(37)))
            result[name] = "accepted"
        except PeerError as err:
            result[name] = str(err)
    # a save whose confirmation is corrupted in transit: refused, no manifest
    run_dir = Path(out) / "run"
    checkpoints, peers = _checkpoints(run_dir, rank)
    channel = _Tampering(control, _flip_last) if rank == 1 else control
    try:
        checkpoints.save(Position(0, 3, 3), peers, [], channel)
        result["corrupt-save"] = "saved"
    except (PeerError, CheckpointError) as err:
        result["corrupt-save"] = str(err)
    # then a good save and a resume, both through the channel
    checkpoints.save(Position(0, 5, 5), peers, [{"epoch": 0}], control)
    restored = checkpoints.restore(peers, control)
    result["restored"] = restored.position.step if restored else None
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 1:
        os._exit(0)  # vanish without a word: the other process must say so
    t0 = time.monotonic()
    try:
        control.all_gather_ints(Topic.RESUME_LOAD, 5, [0])
        Path(out, "lost.txt").write_text("no error")
    except PeerError as err:
        Path(out, "lost.txt").write_text(f"{time.monotonic() - t0:.1f} {err}")
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("control")
    port = _free_port()
    run_spawned(_worker, [(r, port, str(out)) for r in range(2)])
    return out


def _result(out: Path, rank: int) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


def test_peers_given_different_bus_windows_are_refused_at_start_up(two_processes: Path) -> None:
    """The config hash leaves the bus out (it does not change the numbers), but peers with
    different windows would drop each other's messages: the start-up check refuses them."""
    assert _result(two_processes, 0)["config"].startswith(
        "peer 1 (beta, rank 1) runs a different config ("
    )
    assert "window 2; mine: hash" in _result(two_processes, 0)["config"]
    assert "every peer must be given the same config" in _result(two_processes, 1)["config"]


def test_integers_and_bytes_are_gathered_in_process_order(two_processes: Path) -> None:
    for rank in range(2):
        got = _result(two_processes, rank)
        assert got["ints"] == [[0], [1, 1, 1]]
        assert got["bytes"] == [b"h0".hex(), b"h1".hex()]


@pytest.mark.parametrize(
    ("tampering", "reason"),
    [
        ("flipped", "checksum mismatch"),
        ("wrong-topic", "a RESUME_LOAD message where SAVED was expected"),
        ("wrong-step", "about step 31, this process is at step 30"),
        ("truncated", "payload bytes, the header says 37"),
    ],
)
def test_a_tampered_confirmation_is_refused_naming_its_sender(
    two_processes: Path, tampering: str, reason: str
) -> None:
    message = _result(two_processes, 0)[tampering]
    assert message.startswith(
        "peer 1 (beta, rank 1) sent an unusable control message while confirming the "
        "checkpoint of step 30: "
    ), message
    assert reason in message and "\n" not in message


def test_a_corrupted_save_confirmation_leaves_no_manifest(two_processes: Path) -> None:
    for rank in range(2):
        message = _result(two_processes, rank)["corrupt-save"]
        assert "peer 1 (beta, rank 1) sent an unusable control message" in message
    checkpoints = two_processes / "run" / "checkpoints"
    assert not (checkpoints / "step-000000003" / "manifest.json").exists()
    manifest = json.loads((checkpoints / "step-000000005" / "manifest.json").read_text())
    assert sorted(manifest["peers"]) == NAMES
    assert [_result(two_processes, r)["restored"] for r in range(2)] == [5, 5]


def test_a_vanished_peer_is_reported_as_lost(two_processes: Path) -> None:
    seconds, message = (two_processes / "lost.txt").read_text().split(" ", 1)
    assert message.startswith(
        "lost contact with the cohort while loading the checkpoint of step 5 "
        "(one of: peer 1 (beta, rank 1))"
    ), message
    assert float(seconds) < 5.0 + 5.0  # within the channel's timeout, plus slack
