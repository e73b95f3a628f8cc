"""The one-process run: every peer of the cohort in this process, on a `LocalBus`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dml_cluster.bus.local import LocalBus
from dml_cluster.checkpoint.standing import examine, finished_line, read_summary
from dml_cluster.config import Config
from dml_cluster.data.prepare import prepare_data
from dml_cluster.determinism import set_determinism
from dml_cluster.devices import cohort_device_type, hosted_devices, make_current
from dml_cluster.launch.identity import run_id
from dml_cluster.launch.transports import bus_encoding
from dml_cluster.metrics import metrics_observers
from dml_cluster.metrics.events import Observer
from dml_cluster.metrics.loggers import check_loggers
from dml_cluster.precision import check_precision
from dml_cluster.run_lock import claim_run_folder
from dml_cluster.trainer import CohortTrainer, Placement


def run_local(cfg: Config, observers: Sequence[Observer] = ()) -> dict[str, Any]:
    """Every peer in this process: the one-device mode, and the oracle for the others.
    `observers`: watch the run beside the run log and the metrics (benchmarks' clocks)."""
    check_precision(cfg, cohort_device_type(cfg))
    check_loggers(cfg)
    set_determinism(cfg)
    hosted = tuple(range(len(cfg.peers)))
    devices = hosted_devices(cfg, hosted)  # peer i on GPU i % n, or cohort.devices
    device = make_current(devices[hosted[0]])
    names = {i: cfg.peers[i].name for i in hosted}
    with claim_run_folder(cfg.run.dir, names):
        finished = finished_line(cfg, examine(cfg, cfg.run.dir), list(names.values()), True)
        if finished:  # a complete run started again: nothing to do, nothing is written
            print(finished, flush=True)
            return read_summary(cfg.run.dir) or {}
        data = prepare_data(cfg)  # bad data, a bad model: before anything is written
        placement = Placement(hosted, device, reporter=True, devices=devices)
        trainer = CohortTrainer(cfg, LocalBus(bus_encoding(cfg)), placement, data=data)
        with metrics_observers(cfg, hosted, run_id(cfg).hex()) as metrics:
            trainer.observe([*observers, *metrics])
            return trainer.run()
