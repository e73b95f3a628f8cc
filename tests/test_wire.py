"""The zmq wire format and what a peer does with bad messages, over real sockets.

Two real ZmqBus peers (one per thread) meet through a real TCPStore; an intruder connects a
plain zmq socket to a peer's inbox and sends garbage, truncated headers, foreign-run and stale
messages (dropped and counted), and a wrong batch fingerprint (a clear "out of sync" error).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import zmq

from dml_cluster.bus import EVAL_ROUND, StepKey
from dml_cluster.bus.encoding import FLOAT32, Encoding
from dml_cluster.bus.wire import (
    HEADER,
    TOPK,
    Header,
    Kind,
    WireError,
    decode,
    encode,
    encode_sent,
    unpack_header,
)  # fmt: skip
from dml_cluster.bus.zmq_bus import ZmqBus
from dml_cluster.errors import ConfigError, PeerError
from dml_cluster.sparse_rows import TopK, encode_topk

RUN = b"run-0001"
HASH = "0123456789abcdef"


def test_header_round_trip_and_validation() -> None:
    h = Header(Kind.DATA, 1, RUN, 7, 2, 1, 1, 2**64 - 5, 128, 10)
    assert unpack_header(h.pack()) == h
    with pytest.raises(WireError, match="header of 3 bytes"):
        unpack_header(b"abc")
    with pytest.raises(WireError, match="bad magic"):
        unpack_header(b"XXXX" + h.pack()[4:])
    with pytest.raises(WireError, match="version"):
        unpack_header(h.pack()[:4] + b"\x09" + h.pack()[5:])
    with pytest.raises(WireError, match="unknown message kind 9"):
        unpack_header(h.pack()[:5] + b"\x09" + h.pack()[6:])
    credit = Header(Kind.CREDIT, 1, RUN, 6, 0, 1, 1, 0, 0, 0)
    assert unpack_header(credit.pack()) == credit
    with pytest.raises(WireError, match="a CREDIT message with a 4x3 payload"):
        unpack_header(Header(Kind.CREDIT, 1, RUN, 6, 0, 1, 1, 0, 4, 3).pack())


def _topk_message(**change: int) -> tuple[Header, bytes]:
    rows = encode_topk(torch.randn(5, 300).log_softmax(dim=1), 4)  # int16 ids, bf16 values
    fields, body = encode_sent(rows)
    header = Header(Kind.DATA, run_id=RUN, step=3, round=0, sender_rank=1, sender_peer=1,
                    fingerprint=9, **{**fields, **change})  # fmt: skip
    return header, body.numpy().tobytes()


def test_topk_rows_round_trip_through_the_wire_format() -> None:
    rows = encode_topk(torch.randn(5, 300).log_softmax(dim=1), 4)
    fields, body = encode_sent(rows)
    assert fields == dict(encoding=TOPK, rows=5, cols=4, values=3, classes=300)
    assert body.numel() == 5 * 4 * (2 + 2)  # int16 indices, bfloat16 values
    header = unpack_header(Header(Kind.DATA, run_id=RUN, step=3, round=0, sender_rank=1,
                                  sender_peer=1, fingerprint=9, **fields).pack())  # fmt: skip
    got = decode(header, body.numpy().tobytes())
    assert torch.equal(got.indices, rows.indices.long())
    assert torch.equal(got.values, rows.values.float())
    assert got.num_classes == 300


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"cols": 301}, "keeping 301 of 300 classes"), ({"cols": 0, "rows": 0}, "keeping 0 of"),
     ({"values": 7}, "top-k values of unknown encoding 7"),
     ({"classes": 0}, "keeping 4 of 0 classes"), ({"rows": 6}, "payload of 80 bytes")],
)  # fmt: skip
def test_malformed_topk_headers_are_refused(change: dict, reason: str) -> None:
    header, body = _topk_message(**change)
    with pytest.raises(WireError, match=reason):
        decode(unpack_header(header.pack()), body)


def test_a_topk_index_outside_the_classes_is_refused() -> None:
    header, body = _topk_message()
    forged = bytearray(body)
    forged[0:2] = (300).to_bytes(2, "little")  # the first row's first index: class 300 of 300
    with pytest.raises(WireError, match="top-k index outside 0..299"):
        decode(unpack_header(header.pack()), bytes(forged))


@pytest.mark.parametrize("encoding", ["float32", "float16", "bfloat16"])
def test_payload_encodings(encoding: str) -> None:
    x = torch.randn(5, 3).log_softmax(1)
    eid, payload = encode(x, encoding)
    h = Header(Kind.DATA, eid, RUN, 0, 0, 0, 0, 0, 5, 3)
    got = decode(h, payload.view(torch.uint8).numpy().tobytes())
    tol = {"float32": 0, "float16": 1e-2, "bfloat16": 5e-2}[encoding]
    assert got.dtype == torch.float32 and torch.allclose(got, x, atol=tol, rtol=tol)
    with pytest.raises(WireError, match="payload of"):
        decode(h, b"\x00" * 7)


def _pair(timeout_s: float = 5.0, hashes: tuple[str, str] = (HASH, HASH)) -> list[ZmqBus]:
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    stores = [master, dist.TCPStore("127.0.0.1", master.port, is_master=False)]
    buses: list = [None, None]
    errors: list = [None, None]

    def build(rank: int) -> None:
        try:
            buses[rank] = ZmqBus(
                rank=rank, world=2, names=["alpha", "beta"], run_id=RUN,
                config_hash=hashes[rank], store=stores[rank], address="127.0.0.1",
                timeout_s=timeout_s,
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - handed back to the test
            errors[rank] = err

    threads = [threading.Thread(target=build, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(errors):
        for b in buses:
            if b is not None:
                b.close()
        # the most telling error first: a config mismatch over a peer giving up waiting
        raise next((e for e in errors if isinstance(e, ConfigError)), None) or next(
            e for e in errors if e
        )
    return buses


@pytest.fixture
def pair() -> Iterator[list[ZmqBus]]:
    buses = _pair()
    yield buses
    for b in buses:
        b.close()


def _exchange_both(buses: list[ZmqBus], step: int, fp: int = 42) -> list[dict]:
    out: list = [None, None]
    tensors = [torch.full((4, 3), float(r)) for r in range(2)]

    def go(rank: int) -> None:
        out[rank] = buses[rank].exchange(StepKey(step, 0, fp), {rank: tensors[rank]}, [0, 1])

    threads = [threading.Thread(target=go, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return out


@pytest.fixture
def intruder(pair: list[ZmqBus]) -> Iterator[zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pair[0].endpoint)
    yield sock
    sock.close()
    ctx.term()


def _header(**change: object) -> bytes:
    fields = dict(kind=Kind.DATA, encoding=1, run_id=RUN, step=0, round=0, sender_rank=1,
                  sender_peer=1, fingerprint=42, rows=4, cols=3)  # fmt: skip
    fields.update(change)
    return Header(**fields).pack()


def test_exchange_between_real_peers(pair: list[ZmqBus]) -> None:
    out = _exchange_both(pair, 0)
    for rank in range(2):
        assert torch.equal(out[rank][0], torch.zeros(4, 3))
        assert torch.equal(out[rank][1], torch.ones(4, 3))
    assert pair[0].stats.bytes_sent == HEADER.size + 4 * 3 * 4


def test_bad_messages_are_dropped_and_counted(pair: list[ZmqBus], intruder: zmq.Socket) -> None:
    _exchange_both(pair, 0)
    payload = b"\x00" * 48
    bad = [
        [b"garbage bytes, not a message"],  # one frame
        [b"\x00" * 200, b"junk"],  # no magic
        [_header()[:20], payload],  # truncated header
        [_header(run_id=b"other-rn"), payload],  # another run
        [_header(step=0), payload],  # stale: step 0 is over
        [_header(step=1, rows=1000), payload],  # payload shorter than the header says
        [_header(step=1, sender_rank=7), payload],  # no such peer
        [_header(step=1, sender_rank=0), payload],  # claims to be the receiver itself
        [_header(step=100), payload],  # far beyond the credit window
        [_header(kind=Kind.CREDIT, rows=0, cols=0), b"x"],  # a credit carries no payload
        [_header(kind=Kind.CREDIT, step=500, rows=0, cols=0), b""],  # credit for a future step
        # top-k rows (encoding 4): k > C, values of no known dtype, a dense one with top-k fields
        [_header(step=1, encoding=4, values=3, classes=10, cols=11), payload],
        [_header(step=1, encoding=4, values=9, classes=10), payload],
        [_header(step=1, values=3, classes=10), payload],
        # sampled rows (encoding 5) of 3 draws over 10 classes, uint8 ids and counts, bf16
        # values: no draws; a count too many; an id outside the classes
        [_header(step=1, encoding=5, values=3, classes=10, cols=0), payload],
        [
            _header(step=1, encoding=5, values=3, classes=10, rows=4, cols=3),
            bytes([0, 1, 2] * 4) + bytes([2, 1, 1] * 4) + b"\x00" * 24,
        ],
        [
            _header(step=1, encoding=5, values=3, classes=10, rows=4, cols=3),
            bytes([10, 1, 2] * 4) + bytes([1, 1, 1] * 4) + b"\x00" * 24,
        ],
    ]
    for frames in bad:
        intruder.send_multipart(frames)
    time.sleep(0.3)  # let them arrive before the honest step-1 messages
    # the inbox takes turns between connections, so the intruder's messages are read over the
    # next few steps; every step still gets the honest peer's data
    for step in range(1, 12):
        out = _exchange_both(pair, step)
        assert torch.equal(out[0][1], torch.ones(4, 3))
        if pair[0].stats.messages_rejected == len(bad):
            break
    assert pair[0].stats.messages_rejected == len(bad)
    assert pair[1].stats.messages_rejected == 0


def test_a_flood_is_counted_and_reported_once_per_kind(
    pair: list[ZmqBus], intruder: zmq.Socket, capfd: pytest.CaptureFixture[str]
) -> None:
    """A stranger pushing a message for each of hundreds of future steps: every one dropped and
    counted, one stderr line for them all (not one per step: logs cannot be flooded)."""
    _exchange_both(pair, 0)
    flood = 300
    for step in range(100, 100 + flood):
        intruder.send_multipart([_header(step=step), b"\x00" * 48])
    time.sleep(0.3)
    for step in range(1, 40):
        _exchange_both(pair, step)
        if pair[0].stats.messages_rejected == flood:
            break
    assert pair[0].stats.messages_rejected == flood
    lines = [line for line in capfd.readouterr().err.splitlines() if "dropped a message" in line]
    assert len(lines) == 1, lines
    assert "beyond the credit window" in lines[0] and "only counted" in lines[0]


def test_wrong_fingerprint_is_an_out_of_sync_error(
    pair: list[ZmqBus], intruder: zmq.Socket
) -> None:
    _exchange_both(pair, 0)
    intruder.send_multipart([_header(step=1, fingerprint=999), b"\x00" * 48])
    with pytest.raises(PeerError, match="peers out of sync at step 1: peer 1 \\(beta, rank 1\\)"):
        pair[0].exchange(StepKey(1, 0, 42), {0: torch.zeros(4, 3)}, [0, 1])


def test_a_sender_waits_for_credit_and_names_the_receiver_that_gives_none(
    pair: list[ZmqBus],
) -> None:
    """A publish-only sender (as a teacher) gets `window` steps ahead of a receiver that never
    consumes, then waits for its credit and gives up after the timeout, naming it."""
    sender = pair[0]
    sender.window, sender.timeout_s = 2, 0.5
    for step in range(2):
        sender.exchange(StepKey(step, 0, 42), {0: torch.zeros(4, 3)}, [0, 1], receivers=[1])
    assert sender.stats.max_lead_steps == 2
    with pytest.raises(PeerError, match=r"at step 2 round 0 from peer 1 \(beta, rank 1\)"):
        sender.exchange(StepKey(2, 0, 42), {0: torch.zeros(4, 3)}, [0, 1], receivers=[1])


def test_silent_peer_times_out_naming_it(pair: list[ZmqBus]) -> None:
    pair[0].timeout_s = 0.5
    with pytest.raises(PeerError, match=r"peer 1 \(beta, rank 1\), last step seen -1"):
        pair[0].exchange(StepKey(0, 0, 42), {0: torch.zeros(4, 3)}, [0, 1])


def test_handshake_refuses_a_different_config() -> None:
    with pytest.raises(ConfigError, match="runs a different config"):
        _pair(hashes=(HASH, "fedcba9876543210"))


def test_early_messages_from_the_next_step_are_kept(pair: list[ZmqBus]) -> None:
    # peer 1 runs ahead: its step-0 and step-1 messages are both waiting when peer 0 asks
    for step in (0, 1):
        pair[1]._publish(StepKey(step, 0, 42), torch.full((4, 3), float(step)), to=[0])
    time.sleep(0.2)
    for step in (0, 1):
        got = pair[0].exchange(StepKey(step, 0, 42), {0: torch.zeros(4, 3)}, [0, 1])
        assert torch.equal(got[1], torch.full((4, 3), float(step)))


def _exchange_told(
    buses: list[ZmqBus], key: StepKey, tensors: list[torch.Tensor], told: list[Encoding | None]
) -> tuple[list, list]:
    """Both peers exchange `key`, each told its encoding in `told` (None: the bus's own)."""
    out: list = [None, None]
    errors: list = [None, None]

    def go(rank: int) -> None:
        try:
            out[rank] = buses[rank].exchange(
                key, {rank: tensors[rank]}, [0, 1], encoding=told[rank]
            )
        except PeerError as err:
            errors[rank] = err

    threads = [threading.Thread(target=go, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return out, errors


def test_an_exchange_told_float32_travels_dense_on_a_topk_bus(pair: list[ZmqBus]) -> None:
    """On a top-k bus (k = 2 of 3 classes) a training round carries top-k rows; an exchange
    told FLOAT32 (the evaluation's) carries every peer's float32 rows bit for bit, as a dense
    float32 message (header + rows x C x 4 bytes, counted in the same counters)."""
    for bus in pair:
        bus.encoding = Encoding("topk", k=2)
    tensors = [torch.randn(4, 3).log_softmax(1) for _ in range(2)]
    out, errors = _exchange_told(pair, StepKey(0, 0, 42), tensors, [None, None])
    assert errors == [None, None] and isinstance(out[0][1], TopK)
    sent = pair[0].stats.bytes_sent
    out, errors = _exchange_told(pair, StepKey(0, EVAL_ROUND, 42), tensors, [FLOAT32, FLOAT32])
    assert errors == [None, None]
    for rank in range(2):
        assert torch.equal(out[rank][0], tensors[0]) and torch.equal(out[rank][1], tensors[1])
    assert pair[0].stats.bytes_sent - sent == HEADER.size + 4 * 3 * 4
    assert pair[0].stats.messages_rejected == pair[1].stats.messages_rejected == 0


def test_a_message_not_in_the_exchanges_encoding_is_dropped_and_counted(
    pair: list[ZmqBus], capfd: pytest.CaptureFixture[str]
) -> None:
    """Peers told different encodings for one exchange: each drops the other's message as not
    the form it expects (counted, one stderr line) and gives up waiting, naming the other."""
    for bus in pair:
        bus.timeout_s = 0.5
    tensors = [torch.zeros(4, 3), torch.ones(4, 3)]
    _, errors = _exchange_told(pair, StepKey(0, 0, 42), tensors, [FLOAT32, Encoding("bfloat16")])
    assert all(isinstance(e, PeerError) and "no answer" in str(e) for e in errors), errors
    assert pair[0].stats.messages_rejected == pair[1].stats.messages_rejected == 1
    err = capfd.readouterr().err
    assert (
        "a message of bfloat16 (3 classes) x 4 rows for step 0 round 0, where this peer "
        "expects float32 (3 classes) x 4 rows" in err
    ), err
