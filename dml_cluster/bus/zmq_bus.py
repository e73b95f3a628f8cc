"""The zmq transport: one PULL inbox per peer, one PUSH outbox to every other peer.

PUSH queues messages for a connected endpoint instead of dropping them (unlike PUB, which loses
what it sends before a subscription settles), so no first message is lost. Each peer binds its
inbox on its own address, publishes the endpoint in the torch.distributed store that torchrun
already runs, connects to everyone else's, then the cohort handshakes (config hash in the hello)
before step 0. Messages for a later step or round are buffered; anything malformed, foreign or
stale is dropped and counted, never unpickled, never crashes the peer.

Buffering is bounded by a credit window of `window` steps. A receiver that starts step t has
consumed every message of the steps before it and says so: its own DATA for step t tells the
peers it sends to, a CREDIT(t - 1) message tells the others (a teacher, which receives nothing
during training). A sender publishes step t to a receiver only when t - consumed <= window,
waiting for credit otherwise (the same timeout and error as a missing prediction), so no peer
holds more than `window` steps of another's messages and a teacher runs at most `window` steps
ahead of the slowest student. A message beyond the window is a protocol violation: dropped and
counted. Bounded zmq high-water marks are the second line of defence.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta

import torch
import zmq
from torch import Tensor

from dml_cluster.bus.base import Bus, BusStats, StepKey
from dml_cluster.bus.curve import CurveGuard, CurveKeys
from dml_cluster.bus.encoding import Encoding, Sent
from dml_cluster.bus.staging import to_device, to_host
from dml_cluster.bus.wire import (
    Header,
    Kind,
    WireError,
    check_form,
    decode,
    encode_sent,
    unpack_header,
)
from dml_cluster.errors import ConfigError, PeerError

MESSAGES_PER_STEP = 4
"""The most messages one peer sends another per step: its predictions, a sequential round's,
an evaluation's, a credit."""


def bind_address(master_addr: str, master_port: int) -> str:
    """This host's address on the route to the rendezvous master; loopback on one node.

    Binding that one address (never 0.0.0.0) keeps the bus off interfaces it does not need.
    """
    try:
        infos = socket.getaddrinfo(master_addr, master_port, socket.AF_INET, socket.SOCK_DGRAM)
        target = infos[0][4][0]
    except OSError:
        return "127.0.0.1"
    if ipaddress.ip_address(target).is_loopback:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((target, master_port))  # UDP connect: picks the route, sends nothing
        return probe.getsockname()[0]


class ZmqBus(Bus):
    def __init__(
        self,
        *,
        rank: int,
        world: int,
        names: Sequence[str],
        run_id: bytes,
        config_hash: str,
        store: torch.distributed.Store,
        address: str,
        timeout_s: float,
        startup_timeout_s: float | None = None,
        encoding: Encoding | str = "float32",
        ipc: bool = False,
        port: int | None = None,
        curve: CurveKeys | None = None,
        window: int = 4,
        scope: str = "",
    ) -> None:
        """`port`: bind the inbox there (default: any free port); `curve`: encrypt and admit
        only the cohort's keys (dml_cluster.bus.curve); `window`: how many steps a sender may
        run ahead of a receiver (bus.window); `scope`: which of several buses of one launch
        this is (a data-parallel cohort's replica index: its endpoints' keys in the store)."""
        if window < 1:
            raise ConfigError(f"bus: window must be at least 1 step, not {window}")
        self.rank, self.world, self.names = rank, world, list(names)
        self.run_id, self.timeout_s = run_id, timeout_s
        self.encoding = Encoding.of(encoding)
        self.startup_timeout_s = max(startup_timeout_s or timeout_s, timeout_s)
        self.config_hash = int(config_hash, 16)
        self.window, self.scope = window, scope
        self.stats = BusStats()
        # with CUDA a message is decoded straight into page-locked memory (the one host copy)
        self._pinned = torch.cuda.is_available()
        self._pending: dict[tuple[int, int, int], tuple[Header, Sent]] = {}
        self._current: tuple[int, int] | None = None  # (step, round) of the latest exchange
        self._last_step = {r: -1 for r in range(world)}
        self._consumed: dict[int, int] = {}  # receiver -> the last step it has consumed
        self._told: dict[int, int] = {}  # sender -> the last consumed step it has been told
        self._hellos: dict[int, int] = {}
        self._warned: set[str] = set()
        self._closed = False
        self.ctx = zmq.Context()
        self.guard = CurveGuard(self.ctx, curve, self._who(rank)) if curve else None
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.hwm = MESSAGES_PER_STEP * (window + 2)  # per connection; the window binds first
        self.inbox.setsockopt(zmq.RCVHWM, self.hwm)
        if self.guard is not None:
            self.guard.serve(self.inbox)
        try:
            self.endpoint = self._bind(address, ipc, port)
        except zmq.ZMQError as err:
            self.close()
            where = f"{address}:{port}" if port and not ipc else address
            raise ConfigError(f"bus: cannot bind an inbox on {where}: {err}") from None
        try:
            self._connect(store, run_id, timeout_s)
        except BaseException:
            self.close()  # sockets and the authenticator thread must not outlive a failed start
            raise

    # -- set-up -----------------------------------------------------------------------------

    def _connect(self, store: torch.distributed.Store, run_id: bytes, timeout_s: float) -> None:
        rank, world = self.rank, self.world
        prefix = f"dml-bus/{run_id.hex()}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        prefix += f"/{self.scope}" if self.scope else ""
        store.set(f"{prefix}/endpoint/{rank}", self.endpoint)
        self.outboxes: dict[int, zmq.Socket] = {}
        for other in range(world):
            if other == rank:
                continue
            endpoint = self._lookup(store, f"{prefix}/endpoint/{other}", other)
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, self.hwm)
            sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
            if self.guard is not None:
                self.guard.client(sock, self.names[other])
            sock.connect(endpoint)
            self.outboxes[other] = sock
        self._handshake()

    def _bind(self, address: str, ipc: bool, port: int | None) -> str:
        if ipc:
            scope = f"-{self.scope}" if self.scope else ""
            name = f"dml-{self.run_id.hex()}{scope}-{self.rank}.sock"
            path = os.path.join(tempfile.gettempdir(), name)
            endpoint = f"ipc://{path}"
            self.inbox.bind(endpoint)
            return endpoint
        if port:
            self.inbox.bind(f"tcp://{address}:{port}")
        else:
            port = self.inbox.bind_to_random_port(f"tcp://{address}")
        return f"tcp://{address}:{port}"

    def _who(self, rank: int) -> str:
        return f"peer {rank} ({self.names[rank]}, rank {rank})"

    def _timeout(self) -> float:
        """How long the exchange under way may wait: the trainer's patience, else bus.timeout_s."""
        return self.patience_s if self.patience_s is not None else self.timeout_s

    def _lookup(self, store: torch.distributed.Store, key: str, other: int) -> str:
        store.set_timeout(timedelta(seconds=self.startup_timeout_s))
        try:
            return store.get(key).decode()
        except torch.distributed.DistNetworkError:
            raise PeerError(
                f"lost the rendezvous store while waiting for the bus endpoint of "
                f"{self._who(other)} (the process hosting the store stopped)"
            ) from None
        except RuntimeError:
            raise PeerError(
                f"{self._who(other)} never published its bus endpoint within "
                f"{self.startup_timeout_s:g} s"
            ) from None

    def _handshake(self) -> None:
        hello = Header(
            Kind.HELLO, 1, self.run_id, 0, 0, self.rank, self.rank, self.config_hash, 0, 0
        )
        for sock in self.outboxes.values():
            sock.send_multipart([hello.pack(), b""])
        deadline = time.monotonic() + self.startup_timeout_s
        while len(self._hellos) < self.world - 1:
            self._receive_one(deadline, lambda: [r for r in self.outboxes if r not in self._hellos])
        for other, their_hash in self._hellos.items():
            if their_hash != self.config_hash:
                raise ConfigError(
                    f"{self._who(other)} runs a different config (hash {their_hash:016x}, "
                    f"mine {self.config_hash:016x}): every peer must be given the same config"
                )

    # -- exchange ---------------------------------------------------------------------------

    def exchange(
        self,
        key: StepKey,
        local: Mapping[int, Tensor],
        senders: Sequence[int],
        receivers: Sequence[int] | None = None,
        encoding: Encoding | None = None,
    ) -> dict[int, Tensor]:
        # only receivers are sent to (a teacher's inbox would otherwise fill with messages it
        # never reads) and only a receiver waits (a teacher publishes and moves on)
        self.stats.exchanges += 1
        applied = self.encoding if encoding is None else encoding
        listeners = range(self.world) if receivers is None else receivers
        self._current = (key.step, key.round)
        listening = self.rank in listeners
        wanted = [s for s in senders if s != self.rank] if listening else []
        out: dict[int, Tensor] = {}
        rows = classes = None  # what the others' messages must hold, when this peer sends too
        if self.rank in senders:
            own = local[self.rank]
            rows, classes = own.shape
            # sparse rows are chosen (drawn) once, on the device: read as the others read them
            sent = applied.send(own, key, self.rank) if applied.sparse else None
            # read as the others read it (bus/encoding.py)
            out[self.rank] = (
                applied.as_received(own, key, self.rank) if sent is None
                else applied.receive(sent)
            )  # fmt: skip
            to = [r for r in listeners if r != self.rank]
            self._publish(key, own if sent is None else sent, to, wanted, applied)
        if not listening:
            return out
        self._credit(key.step - 1, wanted)
        deadline = time.monotonic() + self._timeout()
        t0 = time.perf_counter()

        def missing() -> list[int]:
            self._refuse_unexpected(key, wanted, applied, rows, classes)
            return [s for s in wanted if (key.step, key.round, s) not in self._pending]

        while missing():
            self._receive_one(deadline, missing)
        self.stats.wait_seconds += time.perf_counter() - t0
        for s in wanted:
            header, tensor = self._pending.pop((key.step, key.round, s))
            if header.fingerprint != key.fingerprint:
                raise PeerError(
                    f"peers out of sync at step {key.step}: {self._who(s)} computed on batch "
                    f"{header.fingerprint:016x}, this peer on {key.fingerprint:016x}"
                )
            home = local[self.rank].device if self.rank in local else torch.device("cpu")
            out[s] = to_device(tensor, home)
        return out

    def _refuse_unexpected(
        self,
        key: StepKey,
        senders: Sequence[int],
        encoding: Encoding,
        rows: int | None,
        classes: int | None,
    ) -> None:
        """Drop and count the messages held for `key` that are not in the exchange's encoding
        (or not `rows` x `classes` where known): the exchange waits on for the right ones."""
        for s in senders:
            slot = (key.step, key.round, s)
            if slot not in self._pending:
                continue
            try:
                check_form(self._pending[slot][0], encoding, rows, classes)
            except WireError as err:
                del self._pending[slot]
                self._reject(err)

    def _publish(
        self,
        key: StepKey,
        tensor: Sent,
        to: Sequence[int],
        wanted: Sequence[int] = (),
        encoding: Encoding | None = None,
    ) -> None:
        """Send `tensor` (dense log-probabilities, or the sparse rows `Encoding.send` made) in
        `encoding` (default: the bus's) to `to`, once the window allows; `wanted`: the peers
        this one receives from in the same exchange (told of its progress before it waits, so
        two senders never wait on each other)."""
        self._await_credit(key, to, wanted)
        if isinstance(tensor, Tensor):  # one device -> host copy per step
            tensor = to_host(tensor, (encoding or self.encoding).value_dtype)
        fields, payload = encode_sent(tensor)
        header = Header(
            Kind.DATA, fields["encoding"], self.run_id, key.step, key.round, self.rank, self.rank,
            key.fingerprint, fields["rows"], fields["cols"], fields.get("values", 0),
            fields.get("classes", 0),
        ).pack()  # fmt: skip
        body = payload.numpy()
        for other in to:
            sock = self.outboxes[other]
            try:
                sock.send_multipart([header, body], copy=False)
            except zmq.Again:
                raise PeerError(
                    f"{self._who(other)} stopped taking messages at step {key.step} "
                    f"(last step seen from it: {self._last_step[other]})"
                ) from None
            self.stats.bytes_sent += len(header) + body.nbytes
            # a receiver sent step t has consumed the steps before it: this tells it so
            self._told[other] = max(self._told.get(other, -1), key.step - 1)

    # -- flow control -----------------------------------------------------------------------

    def _await_credit(self, key: StepKey, to: Sequence[int], wanted: Sequence[int]) -> None:
        """Wait until every receiver in `to` has consumed step key.step - window or later."""
        for r in to:  # everyone starts at the same step: before any news, the one before it
            self._consumed.setdefault(r, key.step - 1)
        self._drain()

        def behind() -> list[int]:
            return [r for r in to if key.step - self._consumed[r] > self.window]

        if behind():
            self._credit(key.step - 1, wanted)
            deadline = time.monotonic() + self._timeout()
            t0 = time.perf_counter()
            while behind():
                self._receive_one(deadline, behind)
            self.stats.wait_seconds += time.perf_counter() - t0
        lead = max((key.step - self._consumed[r] for r in to), default=0)
        self.stats.max_lead_steps = max(self.stats.max_lead_steps, lead)

    def _credit(self, consumed: int, senders: Sequence[int]) -> None:
        """Tell senders not yet told (those this peer sends nothing to) that it has consumed
        every message up to step `consumed`."""
        for s in senders:
            if self._told.get(s, -1) >= consumed:
                continue
            header = Header(
                Kind.CREDIT, 1, self.run_id, consumed, 0, self.rank, self.rank, 0, 0, 0
            ).pack()
            try:
                self.outboxes[s].send_multipart([header, b""])
            except zmq.Again:
                raise PeerError(
                    f"{self._who(s)} stopped taking messages at step {consumed + 1} "
                    f"(last step seen from it: {self._last_step[s]})"
                ) from None
            self.stats.bytes_sent += len(header)
            self._told[s] = consumed

    def _drain(self) -> None:
        """Take in whatever has arrived, without waiting (credits reach a teacher this way)."""
        while self.inbox.poll(0):
            self._take()

    # -- receiving --------------------------------------------------------------------------

    def _receive_one(self, deadline: float, missing: callable) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self.inbox.poll(int(remaining * 1000) + 1):
            if time.monotonic() < deadline:
                return
            lost = ", ".join(
                f"{self._who(r)}, last step seen {self._last_step[r]}" for r in missing()
            )
            step, rnd = self._current or (-1, 0)
            raise PeerError(
                f"no answer within {self._timeout():g} s at step {step} round {rnd} from {lost}"
            )
        self._take()

    def _take(self) -> None:
        """Receive one message: keep it, or drop and count it (warning once per reason)."""
        frames = self.inbox.recv_multipart(copy=False)
        self.stats.bytes_received += sum(len(f.buffer) for f in frames)
        try:
            self._accept(frames)
        except WireError as err:
            self._reject(err)

    def _reject(self, err: WireError) -> None:
        """Count a dropped message (warning once per reason)."""
        self.stats.messages_rejected += 1
        reason = str(err)
        # one line per kind of problem, whatever its step or sender: a flood of forged or
        # stray messages is counted (messages_rejected), not printed line by line
        kind = re.sub(r"\d+", "#", reason)
        if kind not in self._warned:
            self._warned.add(kind)
            print(
                f"dml-cluster: {self._who(self.rank)} dropped a message: {reason} (further "
                "messages like it are only counted)",
                file=sys.stderr,
                flush=True,
            )

    def _accept(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:
            raise WireError(f"{len(frames)} frames, expected 2 (header, payload)")
        header = unpack_header(frames[0].buffer)
        if header.run_id != self.run_id:
            raise WireError(f"message from another run (run id {header.run_id.hex()})")
        sender = header.sender_rank
        if not 0 <= sender < self.world or sender == self.rank:
            raise WireError(f"message claims to come from rank {sender}")
        if header.kind != Kind.DATA and len(frames[1].buffer):
            raise WireError(f"a {header.kind.name} message with a payload")
        if header.kind == Kind.HELLO:
            self._hellos[sender] = header.fingerprint
            return
        if header.kind == Kind.CREDIT:
            self._accept_credit(sender, header.step)
            return
        if self._current is not None and (header.step, header.round) < self._current:
            raise WireError(f"stale message for step {header.step} round {header.round}")
        if self._beyond_window(sender, header.step):
            raise WireError(
                f"message for step {header.step} from rank {sender}, beyond the credit window "
                f"of {self.window} steps"
            )
        tensor = decode(header, frames[1].buffer, pinned=self._pinned)
        slot = (header.step, header.round, sender)
        if slot in self._pending:
            raise WireError(f"duplicate message for step {header.step} from rank {sender}")
        self._pending[slot] = (header, tensor)
        self._last_step[sender] = max(self._last_step[sender], header.step)
        self._note_consumed(sender, header.step - 1)  # it sends step t once done with t - 1
        held = len({t for (t, _, s) in self._pending if s == sender})
        self.stats.max_pending_steps = max(self.stats.max_pending_steps, held)

    def _beyond_window(self, sender: int, step: int) -> bool:
        """Whether a message of `step` from `sender` is further ahead than it may be."""
        if self._current is not None:  # the sender has been told step current - 1 at most
            return step > self._current[0] - 1 + self.window
        held = {t for (t, _, s) in self._pending if s == sender} | {step}
        return max(held) - min(held) >= self.window  # before this peer's first exchange

    def _accept_credit(self, receiver: int, consumed: int) -> None:
        if self._current is not None and consumed > self._current[0]:
            raise WireError(
                f"credit for step {consumed} from rank {receiver}, which cannot have consumed "
                f"a step this peer has not reached ({self._current[0]})"
            )
        self._note_consumed(receiver, consumed)
        self._last_step[receiver] = max(self._last_step[receiver], consumed)

    def _note_consumed(self, receiver: int, step: int) -> None:
        self._consumed[receiver] = max(self._consumed.get(receiver, step), step)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.inbox.close(linger=0)
        for sock in getattr(self, "outboxes", {}).values():
            sock.close(linger=500)  # a last message (a hello, an error's cause) still goes out
        if self.guard is not None:
            self.guard.stop()
        self.ctx.term()
        if getattr(self, "endpoint", "").startswith("ipc://"):
            with contextlib.suppress(OSError):  # zmq leaves the socket file behind
                os.unlink(self.endpoint.removeprefix("ipc://"))
