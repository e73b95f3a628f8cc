"""Watching a cohort: the events observers receive, per-batch cohort statistics, the per-step run
log, the Prometheus endpoint of a peer process and the experiment loggers (TensorBoard, W&B,
MLflow: `loggers/`).

`events`, `batch` and `run_log` are always available; the exporter (and prometheus_client with
it) is imported only when metrics are enabled, so a run with metrics off neither pays for nor
binds it; a logger's package only when `metrics.loggers` names it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dml_cluster.config import Config
    from dml_cluster.metrics.events import Observer


@contextmanager
def metrics_observers(
    cfg: Config, hosted: tuple[int, ...], run_id: str, local_rank: int = 0, replica: int = 0
) -> Iterator[list[Observer]]:
    """The observers that serve /metrics for the peers this process hosts (none when
    `metrics.enabled` is off) and write their experiment loggers' runs (`metrics.loggers`), for
    the block's duration (the port is released after it, the logger runs are closed).
    `replica`: which of its data-parallel peer's replicas this process is (each serves its own
    /metrics, labelled with it; only replica 0 writes the peer's logger runs)."""
    from dml_cluster.metrics.loggers import experiment_logger

    logger = experiment_logger(cfg, hosted, run_id) if replica == 0 else None
    observers: list[Observer] = [] if logger is None else [logger]
    exporter = None
    try:
        if cfg.metrics.enabled:
            from dml_cluster.metrics.exporter import PrometheusExporter

            exporter = PrometheusExporter(cfg, hosted, run_id, local_rank, replica)
            observers.insert(0, exporter)
        yield observers
    finally:
        if exporter is not None:
            exporter.close()
        if logger is not None:
            logger.close()  # a run that ended has closed them (on_end): this is a stop
