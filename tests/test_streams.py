"""Each peer's own random stream (dml_cluster.streams): what a peer draws depends on its seed,
its index and its own earlier draws, never on other peers in its process; checkpoints carry the
streams per peer; older checkpoints without them still resume. In-process, no launches (the
layouts themselves are compared in tests/test_multiprocess.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from dml_cluster.checkpoint import CohortCheckpoints, Position
from dml_cluster.cohort import build_peer
from dml_cluster.config import parse_config
from dml_cluster.control import LocalControl
from dml_cluster.streams import PeerStream

CPU = torch.device("cpu")


def _draws(stream: PeerStream, n: int = 4) -> torch.Tensor:
    with stream:
        return torch.rand(n)


def test_a_peers_draws_do_not_depend_on_its_neighbours() -> None:
    """Peer 1 alone draws what it draws after peer 0 drew in between, in the same process."""
    alone = PeerStream(7, 1, CPU)
    expected = [_draws(alone), _draws(alone)]
    a, b = PeerStream(7, 0, CPU), PeerStream(7, 1, CPU)
    got = []
    for _ in range(2):
        _draws(a, 13)
        got.append(_draws(b))
    assert all(torch.equal(x, y) for x, y in zip(expected, got, strict=True))
    assert not torch.equal(_draws(PeerStream(7, 0, CPU)), _draws(PeerStream(7, 1, CPU)))
    assert not torch.equal(_draws(PeerStream(7, 1, CPU)), _draws(PeerStream(8, 1, CPU)))


def test_the_process_stream_is_left_as_it_was() -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    stream = PeerStream(0, 0, CPU)
    with stream, stream:  # re-entrant: the inner block changes nothing
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


def test_dropout_draws_from_the_peers_stream() -> None:
    stream = PeerStream(0, 2, CPU)
    dropout = torch.nn.Dropout(0.5)
    with stream:
        first = dropout(torch.ones(64))
    fresh = PeerStream(0, 2, CPU)
    torch.rand(10)  # the process's stream moves; the peer's does not
    with fresh:
        assert torch.equal(dropout(torch.ones(64)), first)


def _cohort(tmp_path: Path) -> tuple[dict, CohortCheckpoints]:
    cfg = parse_config(
        {
            "run": {"out_dir": str(tmp_path), "name": "r"},
            "data": {"name": "digits"},
            "cohort": {"size": 3, "model": "mlp", "args": {"hidden": [8]}},
        }
    )
    peers = {i: build_peer(cfg, i, (1, 8, 8), 10, CPU) for i in range(3)}
    return peers, CohortCheckpoints(cfg, cfg.run.dir)


def test_checkpoints_save_and_restore_each_peers_stream(tmp_path: Path) -> None:
    """Three peers in one process: each resumes its own stream, not the process's or the first
    peer's."""
    peers, checkpoints = _cohort(tmp_path)
    for i, peer in peers.items():
        _draws(peer.stream, 5 + i)
    folder = checkpoints.save(Position(0, 1, 1), peers, [], LocalControl())
    expected = {i: _draws(p.stream) for i, p in peers.items()}
    assert len({tuple(t.tolist()) for t in expected.values()}) == 3
    again, _ = _cohort(tmp_path)
    assert checkpoints.restore(again, LocalControl()) is not None
    for i, peer in again.items():
        assert torch.equal(_draws(peer.stream), expected[i]), i
    state = torch.load(folder / "mlp-1.pt", weights_only=True)
    assert set(state["stream"]) == {"cpu"}


def test_a_checkpoint_without_streams_resumes_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Files written before per-peer streams: the peers load, their streams start afresh."""
    peers, checkpoints = _cohort(tmp_path)
    folder = checkpoints.save(Position(0, 1, 1), peers, [], LocalControl())
    for path in folder.glob("*.pt"):  # as the previous version wrote them: no "stream"
        state = torch.load(path, weights_only=True)
        del state["stream"]
        torch.save(state, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    manifest = folder / "manifest.json"  # its digests are checked too
    raw = json.loads(manifest.read_text())
    raw["peers"] = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.pt")}
    manifest.write_text(json.dumps(raw))
    again, _ = _cohort(tmp_path)
    assert checkpoints.restore(again, LocalControl()) is not None
    assert "predates per-peer random streams" in capsys.readouterr().err
    assert torch.equal(_draws(again[1].stream), _draws(PeerStream(0, 1, CPU)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_peer_carries_its_devices_stream_without_a_host_sync() -> None:
    """Dropout on the GPU draws from the peer's CUDA stream; entering and leaving it (state get
    and set) never waits for the device."""
    gpu = torch.device("cuda", 0)
    dropout = torch.nn.Dropout(0.5)
    ones = torch.ones(1024, device=gpu)
    alone = PeerStream(5, 1, gpu)
    with alone:
        expected = dropout(ones)
    a, b = PeerStream(5, 0, gpu), PeerStream(5, 1, gpu)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with a:
            dropout(ones)
        with b:
            got = dropout(ones)
        with a:
            dropout(ones)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, expected)
    assert set(b.state_dict()) == {"cpu", "cuda"}
