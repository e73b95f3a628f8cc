"""Publish-only teachers on the real zmq bus: a teacher never waits, students never send to it."""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from dml_cluster.bus import StepKey
from dml_cluster.bus.zmq_bus import ZmqBus

RUN, HASH = b"teacher1", "00000000000000ab"


def _cohort(world: int) -> list[ZmqBus]:
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    stores = [master] + [
        dist.TCPStore("127.0.0.1", master.port, is_master=False) for _ in range(world - 1)
    ]
    buses: list = [None] * world

    def build(rank: int) -> None:
        buses[rank] = ZmqBus(
            rank=rank, world=world, names=["teacher", "s1", "s2"][:world], run_id=RUN,
            config_hash=HASH, store=stores[rank], address="127.0.0.1", timeout_s=5.0,
        )  # fmt: skip

    threads = [threading.Thread(target=build, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return buses


def test_teacher_publishes_without_waiting_and_receives_nothing() -> None:
    teacher, s1, s2 = buses = _cohort(3)
    try:
        students = [1, 2]
        received_before = teacher.stats.bytes_received
        # the teacher runs three steps ahead while no student has published anything yet
        t0 = time.monotonic()
        for step in range(3):
            own = teacher.exchange(StepKey(step, 0, 7), {0: torch.full((4, 3), step)}, [0, 1, 2],
                                   receivers=students)  # fmt: skip
            assert set(own) == {0}
        assert time.monotonic() - t0 < 1.0  # it did not wait (the timeout is 5 s)
        out: dict[int, dict] = {}

        def student(rank: int, bus: ZmqBus) -> None:
            for step in range(3):
                x = {rank: torch.full((4, 3), 10.0 * rank + step)}
                out[(rank, step)] = bus.exchange(StepKey(step, 0, 7), x, [0, 1, 2], students)

        threads = [threading.Thread(target=student, args=(r, b)) for r, b in ((1, s1), (2, s2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for rank in students:
            for step in range(3):
                got = out[(rank, step)]
                assert set(got) == {0, 1, 2}
                assert torch.equal(got[0], torch.full((4, 3), float(step)))
                other = 3 - rank
                assert torch.equal(got[other], torch.full((4, 3), 10.0 * other + step))
        time.sleep(0.2)  # anything sent to the teacher would have arrived by now
        assert teacher.stats.bytes_received == received_before
        assert not teacher.inbox.poll(0)  # its inbox is empty: students never sent to it
    finally:
        for b in buses:
            b.close()
