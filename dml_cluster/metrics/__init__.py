"""Watching a cohort: the events observers receive, per-batch cohort statistics, the per-step run
log and the Prometheus endpoint of a peer process.

`events`, `batch` and `run_log` are always available; the exporter (and prometheus_client with
it) is imported only when metrics are enabled, so a run with metrics off neither pays for nor
binds it.
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
    cfg: Config, hosted: tuple[int, ...], run_id: str, local_rank: int = 0
) -> Iterator[list[Observer]]:
    """The observers that serve /metrics for the peers this process hosts, for the block's
    duration (the port is released after it); none at all when `metrics.enabled` is off."""
    if not cfg.metrics.enabled:
        yield []
        return
    from dml_cluster.metrics.exporter import PrometheusExporter

    exporter = PrometheusExporter(cfg, hosted, run_id, local_rank)
    try:
        yield [exporter]
    finally:
        exporter.close()
