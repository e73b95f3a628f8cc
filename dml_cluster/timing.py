"""How long a training step and its phases take, without making the device wait.

A step is cut into phases by marks: `start()`, then `mark(phase)` at the end of each stretch of
work (the time since the previous mark goes to `phase`; a phase marked twice, as in a
sequential update's rounds, adds up), then `stop()`, which hands back the step's `StepTimes`.

- On the CPU (`HostTimer`) work is synchronous and the host clock tells the truth: the times are
  known when the step ends.
- On CUDA (`DeviceTimer`) the host only queues work, so its clock would charge the device's
  forward and backward to whatever waits next (the exchange). Each mark records a CUDA event on
  the current stream of every device the process steps on; the times are read from the events
  only when something asks for them (`StepTimes.read`, on a reporting step): the step's last
  events are synchronised then, and never on the other steps. With several devices each phase is
  the longest any of them spent in it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch

FORWARD, EXCHANGE, UPDATE = "forward", "exchange", "update"
PHASES = (FORWARD, EXCHANGE, UPDATE)


class StepTimes(ABC):
    """One step's times in seconds: `step` (start to stop) and each phase of `PHASES`;
    `wait_seconds` is the part of the exchange the bus spent waiting for other peers (host
    clock, from the bus's counters)."""

    def __init__(self, wait_seconds: float) -> None:
        self.wait_seconds = wait_seconds
        self._read: tuple[float, dict[str, float]] | None = None

    def read(self) -> tuple[float, dict[str, float]]:
        """(step seconds, {phase: seconds}); on a device, waits for the step's work to finish
        (once: the values are kept)."""
        if self._read is None:
            self._read = self._measure()
        return self._read

    @abstractmethod
    def _measure(self) -> tuple[float, dict[str, float]]:
        """The step's and its phases' seconds (the subclass's clock)."""

    @property
    def step_seconds(self) -> float:
        return self.read()[0]

    @property
    def forward_seconds(self) -> float:
        return self.read()[1][FORWARD]

    @property
    def exchange_seconds(self) -> float:
        return self.read()[1][EXCHANGE]

    @property
    def update_seconds(self) -> float:
        return self.read()[1][UPDATE]


class KnownTimes(StepTimes):
    """Times known when made: the host clock's, or given (`StepEvent.of`)."""

    def __init__(self, step: float, phases: dict[str, float], wait_seconds: float) -> None:
        super().__init__(wait_seconds)
        self._known = (step, phases)

    def _measure(self) -> tuple[float, dict[str, float]]:
        return self._known


class HostTimer:
    """Step and phase times from the host clock (`time.perf_counter`)."""

    def start(self) -> None:
        self._first = self._last = time.perf_counter()
        self._phases = dict.fromkeys(PHASES, 0.0)

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self._phases[phase] += now - self._last
        self._last = now

    def stop(self, wait_seconds: float = 0.0) -> StepTimes:
        return KnownTimes(self._last - self._first, self._phases, wait_seconds)


class _DeviceTimes(StepTimes):
    """The events of one step, by device: [(phase or None for the start, event), ...]."""

    def __init__(
        self, marks: dict[torch.device, list[tuple[str | None, torch.cuda.Event]]], wait: float
    ) -> None:
        super().__init__(wait)
        self._marks = marks

    def _measure(self) -> tuple[float, dict[str, float]]:
        step, phases = 0.0, dict.fromkeys(PHASES, 0.0)
        for marks in self._marks.values():
            marks[-1][1].synchronize()  # the step's work on this device is done: all its events
            here = dict.fromkeys(PHASES, 0.0)
            for (_, before), (phase, after) in zip(marks, marks[1:], strict=False):
                here[phase] += before.elapsed_time(after) / 1e3  # type: ignore[index]
            step = max(step, marks[0][1].elapsed_time(marks[-1][1]) / 1e3)
            phases = {p: max(phases[p], here[p]) for p in PHASES}
        self._marks = {}  # the events are not needed any more
        return step, phases


class DeviceTimer:
    """Step and phase times from CUDA events on `devices`' current streams (see the module's
    docstring); nothing here waits for a device."""

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self.devices = sorted(set(devices), key=str)

    def _record(self, phase: str | None) -> None:
        for device in self.devices:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(device))
            self._marks[device].append((phase, event))

    def start(self) -> None:
        self._marks: dict[torch.device, list[tuple[str | None, torch.cuda.Event]]] = {
            d: [] for d in self.devices
        }
        self._record(None)

    def mark(self, phase: str) -> None:
        self._record(phase)

    def stop(self, wait_seconds: float = 0.0) -> StepTimes:
        return _DeviceTimes(self._marks, wait_seconds)


def step_timer(devices: Iterable[torch.device]) -> HostTimer | DeviceTimer:
    """The timer for a process stepping peers on `devices`: device events when any is a CUDA
    device (on those), else the host clock."""
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    return DeviceTimer(cuda) if cuda else HostTimer()
