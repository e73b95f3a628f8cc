"""The torch transport: collectives over the default process group (NCCL on GPUs, gloo on CPU).

Under NCCL (every peer process on a GPU of its own) messages are built, gathered and decoded on
the GPU: the payload never visits the host; the received headers (48 bytes per sender) are read
on the host in one copy per exchange, to check that every peer is at the same step and batch.
Under gloo the messages live on the CPU (`device`: where the launcher says messages live).

Each message is one flat byte tensor: a 6 x int64 header (step, round, fingerprint, rows, cols,
classes) followed by the encoded payload (bus/encoding.py::payload_parts: dense values, top-k
rows' indices then values, or sampled rows' ids, counts, values), so an exchange is a single
all_gather (or, for a sequential
round with one sender, a broadcast of the header then of the payload). Collectives involve every
rank, so `receivers` changes nothing here: a teacher's process takes part in every exchange (and
so stays in lockstep with the students), it just does not use what it receives. Each exchange
travels in its encoding (the bus's, or the one it is told: bus/base.py); a received message
whose columns or length are not that encoding's is a `PeerError` (a collective cannot skip it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from dml_cluster.bus.base import Bus, BusStats, StepKey
from dml_cluster.bus.encoding import Encoding, Sent, from_wire, payload_bytes, rows_from_bytes
from dml_cluster.errors import PeerError, first_line

_HEADER_BYTES = 6 * 8
LOST_CHECK_IN_S = 2.0
"""How long peers that timed out on an exchange wait for each other at the store, to name the
one that never came."""


def _signed(fp: int) -> int:
    return fp - (1 << 64) if fp >= 1 << 63 else fp


class TorchBus(Bus):
    def __init__(
        self, *, rank: int, world: int, names: Sequence[str], device: torch.device,
        encoding: Encoding | str = "float32", timeout_s: float = 60.0,
        store: dist.Store | None = None, prefix: str = "dml-lost",
        group: dist.ProcessGroup | None = None,
    ) -> None:  # fmt: skip
        """`timeout_s`: how long an exchange waits in steady state (`set_patience` lengthens
        it); `store`: the cohort's rendezvous store, where peers that time out check in so that
        the one missing is named (`prefix`: this launch's keys there); `group`: the processes
        that exchange, in peer order, `rank` this one's index in it (default: the default
        group; a data-parallel cohort's replica r exchanges with every peer's replica r)."""
        self.rank, self.world, self.names, self.device = rank, world, list(names), device
        self.group = group
        self.encoding = Encoding.of(encoding)
        self.stats = BusStats()
        self.timeout_s, self.store, self.prefix = timeout_s, store, prefix
        self.last_step = -1  # the last step whose exchange completed

    def _pack(self, key: StepKey, sent: Sent, classes: int) -> Tensor:
        """One message: the header, then `sent`'s payload (what `Encoding.send` made)."""
        rows, cols = (sent if isinstance(sent, Tensor) else sent.indices).shape
        head = torch.tensor([key.step, key.round, _signed(key.fingerprint), rows, cols, classes])
        body = payload_bytes(sent).to(self.device)
        return torch.cat([head.to(self.device).view(torch.uint8), body])

    def _send(self, key: StepKey, tensor: Tensor, encoding: Encoding) -> tuple[Sent, Tensor]:
        """This process's peer's predictions in `encoding` (sparse rows drawn once, on the
        device the predictions are on, as the other transports draw them) and its message."""
        sent = encoding.send(tensor, key, self.rank)
        return sent, self._pack(key, sent, tensor.shape[1])

    def _unpack(
        self, key: StepKey, sender: int, buf: Tensor, header: list[int], encoding: Encoding
    ) -> Sent:
        """The payload of `buf`, whose header (read on the host) is `header`, in `encoding`:
        its columns (k, n or C) and its length must be that encoding's."""
        step, rnd, fp, rows, cols, classes = header
        if (step, rnd) != (key.step, key.round) or fp != _signed(key.fingerprint):
            raise PeerError(
                f"peers out of sync at step {key.step}: peer {sender} ({self.names[sender]}) "
                f"sent step {step} round {rnd} batch {fp & (2**64 - 1):016x}, this peer expected "
                f"batch {key.fingerprint:016x}"
            )
        body = buf[_HEADER_BYTES:]
        size = encoding.payload_size(rows, classes)
        if cols != encoding.columns(classes) or body.numel() != size:
            self.stats.messages_rejected += 1
            raise PeerError(
                f"peers out of sync at step {key.step} round {key.round}: peer {sender} "
                f"({self.names[sender]}) sent {rows} x {cols} columns of {classes} classes in "
                f"{body.numel()} bytes, not a {encoding.name} message"
            )
        dtype = encoding.value_dtype
        if not encoding.sparse:
            return from_wire(body.view(dtype).view(rows, cols))
        return rows_from_bytes(encoding.name, body, rows, cols, classes, dtype).widened()

    def _timeout(self) -> float:
        return self.patience_s if self.patience_s is not None else self.timeout_s

    def _wait(self, work: dist.Work) -> None:
        """Wait for a collective, at most the current timeout: a lost peer is then a Python
        error here, never NCCL's watchdog abort (the process group's own timeout is the longer
        `bus.startup_timeout_s`); under NCCL this is the exchange's one host wait."""
        work.wait(timeout=timedelta(seconds=self._timeout()))

    def _lost(self, key: StepKey, err: Exception) -> PeerError:
        first = first_line(err)
        missing = self._missing(key)
        if missing:
            who = ", ".join(f"peer {r} ({self.names[r]})" for r in missing)
        else:
            who = "one of: " + ", ".join(
                f"peer {r} ({self.names[r]})" for r in range(self.world) if r != self.rank
            )
        return PeerError(
            f"lost contact with {who} at step {key.step} round {key.round} (waited at most "
            f"{self._timeout():g} s; last step exchanged with the cohort: {self.last_step}): "
            f"{first}"
        )

    def _missing(self, key: StepKey) -> list[int]:
        """The peers that did not reach this exchange: every peer that did times out on it too
        and checks in at the store; those that have not within a few seconds are named. Empty
        when the store cannot tell (it went with a lost peer)."""
        if self.world == 2:  # this peer is here: the other one is missing
            return [1 - self.rank]
        if self.store is None:
            return []
        where = f"{self.prefix}/{key.step}/{key.round}"
        deadline = time.monotonic() + min(LOST_CHECK_IN_S, self._timeout())
        try:
            self.store.set(f"{where}/{self.rank}", b"here")
            while True:
                missing = [
                    r for r in range(self.world)
                    if r != self.rank and not self.store.check([f"{where}/{r}"])
                ]  # fmt: skip
                if not missing or time.monotonic() >= deadline:
                    return missing
                time.sleep(0.1)
        except (RuntimeError, dist.DistError):
            return []

    def exchange(
        self,
        key: StepKey,
        local: Mapping[int, Tensor],
        senders: Sequence[int],
        receivers: Sequence[int] | None = None,
        encoding: Encoding | None = None,
    ) -> dict[int, Tensor]:
        self.stats.exchanges += 1
        senders = list(senders)
        applied = self.encoding if encoding is None else encoding
        try:
            own = None  # this peer's encoded predictions, when it sends
            if len(senders) == self.world:
                own, buf = self._send(key, local[self.rank], applied)
                bufs = [torch.empty_like(buf) for _ in range(self.world)]
                self._wait(dist.all_gather(bufs, buf, group=self.group, async_op=True))
            elif len(senders) == 1:
                own, buf = self._broadcast(key, local, senders[0], applied)
                bufs = {senders[0]: buf}
            else:
                raise ValueError("the torch transport exchanges with everyone or one sender")
        except (RuntimeError, dist.DistBackendError) as err:
            raise self._lost(key, err) from None
        self.last_step = key.step
        out = {}
        others = [s for s in senders if s != self.rank]
        home = local[self.rank].device if self.rank in local else self.device
        if others:  # every sender's header in one device -> host copy
            heads = torch.stack([bufs[s][:_HEADER_BYTES] for s in others]).cpu()
            headers = dict(zip(others, heads.view(torch.int64).tolist(), strict=True))
        for s in senders:
            if s == self.rank:  # read as the others read it (bus/encoding.py)
                out[s] = applied.receive(own).to(local[s].device)
                continue
            # on the peer's own device (a GPU shared over gloo: the messages are on the CPU)
            out[s] = self._unpack(key, s, bufs[s], headers[s], applied).to(home)
            self.stats.bytes_received += bufs[s].numel()
        self.stats.bytes_sent += (len(senders) - 1) * bufs[senders[0]].numel() if (
            self.rank in senders) else 0  # fmt: skip
        return out

    def _broadcast(
        self, key: StepKey, local: Mapping[int, Tensor], peer: int, encoding: Encoding
    ) -> tuple[Sent | None, Tensor]:
        """`peer`'s message in `encoding` to every process (and, in `peer`'s, its encoded
        predictions)."""
        src = peer if self.group is None else dist.get_global_rank(self.group, peer)
        own = None
        if peer == self.rank:
            own, buf = self._send(key, local[peer], encoding)
            size = torch.tensor([buf.numel()], device=self.device)
        else:
            size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._wait(dist.broadcast(size, src, group=self.group, async_op=True))
        if peer != self.rank:
            buf = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self._wait(dist.broadcast(buf, src, group=self.group, async_op=True))
        return own, buf
