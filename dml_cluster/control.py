"""The cohort's control channel: what the processes agree on that is not a prediction.

The start-up config check, the resume agreement (which step every process can load, and whether
its files verify in every process) and the checkpoint save confirmations (every peer's file
digest) all go through one `Control`, never through the bus that carries predictions. An
operation is an all-gather: every process hands in integers or bytes and gets back every
process's, in process order.

Every message is a self-checking frame (little-endian, 28-byte header, then the payload)::

    magic 4s | version B | type B | topic H | about q | length I | checksum 8s

`type` says integers or bytes, `topic` what the message is about (a config hash, a resume
report, a save confirmation), `about` which step, `length` the payload's size and `checksum`
the first 8 bytes of the sha256 of the header (checksum zeroed) and payload. A frame that is
corrupt, truncated, of another type or topic, or about another step is refused with a
`PeerError` naming the process that sent it; nothing is ever unpickled.

`LocalControl` is the one-process engine's (every peer in one process: nothing travels, the
frame is still checked); `TorchControl` all-gathers plain uint8 tensors over a dedicated gloo
process group, so control traffic stays on the CPU even when predictions go over NCCL.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import timedelta
from enum import IntEnum

import torch
import torch.distributed as dist

from dml_cluster.errors import PeerError, first_line

MAGIC = b"DMLK"
VERSION = 1
FRAME = struct.Struct("<4sBBHqI8s")
MAX_PAYLOAD = 1 << 20
"""The largest payload a control message may carry (1 MiB); control messages are small."""

_INT = struct.Struct("<q")


class Topic(IntEnum):
    """What a control message is about; `about` is a step for the checkpoint topics."""

    CONFIG = 1  # start-up: every process's config hash
    RESUME_SCAN = 2  # resume: the steps a process has files and manifests for
    RESUME_LOAD = 3  # resume: whether a process loaded the agreed step
    SAVED = 4  # checkpoint save: the digests of the files a process wrote for a step
    RESUME_VERIFY = 5  # resume: whether a process's files of a step verify (and why not)
    RUN_FOLDER = 6  # start-up: whether a process could claim its share of the run folder
    RUN_NONCE = 7  # start-up: the launch's random nonce in the wire's run id (rank 0 draws it)
    BUILD = 8  # start-up: whether a process could build its peers (models, weights, method)
    STANDING = 9  # start-up: what the run folder holds for the config (a finished run?)
    REPLICA_STREAMS = 10  # checkpoint save: a data-parallel replica's random stream
    METRICS = 11  # start-up: whether a process could serve its metrics and open its loggers


_DOING = {
    Topic.CONFIG: "comparing configs at start-up",
    Topic.RESUME_SCAN: "agreeing on the step to resume from",
    Topic.RESUME_LOAD: "loading the checkpoint of step {about}",
    Topic.SAVED: "confirming the checkpoint of step {about}",
    Topic.RESUME_VERIFY: "verifying the checkpoint of step {about}",
    Topic.RUN_FOLDER: "claiming the run folder",
    Topic.RUN_NONCE: "agreeing on the run id",
    Topic.BUILD: "building the peers",
    Topic.STANDING: "reading the run folder's checkpoints",
    Topic.REPLICA_STREAMS: "gathering the replicas' random streams for step {about}",
    Topic.METRICS: "starting the metrics endpoints",
}


class Payload(IntEnum):
    INTS = 1
    BYTES = 2


class FrameError(ValueError):
    """A control frame that cannot be used; the reason is in the message."""


def pack_frame(kind: Payload, topic: Topic, about: int, payload: bytes) -> bytes:
    """A self-checking frame carrying `payload`."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"control payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = FRAME.pack(MAGIC, VERSION, kind, topic, about, len(payload), bytes(8))
    checksum = hashlib.sha256(head + payload).digest()[:8]
    return head[: -len(checksum)] + checksum + payload


def unpack_frame(frame: bytes, kind: Payload, topic: Topic, about: int) -> bytes:
    """The payload of `frame`, after checking every header field against what was expected."""
    if len(frame) < FRAME.size:
        raise FrameError(f"truncated: {len(frame)} bytes, a header alone is {FRAME.size}")
    magic, version, got_kind, got_topic, got_about, length, checksum = FRAME.unpack_from(frame)
    if magic != MAGIC:
        raise FrameError("bad magic (not a control message)")
    if version != VERSION:
        raise FrameError(f"control format version {version}, this process speaks {VERSION}")
    if len(frame) != FRAME.size + length:
        raise FrameError(f"{len(frame) - FRAME.size} payload bytes, the header says {length}")
    blank = frame[: FRAME.size - len(checksum)] + bytes(len(checksum))
    if hashlib.sha256(blank + frame[FRAME.size :]).digest()[:8] != checksum:
        raise FrameError("checksum mismatch (corrupted in transit)")
    if got_topic != topic:
        raise FrameError(f"a {_topic_name(got_topic)} message where {topic.name} was expected")
    if got_about != about:
        raise FrameError(f"about step {got_about}, this process is at step {about} (out of sync)")
    if got_kind != kind:
        raise FrameError(f"payload type {got_kind}, expected {kind.name.lower()}")
    return frame[FRAME.size :]


class Control(ABC):
    """All-gathers of integers or bytes among the cohort's processes, every message checked.

    Every process must make the same calls in the same order (they are collective).
    `names[p]` names process p in errors (for one peer per process: the peer's name).
    """

    names: list[str]
    rank: int

    def all_gather_bytes(self, topic: Topic, about: int, data: bytes) -> list[bytes]:
        """Every process's `data` for (topic, about), in process order."""
        return self._gather(Payload.BYTES, topic, about, bytes(data))

    def all_gather_ints(self, topic: Topic, about: int, values: Sequence[int]) -> list[list[int]]:
        """Every process's list of (64-bit signed) integers for (topic, about)."""
        payload = b"".join(_INT.pack(int(v)) for v in values)
        frames = self._gather(Payload.INTS, topic, about, payload)
        out = []
        for process, data in enumerate(frames):
            if len(data) % _INT.size:
                raise self._bad(process, topic, about, f"{len(data)} bytes of integers")
            out.append([v for (v,) in _INT.iter_unpack(data)])
        return out

    def _gather(self, kind: Payload, topic: Topic, about: int, payload: bytes) -> list[bytes]:
        frames = self._all_gather_frames(pack_frame(kind, topic, about, payload), topic, about)
        out = []
        for process, frame in enumerate(frames):
            try:
                out.append(unpack_frame(frame, kind, topic, about))
            except FrameError as err:
                raise self._bad(process, topic, about, str(err)) from None
        return out

    def _bad(self, process: int, topic: Topic, about: int, reason: str) -> PeerError:
        doing = _DOING[topic].format(about=about)
        return PeerError(
            f"{self._who(process)} sent an unusable control message while {doing}: {reason}"
        )

    def _who(self, process: int) -> str:
        return f"peer {process} ({self.names[process]}, rank {process})"

    @abstractmethod
    def _all_gather_frames(self, frame: bytes, topic: Topic, about: int) -> list[bytes]:
        """Every process's frame, in process order, as received (checked by the caller)."""

    def close(self) -> None:  # noqa: B027 - optional for channels holding nothing
        """Release what the channel holds; safe to call twice."""


class LocalControl(Control):
    """The one-process engine's channel: this process is the whole cohort."""

    def __init__(self, name: str = "this process") -> None:
        self.names, self.rank = [name], 0

    def _all_gather_frames(self, frame: bytes, topic: Topic, about: int) -> list[bytes]:
        return [frame]


class TorchControl(Control):
    """All-gathers over a dedicated gloo group: lengths first, then the frames padded to the
    longest, as uint8 tensors on the CPU. Build it after `dist.init_process_group`, in every
    process at the same point (creating a group is collective)."""

    def __init__(self, names: Sequence[str], timeout_s: float) -> None:
        self.names, self.rank = list(names), dist.get_rank()
        self.world = dist.get_world_size()
        try:
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError, dist.DistError) as err:
            why = first_line(err)
            raise PeerError(f"cannot set up the cohort's control channel: {why}") from None

    def _all_gather_frames(self, frame: bytes, topic: Topic, about: int) -> list[bytes]:
        try:
            size = torch.tensor([len(frame)], dtype=torch.int64)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(sizes, size, group=self.group)
            lengths = [int(s.item()) for s in sizes]
            for process, n in enumerate(lengths):
                if not 0 < n <= FRAME.size + MAX_PAYLOAD:
                    raise self._bad(process, topic, about, f"announced {n} bytes")
            mine = torch.zeros(max(lengths), dtype=torch.uint8)
            mine[: len(frame)] = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
            frames = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(frames, mine, group=self.group)
        except (RuntimeError, dist.DistBackendError) as err:
            others = ", ".join(self._who(p) for p in range(self.world) if p != self.rank)
            doing = _DOING[topic].format(about=about)
            raise PeerError(
                f"lost contact with the cohort while {doing} (one of: {others}): {first_line(err)}"
            ) from None
        return [f[:n].numpy().tobytes() for f, n in zip(frames, lengths, strict=True)]

    def close(self) -> None:
        group, self.group = getattr(self, "group", None), None
        if group is not None:
            # a dead peer can make teardown fail; there is nothing left to agree on then
            with contextlib.suppress(RuntimeError, ValueError):
                dist.destroy_process_group(group)


def _topic_name(value: int) -> str:
    try:
        return Topic(value).name
    except ValueError:
        return f"unknown topic {value}"
